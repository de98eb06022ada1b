"""The Dockerfile, read without a Docker engine (the `dockerfile` package runs BuildKit's own parser),
and config/constraints.txt against pyproject.toml: pinned base images, a non-root user, exec form, a
health check, dependency layers before source layers, the pinned set used in both stages, and a lock
that cannot drift from pyproject's ranges. Each check is also run on a deliberately broken copy, so
that each can be seen to fail."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CONSTRAINTS = ROOT / "config" / "constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCE_DIRS = ("balancer", "backends")
OCI_LABELS = ("title", "description", "source", "licenses", "version")
COMMAND = ["balancer", "run", "-c", "/etc/balancer/balancer.yaml"]
MONITOR_PORT = 8082


# --- reading a Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM and the instructions after it, with its ARG defaults for ${VAR} substitution."""

    index: int
    image: str
    name: str | None
    commands: list[Any] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def label(self) -> str:
        return self.name or f"stage {self.index}"

    def expand(self, text: str) -> str:
        return expand(text, self.args)

    def of(self, *instructions: str) -> list[Any]:
        return [c for c in self.commands if c.cmd in instructions]


def expand(text: str, args: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by the ARG defaults in ``args`` (unknown ones left as they are)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def read_stages(path: Path) -> list[Stage]:
    """The stages of the Dockerfile at ``path``; global ARGs (before the first FROM) resolve in FROM lines
    and in stages that declare them again without a value."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            image = expand(command.value[0], global_args)
            name = command.value[2] if len(command.value) == 3 and command.value[1].upper() == "AS" else None
            stages.append(Stage(len(stages), image, name))
        elif command.cmd == "ARG" and not stages:
            key, _, default = command.value[0].partition("=")
            global_args[key] = default
        elif stages:
            stage = stages[-1]
            stage.commands.append(command)
            if command.cmd == "ARG":
                key, has_default, default = command.value[0].partition("=")
                stage.args[key] = stage.expand(default) if has_default else global_args.get(key, "")
    return stages


def mounts(run: Any) -> list[dict[str, str]]:
    """The ``--mount=`` options of a RUN, as dicts (``type=bind,from=build,...``)."""
    found = []
    for flag in run.flags:
        if flag.startswith("--mount="):
            found.append(dict(part.partition("=")[::2] for part in flag.removeprefix("--mount=").split(",")))
    return found


def run_text(run: Any) -> str:
    return " ".join(run.value)


def uses_constraints(run: Any) -> bool:
    """A ``pip install`` given config/constraints.txt as constraints (-c) or as the requirements (-r)."""
    return re.search(r"\bpip install\b.*\s-[cr]\s*\S*constraints\.txt\b", run_text(run)) is not None


def is_dependency_install(run: Any) -> bool:
    return uses_constraints(run) and not any(m.get("from") for m in mounts(run))


def copies_sources(command: Any) -> bool:
    """A COPY/ADD from the build context of balancer/, backends/ or the whole context."""
    if any(flag.startswith("--from=") for flag in command.flags):
        return False
    sources = [source.strip("./") or "." for source in command.value[:-1]]
    return any(source == "." or source.split("/")[0] in SOURCE_DIRS for source in sources)


def context_sources(stages: list[Stage]) -> list[str]:
    """Every path the build reads from the build context: COPY/ADD sources and bind mounts with no
    ``from``."""
    found = []
    for stage in stages:
        for command in stage.of("COPY", "ADD"):
            if not any(flag.startswith("--from=") for flag in command.flags):
                found += [stage.expand(source) for source in command.value[:-1]]
        for run in stage.of("RUN"):
            for mount in mounts(run):
                if mount.get("type") == "bind" and "from" not in mount:
                    found.append(mount.get("source", mount.get("src", ".")))
    return found


def labels(stage: Stage) -> dict[str, str]:
    found = {}
    for command in stage.of("LABEL"):
        pairs = list(command.value)
        for key, value in zip(pairs[::2], pairs[1::2], strict=True):
            found[key] = stage.expand(value.strip('"'))
    return found


# --- the checks ----------------------------------------------------------------------------------------


def is_pinned(image: str) -> bool:
    """An exact release: a digest, or a tag with an x.y.z version (``3.11.11-slim-bookworm``)."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:         # no tag at all (a registry port is not a tag)
        return False
    return tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag) is not None


def base_image_problems(stages: list[Stage]) -> list[str]:
    names = {stage.name for stage in stages if stage.name}
    problems = []
    if len(stages) < 2:
        problems.append("not multi-stage: the final image must not carry the build tools")
    for stage in stages:
        if stage.image not in names and not is_pinned(stage.image):
            problems.append(f"{stage.label()}: base image {stage.image!r} is not pinned to an exact x.y.z tag")
    return problems


def runtime_problems(final: Stage) -> list[str]:
    """The final stage: non-root numeric USER, exec-form ENTRYPOINT/CMD running balancer, a health check
    on the monitor port, the ports exposed."""
    problems = []
    users = final.of("USER")
    user = final.expand(users[-1].value[0]) if users else ""
    uid = user.split(":")[0]
    if not uid.isdigit() or int(uid) == 0:
        problems.append(f"USER must be a numeric non-root uid, got {user or 'none'!r}")
    command: list[str] = []
    for instruction in ("ENTRYPOINT", "CMD"):
        found = final.of(instruction)
        if found and not found[-1].json:
            problems.append(f"{instruction} is in shell form: {found[-1].original!r}")
        elif found:
            command += list(found[-1].value)
    if not any(command[i:i + len(COMMAND)] == COMMAND for i in range(len(command))):
        problems.append(f"ENTRYPOINT + CMD does not run {' '.join(COMMAND)!r}: {command}")
    checks = final.of("HEALTHCHECK")
    if not checks or checks[-1].value[0].upper() != "CMD":
        problems.append("no HEALTHCHECK")
    elif not checks[-1].json:
        problems.append("HEALTHCHECK is in shell form")
    elif f":{MONITOR_PORT}/healthz" not in " ".join(checks[-1].value):
        problems.append(f"HEALTHCHECK does not ask the monitor port's /healthz ({MONITOR_PORT})")
    exposed = {port.split("/")[0] for c in final.of("EXPOSE") for port in c.value}
    if not {"8080", str(MONITOR_PORT)} <= exposed:
        problems.append(f"EXPOSE must list 8080 and {MONITOR_PORT}, got {sorted(exposed)}")
    return problems


def layer_problems(stages: list[Stage]) -> list[str]:
    """Per stage: dependencies installed from the constraints file, before any source is copied; every
    pip install there uses the constraints file."""
    problems = []
    for stage in stages:
        commands = stage.commands
        installs = [i for i, c in enumerate(commands) if c.cmd == "RUN" and is_dependency_install(c)]
        if not installs:
            problems.append(f"{stage.label()}: no pip install from config/constraints.txt")
            continue
        for i, command in enumerate(commands):
            if command.cmd in ("COPY", "ADD") and copies_sources(command) and i < installs[0]:
                problems.append(f"{stage.label()}: {command.original!r} comes before the dependency install")
            if command.cmd == "RUN" and "pip install" in run_text(command) and not uses_constraints(command):
                problems.append(f"{stage.label()}: pip install without the constraints file: {command.original!r}")
    return problems


def wheel_problems(stages: list[Stage]) -> list[str]:
    """The final stage reads what it needs from earlier stages through RUN mounts, never a COPY --from
    (which would keep the wheel in a layer)."""
    final, problems = stages[-1], []
    for command in final.of("COPY", "ADD"):
        if any(flag.startswith("--from=") for flag in command.flags):
            problems.append(f"{command.original!r}: mount the build stage's output instead of copying it")
    earlier = {stage.name for stage in stages[:-1] if stage.name}
    if not any(m.get("from") in earlier or (m.get("type") == "cache" and ".whl" in run_text(run))
               for run in final.of("RUN") for m in mounts(run)):
        problems.append("the final stage mounts nothing from the build stage")
    return problems


def label_problems(final: Stage, project: dict[str, Any]) -> list[str]:
    found = labels(final)
    problems = [f"no org.opencontainers.image.{name} label" for name in OCI_LABELS
                if not found.get(f"org.opencontainers.image.{name}")]
    expected = {"version": project["version"], "licenses": project["license"], "title": project["name"]}
    for name, value in expected.items():
        actual = found.get(f"org.opencontainers.image.{name}")
        if actual and actual != value:
            problems.append(f"org.opencontainers.image.{name} is {actual!r}, pyproject.toml says {value!r}")
    return problems


def dockerfile_problems(path: Path, project: dict[str, Any] = PYPROJECT["project"]) -> list[str]:
    """Everything wrong with the Dockerfile at ``path``; empty when it is fine."""
    stages = read_stages(path)
    if not stages:
        return ["no FROM"]
    return [*base_image_problems(stages), *runtime_problems(stages[-1]), *layer_problems(stages),
            *wheel_problems(stages), *label_problems(stages[-1], project)]


# --- .dockerignore ---------------------------------------------------------------------------------------


def _pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus ``**``)."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out)


def is_ignored(path: str, dockerignore: str) -> bool:
    """Whether ``path`` (relative to the context) is left out of the build context: the last pattern
    that matches it, or one of its parent folders, decides; ``!`` patterns let it back in."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for line in dockerignore.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = _pattern(line.removeprefix("!").strip("/"))
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            ignored = not keep
    return ignored


def ignored_sources(path: Path, dockerignore: str) -> list[str]:
    return sorted({source for source in context_sources(read_stages(path)) if is_ignored(source, dockerignore)})


# --- config/constraints.txt ------------------------------------------------------------------------------


def read_pins(text: str) -> tuple[dict[str, Version], list[str]]:
    """(canonical name -> pinned version, problems): every line that is not a comment must be
    ``name==version``, each name once."""
    pins: dict[str, Version] = {}
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if not match:
            problems.append(f"line {number}: not an exact pin 'name==version': {line!r}")
            continue
        name = canonicalize_name(match[1])
        if name in pins:
            problems.append(f"line {number}: {name} pinned twice")
        pins[name] = Version(match[2])
    return pins, problems


def constraints_problems(text: str, dependencies: list[str]) -> list[str]:
    """Each of pyproject's dependencies (that applies here) pinned at a version its range allows."""
    pins, problems = read_pins(text)
    for line in dependencies:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement.name} is not pinned")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{requirement.name}=={pins[name]} is outside {requirement.specifier}")
    return problems


def installed_closure(dependencies: list[str]) -> set[str]:
    """The canonical names of ``dependencies`` and of everything they require, transitively, as the
    distributions installed here declare it (markers evaluated for this interpreter)."""
    seen: set[str] = set()
    queue = [(Requirement(line), "") for line in dependencies]
    while queue:
        requirement, extra = queue.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        extras = sorted(requirement.extras)
        if name in seen and not extras:
            continue
        seen.add(name)
        for wanted in importlib.metadata.requires(requirement.name) or []:
            queue += [(Requirement(wanted), e) for e in ["", *extras]]
    return seen


# --- the real files ----------------------------------------------------------------------------------------


def test_the_dockerfile_has_no_problems() -> None:
    """The Dockerfile passes every check below (each is shown to fail on a broken copy)."""
    assert dockerfile_problems(DOCKERFILE) == []


def test_the_base_image_is_the_python_the_project_supports() -> None:
    """Both stages run the same pinned CPython 3.11 or later (the compiled wheel's ABI is the build's)."""
    stages = read_stages(DOCKERFILE)
    assert len({stage.image for stage in stages}) == 1
    tag = stages[-1].image.rpartition(":")[2]
    major, minor = (int(part) for part in tag.split(".")[:2])
    assert (major, minor) >= (3, 11)


def test_constraints_pin_every_runtime_dependency_in_range() -> None:
    """config/constraints.txt pins each [project] dependency of pyproject.toml, within its range."""
    assert constraints_problems(CONSTRAINTS.read_text(), PYPROJECT["project"]["dependencies"]) == []


def test_constraints_cover_the_dependencies_of_the_dependencies() -> None:
    """Everything the runtime dependencies pull in (as installed here) is pinned too, so the image's
    --no-index install of the wheel finds it all."""
    pins, _ = read_pins(CONSTRAINTS.read_text())
    missing = installed_closure(PYPROJECT["project"]["dependencies"]) - set(pins)
    assert missing == set(), f"not pinned: {sorted(missing)}; regenerate (see the file's header)"


def test_the_build_context_has_every_file_the_dockerfile_reads() -> None:
    """.dockerignore lets in each file the Dockerfile COPYs or bind-mounts from the context."""
    assert ignored_sources(DOCKERFILE, (ROOT / ".dockerignore").read_text()) == []


# --- each check fails on a broken copy -----------------------------------------------------------------------


BROKEN = {
    "unpinned base": ("python:3.11.11-slim-bookworm", "python:3.11-slim", "is not pinned"),
    "latest base": ("python:3.11.11-slim-bookworm", "python:latest", "is not pinned"),
    "untagged base": ("python:3.11.11-slim-bookworm", "python", "is not pinned"),
    "root user": ("USER 10001:10001", "USER root", "numeric non-root uid"),
    "uid 0": ("USER 10001:10001", "USER 0", "numeric non-root uid"),
    "no user": ("USER 10001:10001", "", "numeric non-root uid"),
    "shell-form entrypoint": ('ENTRYPOINT ["/usr/bin/tini", "--", "balancer"]',
                              "ENTRYPOINT /usr/bin/tini -- balancer", "ENTRYPOINT is in shell form"),
    "shell-form cmd": ('CMD ["run", "-c", "/etc/balancer/balancer.yaml"]',
                       "CMD run -c /etc/balancer/balancer.yaml", "CMD is in shell form"),
    "another command": ('CMD ["run", "-c", "/etc/balancer/balancer.yaml"]', 'CMD ["check"]', "does not run"),
    "no health check": ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "no HEALTHCHECK"),
    "health check on admin": ("127.0.0.1:8082/healthz", "127.0.0.1:8081/healthz", "monitor port"),
    "monitor not exposed": ("EXPOSE 8080 8082", "EXPOSE 8080", "EXPOSE must list"),
    "sources before dependencies": ("COPY config/constraints.txt config/constraints.txt\n",
                                    "COPY balancer/ balancer/\nCOPY config/constraints.txt config/constraints.txt\n",
                                    "comes before the dependency install"),
    "whole context before dependencies": ("COPY config/constraints.txt config/constraints.txt\n",
                                          "COPY . .\n", "comes before the dependency install"),
    "build stage unpinned": ("pip install -r config/constraints.txt", "pip install aiohttp",
                             "build: no pip install from config/constraints.txt"),
    "final stage unpinned": ("pip install -r /tmp/config/constraints.txt", "pip install aiohttp",
                             "runtime: no pip install from config/constraints.txt"),
    "wheel without constraints": ("--no-index -c /tmp/config/constraints.txt", "--no-index",
                                  "pip install without the constraints file"),
    "wheel copied": ("RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \\",
                     "COPY --from=build /wheels /tmp/wheels\nRUN \\", "mount the build stage's output"),
    "no source label": ("org.opencontainers.image.source=", "org.opencontainers.image.origin=",
                        "no org.opencontainers.image.source label"),
    "stale version label": ("ARG VERSION=0.1.0", "ARG VERSION=0.0.9", "org.opencontainers.image.version is"),
    "wrong licence label": ('licenses="MIT"', 'licenses="GPL-3.0"', "org.opencontainers.image.licenses is"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_check_fails_on_a_broken_dockerfile(case: str, tmp_path: Path) -> None:
    """A copy of the Dockerfile with one thing broken is caught, with a message naming it."""
    old, new, expected = BROKEN[case]
    text = DOCKERFILE.read_text()
    assert old in text, f"the broken case {case!r} no longer applies to the Dockerfile"
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    problems = dockerfile_problems(broken)
    assert any(expected in problem for problem in problems), problems


def test_a_single_stage_dockerfile_is_refused(tmp_path: Path) -> None:
    """One stage means the compiler ships in the image."""
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:3.11.11-slim-bookworm\nRUN pip install -r constraints.txt\nUSER 1000\n")
    assert "not multi-stage: the final image must not carry the build tools" in dockerfile_problems(path)


@pytest.mark.parametrize(("image", "pinned"), [
    ("python:3.11.11-slim-bookworm", True), ("python@sha256:" + "0" * 64, True),
    ("registry:5000/python:3.11.11", True), ("python:3.11-slim", False), ("python:latest", False),
    ("python", False), ("registry:5000/python", False),
])
def test_what_counts_as_pinned(image: str, pinned: bool) -> None:
    """An exact x.y.z tag or a digest is pinned; a floating tag, latest or no tag is not."""
    assert is_pinned(image) is pinned


def test_the_dockerignore_check_fails_when_a_file_is_left_out() -> None:
    """A context file that .dockerignore leaves out (or lets back in) is seen."""
    ignore = "*\n!pyproject.toml\n!balancer\n**/__pycache__\n!config/docker.yaml\n"
    assert not is_ignored("balancer/", ignore)
    assert not is_ignored("config/docker.yaml", ignore)
    assert is_ignored("config/constraints.txt", ignore)
    assert is_ignored("setup.py", ignore)
    assert is_ignored("balancer/__pycache__", ignore)
    assert "config/constraints.txt" in ignored_sources(DOCKERFILE, ignore)
    assert ignored_sources(DOCKERFILE, ignore + "!config/constraints.txt\n!setup.py\n!README.md\n!backends\n") == []


@pytest.mark.parametrize(("text", "expected"), [
    ("aiohttp==3.14.5\n", "uvloop is not pinned"),
    ("aiohttp==3.10.0\nuvloop==0.23.0\n", "aiohttp==3.10.0 is outside"),
    ("aiohttp>=3.11\nuvloop==0.23.0\n", "not an exact pin"),
    ("aiohttp==3.14.5\nAioHTTP==3.14.5\nuvloop==0.23.0\n", "aiohttp pinned twice"),
])
def test_each_constraints_check_fails(text: str, expected: str) -> None:
    """A missing pin, a pin outside pyproject's range, a range instead of a pin, a name twice: each caught
    (names compared as PEP 503 normalises them)."""
    problems = constraints_problems(text, ["aiohttp>=3.11,<3.15", "uvloop>=0.19,<1",
                                           "async-timeout>=4; python_version < '3.11'"])
    assert any(expected in problem for problem in problems), problems


def test_names_are_compared_normalised() -> None:
    """prometheus_client and prometheus-client are one name (PEP 503)."""
    assert constraints_problems("prometheus_client==0.26.0\n", ["prometheus-client>=0.20,<1"]) == []
