"""How many cores this process may use, and each parallel job's share of them (no heavy imports: the CLI uses it)."""

from __future__ import annotations

import os

__all__ = ["usable_cores", "choose_threads", "cpu_name"]


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a SLURM or taskset limit), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; elsewhere what platform knows), for benchmark reports:
    an absolute time means little without the CPU beside it."""
    import platform

    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_threads(requested: int, parallel_jobs: int) -> int:
    """``train.threads``, or (0) this process's cores shared evenly among the jobs running side by side."""
    if requested > 0:
        return requested
    return max(1, usable_cores() // max(1, parallel_jobs))
