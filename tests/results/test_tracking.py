"""Experiment tracking (`logger=mlflow`): runs logged to a real local MLflow store and read back through MLflow's
own client: settings as parameters, per-epoch losses, the row's metrics, the run's files; a sweep in one
experiment; a resumed run continuing its tracked run; tracking that never decides a run's outcome."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
from pathlib import Path

import pytest

from flowvae.files import RunFiles
from flowvae.identity import is_setting_column
from tests.conftest import TINY, compose_config, require_extra, run_flowvae

mlflow = require_extra("mlflow", "tracking")
from mlflow.tracking import MlflowClient  # noqa: E402


def _store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _train(tmp_path, *overrides, multirun=False):
    args = ["train", *(["-m"] if multirun else []), *TINY, "logger=mlflow", f"logger.tracking_uri={_store(tmp_path)}",
            "results_csv=results.csv", *overrides]
    return run_flowvae(args, cwd=tmp_path)


def _rows(tmp_path) -> list[dict]:
    with (tmp_path / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _runs(tmp_path, experiment="flowvae_gaussian"):
    client = MlflowClient(tracking_uri=_store(tmp_path))
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in the store"
    return client, client.search_runs([found.experiment_id])


def _artifacts(client, run_id, folder=None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, folder):
        paths |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def _check_run_against_its_row(client, run, row: dict, epochs: bool = True) -> None:
    """The tracked run holds the row: every setting as a parameter, every metric column's value, the identity."""
    settings = {key: value for key, value in row.items() if is_setting_column(key) and key != "flowvae_version"}
    assert run.data.params == settings
    metrics = {key: float(value) for key, value in row.items() if not is_setting_column(key) and value != ""
               and key not in ("status", "error", "run_dir", "finished_at", "config_hash", "train_hash", "host")}
    assert "kl_sum" in metrics and "final_kl_term" in metrics and "wall_seconds" in metrics
    assert {key: run.data.metrics.get(key) for key in metrics} == metrics
    # besides the row, the last epoch's values of the training curves (an evaluation has no epochs)
    assert set(run.data.metrics) - set(metrics) == ({"beta", "train_loss", "train_recon", "train_kl", "test_loss",
                                                     "test_recon", "test_kl", "seconds"} if epochs else set())
    assert run.data.tags["config_hash"] == row["config_hash"] and run.data.tags["train_hash"] == row["train_hash"]
    assert run.data.tags["run_dir"] == row["run_dir"] and run.data.tags["status"] == "ok"
    assert run.info.status == "FINISHED"


def test_a_run_is_tracked_with_its_settings_losses_row_and_files(tmp_path):
    out = _train(tmp_path, "flow=planar", "n_flows=2", "train.epochs=3")
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = _rows(tmp_path)
    client, runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    _check_run_against_its_row(client, run, row)
    files = RunFiles(Path(row["run_dir"]))
    assert run.info.run_name == files.root.name and "sweep" not in run.data.tags
    # per-epoch losses: the training curves file's values at steps 1..3
    with files.curves.open(newline="") as f:
        curves = list(csv.DictReader(f))
    for key in ("train_loss", "test_loss", "test_kl", "beta"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3]
        assert [m.value for m in history] == [float(c[key]) for c in curves]
    # the run's files, byte for byte
    assert _artifacts(client, run.info.run_id) >= {"histograms.png", "training_curves.csv", "result.csv",
                                                   "generated_sample.npy", "hydra/config.yaml",
                                                   "hydra/overrides.yaml"}
    local = client.download_artifacts(run.info.run_id, "result.csv", str(tmp_path))
    assert open(local, "rb").read() == files.result.read_bytes()
    # the artifacts live beside the SQLite file, not in the directory the run was launched from
    assert (tmp_path / "store" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_a_parallel_sweeps_runs_share_one_experiment_and_are_tagged_with_the_sweep(tmp_path):
    # two jobs at once on a store that does not exist yet: both create it (one at a time, under its lock)
    sweep = tmp_path / "sweep"
    out = _train(tmp_path, "seed=0,1", f"hydra.sweep.dir={sweep}", "logger.experiment_name=my_sweeps",
                 "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", multirun=True)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _rows(tmp_path)
    client, runs = _runs(tmp_path, "my_sweeps")
    assert len(rows) == 2 and len(runs) == 2
    by_dir = {run.data.tags["run_dir"]: run for run in runs}
    for row in rows:
        _check_run_against_its_row(client, by_dir[row["run_dir"]], row)
    assert {run.data.tags["sweep"] for run in runs} == {str(sweep)}
    assert {run.info.run_name for run in runs} == {f"sweep/{Path(row['run_dir']).name}" for row in rows}
    assert {run.data.params["seed"] for run in runs} == {"0", "1"}


def test_logger_mlflow_without_mlflow_is_refused_before_training(tmp_path):
    hidden = tmp_path / "no_mlflow"
    (hidden / "mlflow").mkdir(parents=True)
    (hidden / "mlflow" / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    args = ["train", *TINY, "logger=mlflow", f"logger.tracking_uri={_store(tmp_path)}", "results_csv=results.csv",
            f"hydra.run.dir={tmp_path / 'run'}"]
    out = run_flowvae(args, cwd=tmp_path, env={"PYTHONPATH": f"{hidden}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "needs MLflow" in out.stderr + out.stdout and 'pip install -e ".[tracking]"' in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "results.csv").exists() and not RunFiles(tmp_path / "run").checkpoint.exists()


def test_a_store_that_cannot_be_opened_is_refused_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    args = ["train", *TINY, "logger=mlflow", f"logger.tracking_uri=sqlite:///{tmp_path / 'a_file' / 'm.db'}",
            "results_csv=results.csv", f"hydra.run.dir={tmp_path / 'run'}"]
    out = run_flowvae(args, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "logger.tracking_uri=" in out.stderr + out.stdout and "Traceback" not in out.stderr
    assert not RunFiles(tmp_path / "run").checkpoint.exists()


def test_a_tracking_server_that_does_not_answer_is_refused_in_seconds(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", *TINY, "logger=mlflow", f"logger.tracking_uri=http://127.0.0.1:{port}",
            "results_csv=results.csv", f"hydra.run.dir={tmp_path / 'run'}"]
    # MLflow's own retries would take 4 minutes; 3 leave a busy machine time to start flowvae and import MLflow
    out = run_flowvae(args, cwd=tmp_path, timeout=180)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"logger.tracking_uri=http://127.0.0.1:{port} is not allowed" in out.stdout + out.stderr
    assert not RunFiles(tmp_path / "run").checkpoint.exists()


def _tracker(tmp_path, *overrides):
    from flowvae.results.tracking import open_tracker

    cfg = compose_config(*TINY, "logger=mlflow", f"logger.tracking_uri={_store(tmp_path)}", *overrides)
    files = RunFiles(tmp_path / "run")
    files.root.mkdir(exist_ok=True)
    return open_tracker(cfg, files, tmp_path), files


def _history(epochs):
    return [{"epoch": e, "train_loss": 10.0 / e, "test_loss": 11.0 / e, "test_kl": float("nan")} for e in epochs]


def test_a_resumed_run_continues_its_tracked_run_without_logging_an_epoch_twice(tmp_path):
    first, files = _tracker(tmp_path)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # quick retries only while the store is opened
    first.log_epochs(_history([1]))
    first.log_epochs(_history([1, 2]))
    first.finish("interrupted", None, "stopped by SIGTERM")
    client = MlflowClient(tracking_uri=_store(tmp_path))
    killed = client.get_run(first.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["status"] == "interrupted"
    assert killed.data.tags["error"] == "stopped by SIGTERM"

    again, _ = _tracker(tmp_path)  # the same run, rerun in its directory
    assert again.run_id == first.run_id
    again.log_epochs(_history([1, 2, 3, 4]))  # a resumed fit's history starts from the checkpoint's
    again.finish("ok", {"kl_sum": 0.5, "kl_0": ""}, "")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["kl_sum"] == 0.5 and "kl_0" not in run.data.metrics
    assert run.data.tags["status"] == "ok" and run.data.tags["error"] == ""  # not the interrupted attempt's
    history = client.get_metric_history(first.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(e, 10.0 / e) for e in (1, 2, 3, 4)]
    assert client.get_metric_history(first.run_id, "test_kl") == []  # NaN: not measured in those epochs

    other, _ = _tracker(tmp_path, "seed=5")  # another config in the same directory is another tracked run
    assert other.run_id != first.run_id


def test_a_tracking_error_during_the_run_is_a_warning_not_a_failure(tmp_path, caplog):
    tracker, _ = _tracker(tmp_path)
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("the server went away")

    tracker.client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger="flowvae.results.tracking"):
        tracker.log_epochs(_history([1]))
        tracker.log_epochs(_history([1, 2]))
        tracker.finish("ok", {"kl_sum": 0.1})
    assert len(calls) == 1  # after the first error, tracking stops trying
    assert "the run goes on untracked" in caplog.text and "the server went away" in caplog.text


@pytest.mark.parametrize("uri, expected", [("sqlite:///outputs/m.db", "sqlite:///{launch}/outputs/m.db"),
                                           ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
                                           ("http://host:5000", "http://host:5000")])
def test_a_relative_sqlite_store_is_taken_from_where_the_user_launched(tmp_path, uri, expected):
    from flowvae.results.tracking import store_uri

    assert store_uri(uri, tmp_path) == expected.format(launch=tmp_path)


@pytest.mark.slow
def test_mlflow_ui_serves_the_tracked_runs(tmp_path):
    """The README's `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db` starts beside every extra flowvae
    installs and lists the run (from MLflow 3.17 on the server needs SQLAlchemy 2, which no extra holds back)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    out = _train(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    server = subprocess.Popen([exe, "ui", "--backend-store-uri", _store(tmp_path), "--host", "127.0.0.1",
                               "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                                         data=json.dumps({"max_results": 10}).encode(),
                                         headers={"Content-Type": "application/json"})
        deadline, answer = time.time() + 300, None  # the server's start: a minute or more on a busy machine
        while answer is None and time.time() < deadline and server.poll() is None:
            try:
                answer = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(0.5)
        if answer is None:
            died = server.poll() is not None
            pytest.fail(f"mlflow ui did not answer: {server.stdout.read().decode()[-2000:] if died else 'no reply'}")
        assert "flowvae_gaussian" in {e["name"] for e in answer["experiments"]}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def test_evaluations_of_a_tracked_run_are_tracked_runs_that_name_it(tmp_path):
    out = _train(tmp_path, "train.epochs=1")
    assert out.returncode == 0, out.stdout + out.stderr
    (trained,) = _rows(tmp_path)
    out = run_flowvae(["evaluate", trained["run_dir"], "eval.source=posterior", "eval.bins=10"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    evaluated = _rows(tmp_path)[1]
    client, runs = _runs(tmp_path)
    by_hash = {run.data.tags["config_hash"]: run for run in runs}
    assert len(runs) == 2 and set(by_hash) == {trained["config_hash"], evaluated["config_hash"]}
    training, evaluation = by_hash[trained["config_hash"]], by_hash[evaluated["config_hash"]]
    _check_run_against_its_row(client, evaluation, evaluated, epochs=False)
    assert evaluation.data.tags["evaluates"] == training.info.run_id
    assert evaluation.info.run_name == f"{Path(trained['run_dir']).name}/eval_{evaluated['config_hash']}"
    assert evaluation.data.params["eval.source"] == "posterior" and training.data.params["eval.source"] == "prior"
    assert _artifacts(client, evaluation.info.run_id) == set()  # the run directory's files are the training's
    # the trained run's own tracked run is untouched, and stays the one a resume would continue
    assert json.loads(RunFiles(Path(trained["run_dir"])).tracking.read_text())["run_id"] == training.info.run_id
    assert training.data.metrics["kl_sum"] == float(trained["kl_sum"])


def test_an_untracked_run_is_evaluated_into_a_store_when_asked(tmp_path):
    out = run_flowvae(["train", *TINY, "train.epochs=1", "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    (trained,) = _rows(tmp_path)
    out = run_flowvae(["evaluate", trained["run_dir"], "eval.bins=10", "logger=mlflow",
                       f"logger.tracking_uri={_store(tmp_path)}", "logger.experiment_name=evaluations"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    client, (run,) = _runs(tmp_path, "evaluations")
    _check_run_against_its_row(client, run, _rows(tmp_path)[1], epochs=False)
    assert run.data.tags["evaluates"] == ""  # its training was not tracked
    out = run_flowvae(["evaluate", trained["run_dir"], "logger=wandb"], cwd=tmp_path)
    assert out.returncode == 2 and "logger=wandb is not allowed: one of none, mlflow" in out.stderr


# --- the experiment's name: the data's identity -----------------------------------------------------------------


def _sha8(*parts: bytes) -> str:
    import hashlib

    return hashlib.sha256(b"".join(parts)).hexdigest()[:8]


def _events_file(path: Path, seed: int):
    import numpy as np

    np.save(path, np.random.default_rng(seed).normal(1.0, 0.5, size=(60, 3, 10)).astype(np.float32))
    return path


def test_each_data_file_is_its_own_experiment_named_by_its_stem_and_contents(tmp_path):
    from flowvae.results.tracking import experiment_name

    a, b = _events_file(tmp_path / "a.npy", 0), _events_file(tmp_path / "b.npy", 1)
    (tmp_path / "elsewhere").mkdir()
    copy = tmp_path / "elsewhere" / "a.npy"
    copy.write_bytes(a.read_bytes())

    def name(*overrides, launch_dir=tmp_path):
        return experiment_name(compose_config("logger=mlflow", *overrides), launch_dir)

    assert name() == "flowvae_gaussian" and name("data=jets") == "flowvae_jets"
    # the hash is sha256 over data.key (None for a .npy), a newline, and the file's bytes
    assert name("data=npy", "data.path=a.npy") == f"flowvae_a_{_sha8(b'None', bytes([10]), a.read_bytes())}"
    assert name("data=npy", "data.path=b.npy") == f"flowvae_b_{_sha8(b'None', bytes([10]), b.read_bytes())}"
    # the same bytes elsewhere (a relative path from another launch directory) are the same data
    assert name("data=npy", "data.path=a.npy", launch_dir=tmp_path / "elsewhere") == name("data=npy",
                                                                                          f"data.path={a}")
    # JetNet's files: the array's name is part of it
    jets = Path(__file__).resolve().parents[1] / "data" / "gluon_30p_slice.npz"
    assert name("data=jetnet", f"data.path={jets}") == (
        f"flowvae_gluon_30p_slice_{_sha8(b'particle_features', bytes([10]), jets.read_bytes())}")
    assert name("data=npy", "data.path=a.npy", "logger.experiment_name=mine") == "mine"


def test_a_tracked_run_on_a_file_lands_in_that_files_experiment(tmp_path):
    from flowvae.results.tracking import open_tracker

    data = _events_file(tmp_path / "particles.npy", 0)
    cfg = compose_config("logger=mlflow", f"logger.tracking_uri={_store(tmp_path)}", "data=npy",
                         "data.path=particles.npy")
    (tmp_path / "run").mkdir()
    tracker = open_tracker(cfg, RunFiles(tmp_path / "run"), launch_dir=tmp_path)
    tracker.finish("ok", {"kl_sum": 0.5})
    client, runs = _runs(tmp_path, f"flowvae_particles_{_sha8(b'None', bytes([10]), data.read_bytes())}")
    assert [run.info.run_id for run in runs] == [tracker.run_id] and runs[0].data.metrics["kl_sum"] == 0.5
    assert client.get_experiment_by_name("flowvae_npy") is None
