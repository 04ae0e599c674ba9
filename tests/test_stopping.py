"""Stop requests at every phase of a run: exit 3, a status.json that says so, no row, a checkpoint to resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from flowvae import metrics, stopping
from flowvae.files import RunFiles
from flowvae.run import experiment, job, preflight
from tests.conftest import TINY, compose_config


@pytest.fixture(autouse=True)
def _fresh_stop_state():
    stopping.reset()
    yield
    stopping.reset()


def test_sigterm_and_a_first_ctrl_c_set_the_flag_a_second_ctrl_c_stops_at_once():
    stopping.install()
    assert not stopping.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stopping.received() == "SIGTERM"
    with pytest.raises(stopping.Interrupted, match="stopped by SIGTERM while testing"):
        stopping.check("while testing")
    stopping.reset()
    stopping.install()
    os.kill(os.getpid(), signal.SIGINT)
    assert stopping.received() == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs between bytecodes; it must have raised by now


def test_sigterm_is_passed_on_to_child_processes():
    stopping.install()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        assert child.wait(120) == -signal.SIGTERM
    finally:
        child.kill()


def _run(tmp_path, name="run", *overrides):
    cfg = compose_config(*TINY, f"results_csv={tmp_path / 'results.csv'}", *overrides)
    return job.run(cfg, tmp_path / name, tmp_path), RunFiles(tmp_path / name)


def _status(files: RunFiles) -> dict:
    return json.loads(files.status.read_text())


def _sigterm_during(monkeypatch, module, name):
    """Make ``module.name`` send SIGTERM to this process before it returns."""
    original = getattr(module, name)

    def signalling(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(module, name, signalling)


def test_sigterm_before_training_is_exit_3_with_a_status_and_no_row(tmp_path, monkeypatch):
    _sigterm_during(monkeypatch, preflight, "load_events")  # the checks before work load the data
    code, files = _run(tmp_path)
    assert code == job.EXIT_INTERRUPTED
    assert _status(files) == {"status": "interrupted", "exit_code": 3,
                              "message": f"stopped by SIGTERM while loading the data; {job.RESUME}"}
    assert not (tmp_path / "results.csv").exists() and not files.checkpoint.exists()


@pytest.mark.parametrize("phase", ["generate_events", "metrics_score"])
def test_sigterm_while_scoring_is_exit_3_and_the_rerun_only_scores(tmp_path, monkeypatch, phase):
    with monkeypatch.context() as patch:
        if phase == "metrics_score":
            _sigterm_during(patch, metrics, "score")
        else:
            _sigterm_during(patch, experiment, phase)
        code, files = _run(tmp_path)
    assert code == 3 and _status(files)["status"] == "interrupted" and _status(files)["exit_code"] == 3
    assert "training is saved" in _status(files)["message"]
    assert not (tmp_path / "results.csv").exists() and files.checkpoint.exists()
    stopping.reset()
    code, files = _run(tmp_path)
    assert code == 0 and _status(files)["status"] == "ok"
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["resumed_from"] == 2 and row["epochs_run"] == 0  # trained before: only scored


def test_sigterm_in_the_last_epoch_is_exit_3_not_a_finished_run(tmp_path, monkeypatch):
    _sigterm_during(monkeypatch, experiment, "write_curves")  # after every epoch, the last one included
    code, files = _run(tmp_path, "run", "train.epochs=1")
    assert code == 3 and _status(files)["exit_code"] == 3
    assert not (tmp_path / "results.csv").exists() and files.checkpoint.exists()


def test_a_second_ctrl_c_is_exit_3_and_the_status_agrees(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train_and_score", interrupted)
    code, files = _run(tmp_path)
    assert code == 3 and _status(files)["exit_code"] == 3 and "second Ctrl-C" in _status(files)["message"]


def test_a_sweeps_later_jobs_do_not_start_after_a_stop(tmp_path):
    stopping.install()
    os.kill(os.getpid(), signal.SIGTERM)  # an earlier job of this process's sweep was stopped
    code, files = _run(tmp_path)
    assert code == 3 and "before the run started" in _status(files)["message"]


def test_a_run_directory_in_use_is_refused(tmp_path):
    from filelock import FileLock

    (tmp_path / "run").mkdir()
    with FileLock(RunFiles(tmp_path / "run").lock):
        code, files = _run(tmp_path)
    assert code == 2 and not files.status.exists()


def test_a_clusters_time_limit_warning_saves_the_run_then_requeues_it(tmp_path, monkeypatch):
    """submitit's handler of SIGUSR2 requeues and exits: flowvae lets the run stop at a step with its checkpoint
    and status first, then calls it."""
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)  # what submitit does after requeueing

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        original = experiment.write_curves

        def warn(path, history):  # the cluster's warning arrives after the first epoch
            original(path, history)
            os.kill(os.getpid(), signal.SIGUSR2)

        monkeypatch.setattr(experiment, "write_curves", warn)
        with pytest.raises(SystemExit):
            _run(tmp_path, "run", "train.epochs=3")
        files = RunFiles(tmp_path / "run")
        assert calls == [signal.SIGUSR2]  # requeued once, after the run had stopped
        assert _status(files)["status"] == "interrupted" and files.checkpoint.exists()
        assert "stopped by SIGUSR2" in _status(files)["message"]
        assert not (tmp_path / "results.csv").exists()
    finally:
        stopping.reset()
        signal.signal(signal.SIGUSR2, previous)


def _row(tmp_path, run_dir) -> pd.Series:
    table = pd.read_csv(tmp_path / "results.csv")
    return table[table["run_dir"] == str(run_dir)].iloc[-1]


def test_the_same_config_in_a_new_directory_resumes_the_interrupted_run(tmp_path, monkeypatch):
    """Hydra gives each command a new directory: the rerun goes on in the interrupted one, removes its own, and
    ends with the numbers of a run that was never interrupted."""
    with monkeypatch.context() as patch:
        _sigterm_during(patch, experiment, "write_curves")  # stopped after the first epoch
        code, interrupted = _run(tmp_path, "first", "train.epochs=3")
    assert code == 3 and interrupted.checkpoint.exists()
    stopping.reset()
    code, rerun = _run(tmp_path, "rerun", "train.epochs=3")
    assert code == 0 and _status(interrupted)["status"] == "ok"
    assert not rerun.root.exists()  # it did its work in the interrupted run's directory
    row = _row(tmp_path, interrupted.root)
    assert row["resumed_from"] > 0 and row["epochs_run"] < 3
    code, whole = _run(tmp_path, "whole", "train.epochs=3")  # the row is in: a rerun now starts anew
    assert code == 0
    uninterrupted = _row(tmp_path, whole.root)
    assert uninterrupted["resumed_from"] == 0 and uninterrupted["epochs_run"] == 3
    metrics = [c for c in row.index if c.startswith(("kl_", "w1_", "final_"))]
    assert (row[metrics] == uninterrupted[metrics]).all()


def test_an_interrupted_run_another_process_holds_is_not_resumed_twice(tmp_path, monkeypatch):
    from filelock import FileLock

    with monkeypatch.context() as patch:
        _sigterm_during(patch, experiment, "write_curves")
        code, interrupted = _run(tmp_path, "first", "train.epochs=3")
    assert code == 3
    stopping.reset()
    with FileLock(interrupted.lock):  # another job works in it now
        code, rerun = _run(tmp_path, "rerun", "train.epochs=3")
    assert code == 0 and _status(interrupted)["status"] == "interrupted"
    assert _row(tmp_path, rerun.root)["resumed_from"] == 0


@pytest.mark.parametrize("override", ["n_flows=-1", "data=npy data.path=missing.npy"])
def test_a_refused_run_leaves_nothing_behind_but_a_sweeps_job_keeps_its_status(tmp_path, override):
    """A single run refused removes the directory Hydra made for it and creates nothing beside the results table;
    a sweep's job directory stays, with the status the sweep sums up."""
    code, files = _run(tmp_path, "refused", *override.split())
    assert code == 2 and list(tmp_path.iterdir()) == []
    cfg = compose_config(*TINY, f"results_csv={tmp_path / 'results.csv'}", *override.split())
    code = job.run(cfg, tmp_path / "sweep" / "0", tmp_path, sweep_dir=tmp_path / "sweep")
    status = _status(RunFiles(tmp_path / "sweep" / "0"))
    assert code == 2 and status["status"] == "invalid" and status["exit_code"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
