"""The command line: exit statuses and messages of check and run."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def balancer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balancer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_check_prints_the_effective_config_and_exits_0() -> None:
    """`balancer check` on the default file: 0, and every default written out."""
    done = balancer("check", "-c", "config/balancer.yaml")
    assert done.returncode == 0
    assert "max_idle: 32" in done.stdout and "acquire_timeout: 5s" in done.stdout
    assert "is valid" in done.stderr


def test_check_and_run_refuse_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    """A bad value: the FILE:LINE: path message and exit status 2, for check and for run."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  web:\n    health: {rise: two}\n    servers: [{address: 127.0.0.1:9}]\n")
    for command in ("check", "run"):
        done = balancer(command, "-c", str(bad))
        assert done.returncode == 2
        assert f"{bad}:3: pools.web.health.rise: expected an integer >= 1, got 'two'" in done.stderr


def test_run_on_a_taken_port_exits_1_and_leaves_no_worker(tmp_path: Path) -> None:
    """The data port already in use: exit status 1 with the reason; the spawned worker is stopped."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "b.yaml"
        config.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                          "pools: {web: {spawn: {command: [python, -m, backends], count: 1}}}\n")
        done = balancer("run", "-c", str(config))
    assert done.returncode == 1
    assert "cannot start" in done.stderr and "address already in use" in done.stderr.lower()
    assert "worker web/1" in done.stderr and "exited" in done.stderr
