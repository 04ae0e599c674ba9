"""How many cores this process may use, and each parallel job's share of them (no heavy imports: the CLI uses it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["usable_cores", "choose_threads", "training_threads", "trains_on_one_thread", "torch_threads", "cpu_name",
           "ONE_THREAD_STEPS"]

# Models whose training step ran fastest on one intra-op thread at every batch size measured: the conditional
# flow's step is hundreds of small operations, and with the waiting policy flowvae sets (see flowvae.cli) each one
# split among threads waits for a sleeping thread to wake. 2-core Xeon VM, torch 2.13: 22 ms a step on 1 thread,
# 38 on 2 (batch 100); 48-54 against 67 µs a jet at batch 1,000; and spinning threads, which wake for free, made
# 2 threads only 1.18x faster than 1 (docs/speed.md).
ONE_THREAD_STEPS = ("conditional_flow",)


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


def trains_on_one_thread(requested: int, model: str, device_type: str) -> bool:
    """Whether a run trains on one thread by flowvae's choice: ``train.threads=0`` (auto), a model of
    :data:`ONE_THREAD_STEPS`, on the CPU. An explicit ``train.threads`` is always what the steps get."""
    return requested == 0 and model in ONE_THREAD_STEPS and device_type == "cpu"


def training_threads(requested: int, threads: int, model: str, device_type: str) -> int:
    """The intra-op threads of the training steps: one where :func:`trains_on_one_thread`, else the run's
    ``threads`` (generation and scoring keep ``threads`` either way)."""
    return 1 if trains_on_one_thread(requested, model, device_type) else threads


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside, and back to what they were after."""
    import torch

    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
