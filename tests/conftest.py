"""Shared helpers: tiny configs that train in a second, and the console script run as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from flowvae.app import register_configs

# A run small enough for the default suite: 200 events of 3x10, two epochs, a narrow network.
TINY = [
    "data.n_train=200", "data.n_test=200", "data.n_particles=10", "model.hidden=[32]", "model.latent_dim=4",
    "train.epochs=2", "train.batch_size=50", "eval.n_samples=200", "eval.bins=20", "train.threads=1",
    "train.progress=log",
]


def flowvae_command() -> list[str]:
    exe = shutil.which("flowvae", path=os.path.dirname(sys.executable)) or shutil.which("flowvae")
    return [exe] if exe else [sys.executable, "-m", "flowvae.cli"]


def run_flowvae(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run ``flowvae ARGS`` in ``cwd`` and return the CompletedProcess (text, both streams captured)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([*flowvae_command(), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def compose_config(*overrides: str) -> DictConfig:
    """The config ``flowvae train OVERRIDES`` composes, without running anything."""
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


def require_extra(module: str, extra: str):
    """Import an optional extra's module for its tests: skipped where the extra is not installed, but never in CI
    (``CI=true``, where ``make test`` installs every extra), so a broken install cannot pass as skipped tests."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"the `{extra}` extra (make installs it)")


def stop_after_step(monkeypatch, at_step: int):
    """A callback whose ``should_stop`` turns true once fit's training step has run ``at_step`` times (counting
    from 1)."""
    from flowvae.training import loop as train_module
    from flowvae.training.callbacks import Callback

    make_step = train_module.make_step
    calls = {"n": 0}

    def patched(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def counting(batch, beta):
            calls["n"] += 1
            return step(batch, beta)

        return counting

    class StopAfter(Callback):
        def should_stop(self) -> bool:
            return calls["n"] >= at_step

    monkeypatch.setattr(train_module, "make_step", patched)
    return StopAfter()


def wait_until(condition, what: str, timeout: float = 300, process=None, poll: float = 0.05) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` when ``process`` (a Popen) ends first, or when
    ``timeout`` seconds pass. A condition, not a fixed sleep: a busy machine only waits longer (the timeout is far
    beyond any real wait), a fast one goes on at once."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended (exit code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(poll)


def stopped_and_whole_rows(monkeypatch, tmp_path: Path, settings: list[str]):
    """The rows of ``flowvae train SETTINGS`` stopped by SIGTERM after its first epoch and then run again (in
    ``tmp_path/stopped``), and of the same run never stopped (``tmp_path/whole``): (resumed, uninterrupted)."""
    import signal

    import pandas as pd

    from flowvae import stopping
    from flowvae.run import experiment, job

    original = experiment.write_curves

    def sigterm(path, history):
        original(path, history)
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(experiment, "write_curves", sigterm)
        cfg = compose_config(*settings, f"results_csv={tmp_path / 'stopped.csv'}")
        assert job.run(cfg, tmp_path / "stopped", tmp_path) == job.EXIT_INTERRUPTED
    stopping.reset()
    assert job.run(cfg, tmp_path / "stopped", tmp_path) == 0
    stopping.reset()
    whole = compose_config(*settings, f"results_csv={tmp_path / 'whole.csv'}")
    assert job.run(whole, tmp_path / "whole", tmp_path) == 0
    stopping.reset()
    return pd.read_csv(tmp_path / "stopped.csv").iloc[0], pd.read_csv(tmp_path / "whole.csv").iloc[0]
