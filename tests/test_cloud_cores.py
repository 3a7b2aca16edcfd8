"""The cores the server sizes its sessions on: the process's grant (affinity, cgroup CPU quota)."""

from __future__ import annotations

import os
from pathlib import Path

from tandem.cloud.config import ServerConfig
from tandem.cloud.cores import available_cores, cgroup_cpu_quota


def _tree(root: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "proc_cgroup").write_text(proc)
    return root / "cg", root / "proc_cgroup"


def test_cgroup_v2_quota_of_the_process_or_an_ancestor(tmp_path: Path) -> None:
    cg, proc = _tree(tmp_path, {
        "cg/cpu.max": "max 100000\n",
        "cg/kubepods/cpu.max": "300000 100000\n",
        "cg/kubepods/pod1/cpu.max": "150000 100000\n",
        "cg/kubepods/pod1/c1/cpu.max": "max 100000\n",
    }, "0::/kubepods/pod1/c1\n")
    assert cgroup_cpu_quota(cg, proc) == 1.5
    assert available_cores(cg, proc) == min(2, len(os.sched_getaffinity(0)))  # rounded up


def test_cgroup_v2_inside_a_namespace_and_v1(tmp_path: Path) -> None:
    cg, proc = _tree(tmp_path / "v2", {"cg/cpu.max": "200000 100000\n"}, "0::/\n")
    assert cgroup_cpu_quota(cg, proc) == 2.0
    cg, proc = _tree(tmp_path / "v1", {
        "cg/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "cg/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        "cg/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cg/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_quota(cg, proc) == 0.5
    assert available_cores(cg, proc) == 1


def test_no_quota_or_unreadable_files_leave_the_affinity(tmp_path: Path) -> None:
    cg, proc = _tree(tmp_path, {"cg/cpu.max": "max 100000\n", "cg/a/cpu.max": "garbage\n"}, "0::/a\n")
    assert cgroup_cpu_quota(cg, proc) is None
    assert available_cores(cg, proc) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing_proc") is None


def test_sessions_are_sized_on_the_cores_granted() -> None:
    assert ServerConfig(repository="/r", cores=8, workers=2).threads_per_session() == 4
    assert ServerConfig(repository="/r", cores=1, instances=2).threads_per_session() == 1
    granted = available_cores()
    assert ServerConfig(repository="/r").threads_per_session() == granted
    assert ServerConfig(repository="/r", cores=8, intra_op_threads=3).threads_per_session() == 3
