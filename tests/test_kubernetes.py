"""config/kubernetes/: every manifest valid against the Kubernetes API schemas (kubernetes-validate, no
cluster), the drain timing, the probes, the security context, and the embedded balancer.yaml accepted
by `balancer check`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

from balancer.config.load import parse_config, parse_duration

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "config" / "kubernetes"
# The oldest Kubernetes the manifests are meant for (the preStop `sleep` action is on by default from
# 1.30) and the newest whose schemas the installed kubernetes-validate ships.
VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version()]
EXPECTED = {
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "backends-headless-service.yaml": ("v1", "Service"),
    "configmap.yaml": ("v1", "ConfigMap"),
    "pdb.yaml": ("policy/v1", "PodDisruptionBudget"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
}
MONITOR_PORT = 8082

Manifest = dict[str, Any]


def load(name: str) -> Manifest:
    """The one document of ``config/kubernetes/NAME``."""
    documents = [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc is not None]
    assert len(documents) == 1, f"{name}: expected one document, got {len(documents)}"
    document: Manifest = documents[0]
    return document


def pod_spec() -> Manifest:
    spec: Manifest = load("deployment.yaml")["spec"]["template"]["spec"]
    return spec


def container() -> Manifest:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    only: Manifest = containers[0]
    return only


def container_port(port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    by_name = {entry["name"]: entry["containerPort"] for entry in container()["ports"]}
    assert port in by_name, f"no container port named {port!r}"
    number: int = by_name[port]
    return number


def embedded_config_text() -> str:
    text: str = load("configmap.yaml")["data"]["balancer.yaml"]
    return text


def embedded_config() -> Manifest:
    config: Manifest = yaml.safe_load(embedded_config_text())
    return config


# --- the schemas -----------------------------------------------------------------------------------------


def test_the_folder_holds_the_expected_manifests() -> None:
    """config/kubernetes/ has exactly the six manifests the README describes."""
    assert sorted(path.name for path in MANIFESTS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_is_valid(name: str, version: str) -> None:
    """Each manifest is its expected kind and valid against that Kubernetes version's schema, strictly
    (an unknown or misspelt field is an error)."""
    document = load(name)
    assert (document["apiVersion"], document["kind"]) == EXPECTED[name]
    kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_misspelt_field() -> None:
    """The schema check can fail: a misspelt field in the Deployment is refused in strict mode."""
    broken = copy.deepcopy(load("deployment.yaml"))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


# --- the Deployment ----------------------------------------------------------------------------------------


def test_at_least_two_replicas_of_the_image() -> None:
    """Two or more pods, and the HPA never goes below two."""
    assert load("deployment.yaml")["spec"]["replicas"] >= 2
    assert load("hpa.yaml")["spec"]["minReplicas"] >= 2
    assert container()["image"].split("/")[-1].startswith("balancer:")


def test_probes_hit_the_monitor_port() -> None:
    """Liveness is GET /healthz, readiness GET /readyz, both on the monitor port 8082, which the
    embedded config listens on."""
    live, ready = container()["livenessProbe"]["httpGet"], container()["readinessProbe"]["httpGet"]
    assert (live["path"], container_port(live["port"])) == ("/healthz", MONITOR_PORT)
    assert (ready["path"], container_port(ready["port"])) == ("/readyz", MONITOR_PORT)
    assert embedded_config()["monitor"]["port"] == MONITOR_PORT
    assert embedded_config()["monitor"]["host"] == "0.0.0.0"


def test_container_ports() -> None:
    """The container declares http 8080 and monitor 8082, the ports the embedded config listens on."""
    assert {(p["name"], p["containerPort"]) for p in container()["ports"]} == {("http", 8080), ("monitor", 8082)}
    assert embedded_config()["listen"] == {"host": "0.0.0.0", "port": 8080}


def prestop_seconds() -> float:
    """How long the preStop hook holds SIGTERM back: a `sleep` action, or an exec of python's
    time.sleep or of `sleep N`."""
    hook = container()["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    if command[0] == "sleep":
        return float(command[1])
    script = command[-1]
    assert "time.sleep(" in script, f"preStop does not sleep: {command}"
    return float(script.split("time.sleep(")[1].split(")")[0])


def test_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    """terminationGracePeriodSeconds exceeds the preStop sleep plus the config's shutdown.drain_timeout
    (the kubelet counts both against it, then SIGKILLs)."""
    grace = pod_spec()["terminationGracePeriodSeconds"]
    drain = parse_duration(embedded_config()["shutdown"]["drain_timeout"])
    sleep = prestop_seconds()
    assert 2 <= sleep <= 10
    assert grace > sleep + drain, (grace, sleep, drain)


def test_security_context() -> None:
    """Non-root with a numeric uid, read-only root filesystem, no privilege escalation, every
    capability dropped, the runtime's default seccomp profile."""
    pod, own = pod_spec()["securityContext"], container()["securityContext"]
    assert pod["runAsNonRoot"] is True and own["runAsNonRoot"] is True
    assert isinstance(own["runAsUser"], int) and own["runAsUser"] > 0
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"] and "add" not in own["capabilities"]
    assert own["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_pod_runs_as_the_images_user() -> None:
    """runAsUser is the uid the Dockerfile's USER names, so the image and the pod agree."""
    users = [c.value[0] for c in dockerfile.parse_file(str(ROOT / "Dockerfile")) if c.cmd == "USER"]
    assert users, "the Dockerfile has no USER"
    assert container()["securityContext"]["runAsUser"] == int(users[-1].split(":")[0])


def test_resources() -> None:
    """Requests and limits on CPU and memory; limits.cpu "2" (what `processes: auto` reads)."""
    resources = container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"cpu", "memory"}
    assert resources["limits"]["cpu"] == "2"
    assert embedded_config()["processes"] == "auto"


def test_the_configmap_is_mounted_at_etc_balancer() -> None:
    """The ConfigMap holding balancer.yaml is mounted read-only at /etc/balancer, the path the command
    reads."""
    mounts = {m["name"]: m for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (name,) = [n for n, m in mounts.items() if m["mountPath"] == "/etc/balancer"]
    assert mounts[name].get("readOnly") is True
    assert volumes[name]["configMap"]["name"] == load("configmap.yaml")["metadata"]["name"]
    assert "balancer.yaml" in load("configmap.yaml")["data"]
    assert container().get("args", ["run", "-c", "/etc/balancer/balancer.yaml"]) == \
        ["run", "-c", "/etc/balancer/balancer.yaml"]


# --- Service, PDB, HPA, the backends' Service ------------------------------------------------------------


def test_service_sends_port_80_to_8080() -> None:
    """The Service answers on 80 and forwards to the container's 8080, selecting the Deployment's pods."""
    service = load("service.yaml")["spec"]
    assert service["type"] in ("ClusterIP", "LoadBalancer")
    assert [(p["port"], container_port(p["targetPort"])) for p in service["ports"]] == [(80, 8080)]
    labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()


def test_disruption_budget_and_autoscaler() -> None:
    """The PDB keeps one pod available; the HPA scales the Deployment on 70 % CPU."""
    labels = load("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    pdb = load("pdb.yaml")["spec"]
    assert pdb["minAvailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = load("hpa.yaml")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": load("deployment.yaml")["metadata"]["name"]}
    assert hpa["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]


def test_the_discovered_name_is_the_headless_service() -> None:
    """pools.api.discovery resolves the headless Service's cluster DNS name, on the port it declares."""
    service = load("backends-headless-service.yaml")
    discovery = embedded_config()["pools"]["api"]["discovery"]
    assert service["spec"]["clusterIP"] == "None"
    assert discovery["dns"] == f"{service['metadata']['name']}.default.svc.cluster.local"
    assert discovery["port"] in [p["port"] for p in service["spec"]["ports"]]
    assert discovery["type"] == "a"


# --- the embedded configuration ------------------------------------------------------------------------


def test_embedded_config_passes_balancer_check() -> None:
    """The ConfigMap's balancer.yaml is a valid configuration (what `balancer check -c` runs)."""
    config = parse_config(embedded_config_text(), "configmap.yaml", environ={})
    assert config.shutdown.drain_timeout_s == 15.0
    assert [(listen.host, listen.port) for listen in config.listen] == [("0.0.0.0", 8080)]
    assert config.admin is not None and (config.admin.host, config.admin.port) == ("127.0.0.1", 8081)
    assert list(config.pools) == ["api"]
    assert [route.pool for route in config.routes] == ["api"]
