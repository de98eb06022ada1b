"""How many CPUs this process may use: what ``processes: auto`` starts.

``os.cpu_count()`` counts the machine's cores. In a container limited to two CPUs on a 64-core node
that is 64 proxy processes sharing two CPUs' worth of time: each gets throttled, latency climbs, and
nothing is gained. Two things can hold a process to fewer CPUs, and the smaller one wins:

- the **CPU affinity mask** (``taskset``, ``docker run --cpuset-cpus``, Kubernetes' static CPU
  manager): the CPUs it may be scheduled on, ``os.sched_getaffinity(0)``;
- the **CFS quota** of its cgroup (``docker run --cpus``, Kubernetes' ``limits.cpu``): CPU time per
  period. cgroup v2 writes it as ``"QUOTA PERIOD"`` (or ``"max PERIOD"``: none) in ``cpu.max``;
  cgroup v1 as ``cpu.cfs_quota_us`` (``-1``: none) and ``cpu.cfs_period_us`` under the ``cpu``
  controller's folder. A quota of 1.5 CPUs is rounded up to 2: one process per whole CPU would leave
  half a CPU unused.

The process's cgroup is the path ``/proc/self/cgroup`` names (``0::PATH`` for v2, ``N:cpu,...:PATH``
for v1). A limit on any ancestor also holds, so every folder from that cgroup up to the root is read
and the smallest quota wins. Inside a container the root usually *is* the container's cgroup (a cgroup
namespace, or v1's bind mount), and the path named may not exist under it: then only the root is read.
Files that are missing or unreadable mean "no limit there"; this never raises.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_limit"]


def available_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self") -> int:
    """CPUs this process may use: the smaller of its cgroup's CPU quota (rounded up) and its affinity
    mask (``os.cpu_count()`` where there is no affinity call); at least 1."""
    count = _affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_self)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)


def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup", proc_self: str = "/proc/self") -> float | None:
    """The CPU quota, in CPUs (``1.5`` for 150000/100000), of this process's cgroup and its ancestors,
    v2 and v1 both read; ``None`` when none of them sets one."""
    root = Path(cgroup_root)
    v2_path, v1_path = _own_cgroups(Path(proc_self) / "cgroup")
    limits = [_cpu_max(folder) for folder in _lineage(root, v2_path)]
    limits += [_cfs_quota(folder) for folder in _lineage(root / "cpu", v1_path)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # no such call off Linux
        return os.cpu_count() or 1


def _own_cgroups(cgroup_file: Path) -> tuple[str, str]:
    """(v2 path, v1 ``cpu`` controller path) from ``/proc/self/cgroup``; ``/`` for what it does not name."""
    v2 = v1 = "/"
    for line in _read(cgroup_file).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _lineage(base: Path, path: str) -> list[Path]:
    """The folder of ``path`` under ``base`` and each of its parents up to ``base``; just ``base`` when
    that folder does not exist there (the root is the container's own cgroup)."""
    names = [name for name in path.split("/") if name not in ("", ".", "..")]
    folders = [base.joinpath(*names[:depth]) for depth in range(len(names), -1, -1)]
    return folders if folders[0].is_dir() else [base]


def _cpu_max(folder: Path) -> float | None:
    """cgroup v2: ``cpu.max`` is ``"QUOTA PERIOD"`` or ``"max PERIOD"``."""
    fields = _read(folder / "cpu.max").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _cfs_quota(folder: Path) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` (``-1`` = none) over ``cpu.cfs_period_us``."""
    return _ratio(_read(folder / "cpu.cfs_quota_us").strip(), _read(folder / "cpu.cfs_period_us").strip())


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
