"""balancer.config.cpus: the CPUs `processes: auto` starts, from fake cgroup v1/v2 trees in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from balancer.config.cpus import available_cpus, cgroup_cpu_limit


def affinity() -> int:
    """What the machine running the test lets this process use (the other bound of the minimum)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class FakeHost:
    """A cgroup mount and a /proc/self under tmp_path, written file by file."""

    def __init__(self, tmp_path: Path) -> None:
        self.cgroup = tmp_path / "sys-fs-cgroup"
        self.proc = tmp_path / "proc-self"
        self.cgroup.mkdir()
        self.proc.mkdir()

    def write(self, relative: str, text: str) -> None:
        path = self.cgroup / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def member_of(self, *lines: str) -> None:
        (self.proc / "cgroup").write_text("".join(line + "\n" for line in lines))

    def cpus(self) -> int:
        return available_cpus(str(self.cgroup), str(self.proc))

    def limit(self) -> float | None:
        return cgroup_cpu_limit(str(self.cgroup), str(self.proc))


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_v2_quota(host: FakeHost) -> None:
    """cgroup v2 `cpu.max` "100000 100000" is one CPU, whatever the machine has."""
    host.member_of("0::/")
    host.write("cpu.max", "100000 100000\n")
    assert host.limit() == 1.0
    assert host.cpus() == 1


def test_v2_max_is_no_limit(host: FakeHost) -> None:
    """`cpu.max` "max 100000" sets no quota: the affinity mask decides."""
    host.member_of("0::/")
    host.write("cpu.max", "max 100000\n")
    assert host.limit() is None
    assert host.cpus() == affinity()


def test_v1_quota(host: FakeHost) -> None:
    """cgroup v1 `cpu.cfs_quota_us` 50000 over a 100000 period is half a CPU: rounded up to 1."""
    host.member_of("3:cpu,cpuacct:/", "0::/")
    host.write("cpu/cpu.cfs_quota_us", "50000\n")
    host.write("cpu/cpu.cfs_period_us", "100000\n")
    assert host.limit() == 0.5
    assert host.cpus() == 1


def test_v1_minus_one_is_no_limit(host: FakeHost) -> None:
    """A v1 quota of -1 means none."""
    host.member_of("3:cpu,cpuacct:/")
    host.write("cpu/cpu.cfs_quota_us", "-1\n")
    host.write("cpu/cpu.cfs_period_us", "100000\n")
    assert host.limit() is None
    assert host.cpus() == affinity()


def test_no_cgroup_files_at_all(host: FakeHost) -> None:
    """No cgroup files and no /proc/self/cgroup (not Linux, or not mounted): the affinity mask alone."""
    assert host.limit() is None
    assert host.cpus() == affinity()


def test_fractional_quota_rounds_up(host: FakeHost) -> None:
    """150000/100000 is 1.5 CPUs: two processes (if the affinity mask allows two)."""
    host.member_of("0::/")
    host.write("cpu.max", "150000 100000\n")
    assert host.limit() == 1.5
    assert host.cpus() == min(2, affinity())


def test_the_smaller_bound_wins(host: FakeHost) -> None:
    """A quota above the CPUs the process may run on does not raise the count past the affinity mask."""
    host.member_of("0::/")
    host.write("cpu.max", "6400000 100000\n")
    assert host.limit() == 64.0
    assert host.cpus() == min(64, affinity())


def test_never_below_one(host: FakeHost) -> None:
    """A tenth of a CPU still runs one process."""
    host.member_of("0::/")
    host.write("cpu.max", "10000 100000\n")
    assert host.cpus() == 1


def test_own_cgroup_and_its_ancestors(host: FakeHost) -> None:
    """The cgroup /proc/self/cgroup names is read, and each ancestor's limit holds too (a pod's limit
    above an unlimited container)."""
    host.member_of("0::/kubepods/pod-a/container-b")
    host.write("kubepods/pod-a/container-b/cpu.max", "max 100000\n")
    host.write("kubepods/pod-a/cpu.max", "200000 100000\n")
    host.write("kubepods/cpu.max", "400000 100000\n")
    host.write("cpu.max", "max 100000\n")
    assert host.limit() == 2.0


def test_the_smallest_limit_on_the_path_wins(host: FakeHost) -> None:
    """A container's own tighter limit under its pod's wins; a sibling cgroup's limit does not count."""
    host.member_of("0::/kubepods/pod-a/container-b")
    host.write("kubepods/pod-a/container-b/cpu.max", "50000 100000\n")
    host.write("kubepods/pod-a/cpu.max", "200000 100000\n")
    host.write("kubepods/pod-z/cpu.max", "10000 100000\n")
    assert host.limit() == 0.5


def test_named_cgroup_missing_falls_back_to_the_root(host: FakeHost) -> None:
    """Inside a container the path named is often not under the mount (its root is the container's
    cgroup): the root's limit is read."""
    host.member_of("0::/system.slice/docker-abc.scope")
    host.write("cpu.max", "300000 100000\n")
    assert host.limit() == 3.0


def test_v1_controller_path(host: FakeHost) -> None:
    """v1: the path is the one of the hierarchy that has the `cpu` controller, under the cpu mount."""
    host.member_of("4:memory:/other", "2:cpu,cpuacct:/docker/abc", "1:name=systemd:/docker/abc")
    host.write("cpu/docker/abc/cpu.cfs_quota_us", "250000\n")
    host.write("cpu/docker/abc/cpu.cfs_period_us", "100000\n")
    host.write("cpu/cpu.cfs_quota_us", "-1\n")
    host.write("cpu/cpu.cfs_period_us", "100000\n")
    assert host.limit() == 2.5


def test_v1_cpu_controller_not_cpuacct(host: FakeHost) -> None:
    """A hierarchy with only `cpuacct` is not the one with the quota: the `cpu` line's path is read."""
    host.member_of("2:cpuacct:/accounting", "1:cpu:/limited")
    host.write("cpu/accounting/cpu.cfs_quota_us", "-1\n")
    host.write("cpu/accounting/cpu.cfs_period_us", "100000\n")
    host.write("cpu/limited/cpu.cfs_quota_us", "100000\n")
    host.write("cpu/limited/cpu.cfs_period_us", "100000\n")
    assert host.limit() == 1.0


def test_hybrid_v1_and_v2_both_read(host: FakeHost) -> None:
    """Both hierarchies present (hybrid mode): the smaller quota wins."""
    host.member_of("2:cpu,cpuacct:/", "0::/")
    host.write("cpu.max", "300000 100000\n")
    host.write("cpu/cpu.cfs_quota_us", "100000\n")
    host.write("cpu/cpu.cfs_period_us", "100000\n")
    assert host.limit() == 1.0


@pytest.mark.parametrize("content", ["", "garbage\n", "100000\n", "0 100000\n", "100000 0\n", "1 2 3\n"])
def test_unreadable_cpu_max_is_no_limit(host: FakeHost, content: str) -> None:
    """A file that is empty or not two positive numbers sets no limit (and nothing raises)."""
    host.member_of("0::/")
    host.write("cpu.max", content)
    assert host.limit() is None
    assert host.cpus() == affinity()


def test_defaults_read_this_machine() -> None:
    """With the real /sys/fs/cgroup and /proc/self: a count between 1 and the affinity mask."""
    assert 1 <= available_cpus() <= affinity()
