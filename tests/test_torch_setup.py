"""How a run sets torch up: each parallel job's share of the cores, and subnormal floats flushed to zero."""

from __future__ import annotations

import os

import pytest
import torch

from flowvae.cores import choose_threads, usable_cores
from flowvae.run.preflight import configure_torch


def test_threads_are_the_usable_cores_shared_among_jobs(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert usable_cores() == 6
    assert choose_threads(0, 1) == 6
    assert choose_threads(0, 4) == 1  # 6 // 4
    assert choose_threads(0, 12) == 1  # never 0
    assert choose_threads(3, 12) == 3  # an explicit train.threads wins


def test_configure_torch_flushes_subnormals_to_zero():
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    torch.set_flush_denormal(False)
    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    assert (subnormal * 1.0).item() != 0.0
    try:
        configure_torch(1)
        assert torch.get_num_threads() == 1
        assert (subnormal * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_num_threads(threads)
