"""How many CPU cores this server may use: what the OS grants the process, not what the host has.

Why: in a container with a CPU limit (Kubernetes ``resources.limits.cpu: 2`` on a 64-core node)
``os.cpu_count()`` says 64. onnxruntime sessions sized on that run 64 threads on a quota of 2
cores, and the kernel throttles the whole pod each period: the thread oversubscription Triton
users report most on CPU. The grant is the smaller of the CPU affinity mask (``taskset``,
cpusets) and the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cores", "cgroup_cpu_quota"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cores(cgroup_root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Cores this process may keep busy (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The tightest CPU quota (in cores) on this process's cgroup and its ancestors; None: no quota."""
    quotas = [q for d in _cgroup_dirs(cgroup_root, proc_cgroup) if (q := _quota_in(d)) is not None]
    return min(quotas) if quotas else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup directories with every ancestor up to the root (v2 and v1 cpu)."""
    own: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:  # cgroup v2
            own.append(root / path.lstrip("/"))
        elif "cpu" in controllers.split(","):  # cgroup v1, mounted as cpu or cpu,cpuacct
            own += [root / "cpu" / path.lstrip("/"), root / "cpu,cpuacct" / path.lstrip("/")]
    dirs: list[Path] = []
    for d in own:
        while root in d.parents:  # the directory, then each ancestor below the mount
            dirs.append(d)
            d = d.parent
    # The mounts' tops too: inside a cgroup namespace (or without /proc/self/cgroup) they are the
    # container's own cgroup.
    dirs += [root, root / "cpu", root / "cpu,cpuacct"]
    return list(dict.fromkeys(dirs))


def _quota_in(directory: Path) -> float | None:
    try:
        fields = (directory / "cpu.max").read_text().split()  # v2: "max 100000" or "200000 100000"
        if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0:
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())  # v1: -1 = none
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
