"""Unattended runs through the console script: refused configs, skip-existing, divergence, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import flowvae_command, run_flowvae, wait_until


def _args(tmp_path, tiny, run_dir, *overrides):
    return ["train", *tiny, f"hydra.run.dir={tmp_path / run_dir}", f"results_csv={tmp_path / 'results.csv'}",
            *overrides]


def _start_until_checkpoint(tmp_path, args, run_dir: str, **popen):
    """Start ``flowvae ARGS`` and return (process, checkpoint path) once its first checkpoint exists."""
    proc = subprocess.Popen([*flowvae_command(), *args], cwd=tmp_path, **popen)
    checkpoint = tmp_path / run_dir / "checkpoint.pt"
    try:
        wait_until(checkpoint.exists, "first checkpoint", process=proc)
    except BaseException:
        proc.kill()
        raise
    return proc, checkpoint


@pytest.fixture
def finished(tmp_path, tiny):
    """A results table with one ok row, and its bytes."""
    out = run_flowvae(_args(tmp_path, tiny, "first"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    return (tmp_path / "results.csv").read_bytes()


@pytest.mark.parametrize("override, key", [
    ("data.sigma=[0.5,0,0.5]", "data.sigma"),
    ("train.lr=0", "train.lr"),
    ("flow=orthogonal flow.num_ortho_vecs=5", "flow.num_ortho_vecs"),
    ("flow=bogus", "flow"),
    ("train.batch_size=abc", "train.batch_size"),
])
def test_bad_configuration_exits_2_and_leaves_the_table_alone(tmp_path, tiny, finished, override, key):
    out = run_flowvae(_args(tmp_path, tiny, "bad", *override.split()), cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert key in text and "Traceback" not in text
    assert (tmp_path / "results.csv").read_bytes() == finished


def test_skip_existing_adds_nothing_and_exits_0(tmp_path, tiny, finished):
    out = run_flowvae(_args(tmp_path, tiny, "again", "skip_existing=true"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipped" in out.stdout
    assert (tmp_path / "results.csv").read_bytes() == finished
    # n_flows = 0 of another flow type is the same run: skipped too.
    out = run_flowvae(_args(tmp_path, tiny, "iaf0", "skip_existing=true", "flow=iaf"), cwd=tmp_path)
    assert out.returncode == 0 and "skipped" in out.stdout
    assert (tmp_path / "results.csv").read_bytes() == finished


def test_divergence_is_a_row_with_status_diverged_and_exit_1(tmp_path, tiny):
    out = run_flowvae(_args(tmp_path, tiny, "nan", "train.lr=1e8", "data.mu=1e4", "flow=iaf", "n_flows=2"),
                      cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["status"] == "diverged" and "epoch" in row["error"]
    assert pd.isna(row["kl_sum"])


@pytest.mark.slow
def test_sigkill_leaves_no_row_and_a_rerun_resumes_to_the_same_numbers(tmp_path, tiny):
    long = [*tiny, "train.epochs=400"]  # ~2 s of training: a fast machine is still in it when the kill comes
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = _args(tmp_path, long, "killed")
    proc, checkpoint = _start_until_checkpoint(tmp_path, args, "killed", env=env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert checkpoint.exists()
    assert not (tmp_path / "results.csv").exists()

    resumed = run_flowvae(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    uninterrupted = run_flowvae(_args(tmp_path, long, "whole"), cwd=tmp_path)
    assert uninterrupted.returncode == 0
    table = pd.read_csv(tmp_path / "results.csv")
    assert len(table) == 2
    assert table.loc[0, "resumed_from"] > 0 and table.loc[0, "epochs_run"] < 400
    metrics = [c for c in table.columns if c.startswith(("kl_", "w1_", "final_"))]
    assert (table.loc[0, metrics] == table.loc[1, metrics]).all()


def test_sigterm_saves_a_checkpoint_and_exits_3(tmp_path, tiny):
    args = _args(tmp_path, [*tiny, "train.epochs=400"], "term")
    proc, checkpoint = _start_until_checkpoint(tmp_path, args, "term", stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, output
    assert "SIGTERM" in output and "resume" in output
    assert checkpoint.exists() and not (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_sigterm_to_a_joblib_sweeps_parent_stops_its_workers(tmp_path, tiny):
    """Only the parent is signalled (as `kill PID` does): it passes SIGTERM on, no worker outlives it, and the
    interrupted jobs say so in their status files."""
    import json

    import psutil

    args = ["train", "-m", *tiny, "train.epochs=400", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_csv={tmp_path / 'results.csv'}", "seed=0,1,2,3"]
    proc = subprocess.Popen([*flowvae_command(), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: len(list((tmp_path / "sweep").glob("*/checkpoint.pt"))) >= 2, "two checkpoints",
                   process=proc, poll=0.1)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, output
    gone, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive, [p.cmdline() for p in alive]
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/status.json")]
    assert statuses and all(s["status"] == "interrupted" and s["exit_code"] == 3 for s in statuses)
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("gap", [0.0, 0.5])
def test_a_double_ctrl_c_exits_3_and_the_status_file_agrees(tmp_path, tiny, gap):
    """Two Ctrl-Cs, at once or after the run has already stopped at a step: exit 3 either way, never 130."""
    import json

    args = _args(tmp_path, [*tiny, "train.epochs=400"], "twice")
    proc, checkpoint = _start_until_checkpoint(tmp_path, args, "twice", stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGINT)
    time.sleep(gap)  # either way the outcome is the same: the gap only picks which path the second one takes
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    assert proc.wait(300) == 3
    status = json.loads((tmp_path / "twice" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["exit_code"] == 3
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.parametrize("override", ["n_flows=-1", "data=npy data.path=missing.npy", "results_csv=wrongkey.npz"])
def test_a_refused_run_exits_2_with_one_line_and_leaves_nothing_behind(tmp_path, tiny, override):
    """No run folder with a status `invalid`, no lock beside a results table that is not there or is not one:
    only the (empty) folder Hydra's run directories go in."""
    import numpy as np

    np.savez(tmp_path / "wrongkey.npz", particle_features=np.zeros((10, 3, 5)))
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    out = run_flowvae(["train", *tiny, f"results_csv={tmp_path / 'results.csv'}", *override.split()], cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert [line for line in text.splitlines() if line.strip()] == [next(line for line in text.splitlines()
                                                                        if "bad configuration" in line)]
    assert {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} - before == {Path("outputs"), Path("outputs/runs")}
    if override.startswith("results_csv"):
        assert "wrongkey.npz is not a flowvae results table" in text and "codec" not in text


def test_the_same_command_after_ctrl_c_resumes_the_interrupted_run(tmp_path, tiny):
    """As cron or a user types it again: no hydra.run.dir, so Hydra makes a new folder; the run goes on in the
    interrupted one, says so, and leaves one folder with one row."""
    args = ["train", *tiny, "train.epochs=200", f"results_csv={tmp_path / 'results.csv'}"]
    proc = subprocess.Popen([*flowvae_command(), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    runs = tmp_path / "outputs" / "runs"
    try:
        wait_until(lambda: any(runs.glob("*/checkpoint.pt")), "first checkpoint", process=proc)
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    assert proc.wait(300) == 3
    (interrupted,) = runs.iterdir()

    again = run_flowvae(args, cwd=tmp_path)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text
    assert f"resuming the interrupted run of this config in {interrupted}" in text
    assert list(runs.iterdir()) == [interrupted]
    (row,) = pd.read_csv(tmp_path / "results.csv").to_dict("records")
    assert row["status"] == "ok" and row["run_dir"] == str(interrupted)
    assert 0 < row["resumed_from"] < 200 and row["resumed_from"] + row["epochs_run"] == 200
    log = (interrupted / "train.log").read_text()  # one log: the interruption, the resume, the end
    assert log.index("SIGINT received") < log.index("resuming the interrupted run") < log.index("ok: kl_sum")


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], []],
                         ids=["joblib", "basic"])
def test_a_sweep_trains_each_config_once(tmp_path, tiny, launcher):
    """n_flows = 0 is one config whatever the flow: in a sweep, even without skip_existing, one job trains it and
    the other takes its row (skipped) — in parallel it waits for it first; the table gets one row."""
    out = run_flowvae(["train", "-m", *tiny, "flow=planar,iaf", "n_flows=0", *launcher,
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_csv={tmp_path / 'results.csv'}"],
                      cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "sweep finished: 1 ok, 1 skipped" in text
    (row,) = pd.read_csv(tmp_path / "results.csv").to_dict("records")
    statuses = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/status.json")}
    trained = next(name for name, status in statuses.items() if status["status"] == "ok")
    assert row["status"] == "ok" and row["run_dir"] == str(tmp_path / "sweep" / trained)
    (skipped,) = (status for status in statuses.values() if status["status"] == "skipped")
    assert row["run_dir"] in skipped["message"]
