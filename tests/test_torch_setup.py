"""How a run sets torch up: each parallel job's share of the cores, and subnormal floats flushed to zero."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flowvae.cores import choose_threads, torch_threads, training_threads, usable_cores
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


def test_training_threads_are_one_for_the_conditional_flow_on_the_cpu_only_when_left_to_flowvae():
    assert training_threads(0, 2, "conditional_flow", "cpu") == 1
    assert training_threads(2, 2, "conditional_flow", "cpu") == 2  # an explicit train.threads wins
    assert training_threads(0, 2, "default", "cpu") == 2
    assert training_threads(0, 2, "conditional_flow", "cuda") == 2


def test_torch_threads_sets_them_inside_and_restores_them_after_even_on_an_error():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with pytest.raises(KeyError):
        with torch_threads(other):
            assert torch.get_num_threads() == other
            raise KeyError
    assert torch.get_num_threads() == before


def test_a_conditional_flow_run_trains_on_one_thread_and_generates_and_scores_on_its_cores(monkeypatch, tmp_path,
                                                                                            caplog):
    """train.threads=0 on 2 cores: fit runs at one thread, generation and scoring at two (the log says so); with
    train.threads=2 everything runs at two."""
    import logging

    import flowvae.cores
    from flowvae.data.events import load_events
    from flowvae.files import RunFiles
    from flowvae.run import experiment
    from tests.conftest import compose_config

    monkeypatch.setattr(flowvae.cores, "usable_cores", lambda: 2)
    seen = []

    def recording(name, function):
        def wrapped(*args, **kwargs):
            seen.append((name, torch.get_num_threads()))
            return function(*args, **kwargs)
        monkeypatch.setattr(experiment, name, wrapped)

    for name in ("fit", "generate_for_scoring", "score_events"):
        recording(name, getattr(experiment, name))
    data = Path(__file__).resolve().parent / "data" / "gluon_30p_slice.npz"
    threads = torch.get_num_threads()
    try:
        for requested, expected in ((0, [("fit", 1), ("generate_for_scoring", 2), ("score_events", 2)]),
                                    (2, [("fit", 2), ("generate_for_scoring", 2), ("score_events", 2)])):
            seen.clear()
            cfg = compose_config("model=conditional_flow", "data=jetnet", f"data.path={data}", "model.hidden=[16]",
                                 "model.latent_dim=4", "model.coupling_layers=2", "train.epochs=1",
                                 "train.batch_size=100", "eval.n_samples=200", "eval.bins=10",
                                 f"train.threads={requested}", "train.progress=log")
            (tmp_path / str(requested)).mkdir()
            with caplog.at_level(logging.INFO, logger="flowvae.run.experiment"):
                status, message, _ = experiment.train_and_score(cfg, load_events(cfg.data),
                                                                RunFiles(tmp_path / str(requested)))
            assert status == "ok", message
            assert seen == expected
            said = "training on 1 thread (model=conditional_flow's step is fastest there" in caplog.text
            assert said == (requested == 0)
            caplog.clear()
    finally:
        torch.set_num_threads(threads)
