"""Every check before work in one preflight (flowvae/run/preflight.py): a bad config is refused by the same
check with the same message, creating nothing, whether `flowvae train` runs it, a stacked group would take it, or
a search's trial runs it (a trial is a job); and a run's row is assembled in one place (flowvae/run/row.py) from
the metric columns' one definition (flowvae/metrics/row.py)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import pytest

from flowvae import stopping
from flowvae.files import RunFiles
from flowvae.run import job
from flowvae.run.preflight import Checked, Existing, Refused, preflight
from tests.conftest import TINY, compose_config, run_flowvae

# One bad config for each stage of the preflight: the settings, the results table, the data, the transforms on
# the data, the objective's column, the device (where torch sees no CUDA).
BAD = [
    pytest.param(["n_flows=-1"], "n_flows=-1", id="settings"),
    pytest.param(["results_csv={tmp}/file/r.csv"], "cannot make the folder", id="results_csv"),
    pytest.param(["data=npy", "data.path=missing.npy"], "data.path", id="data"),
    pytest.param(["data.mu=-5", "data.transforms=[log,none,none]"], "data.transforms", id="transforms"),
    pytest.param(["optimize.metric=train.lr"], "optimize.metric=train.lr", id="objective"),
    pytest.param(["eval.protocol=jetnet"], "eval.protocol=jetnet", id="protocol"),
    pytest.param(["train.device=cuda"], "train.device=cuda", id="device"),
]


def _tree(root: Path) -> set:
    return {path.relative_to(root) for path in root.rglob("*")}


def _config(tmp_path, overrides):
    (tmp_path / "file").write_text("x")  # a file where results_csv wants a folder
    return compose_config(*TINY, f"results_csv={tmp_path / 'results.csv'}",
                          *(o.format(tmp=tmp_path) for o in overrides))


def _refusal(cfg, tmp_path) -> str:
    """The preflight's message for ``cfg``; nothing is made by it."""
    before = _tree(tmp_path)
    with pytest.raises(Refused) as refused:
        preflight(cfg, RunFiles(tmp_path / "never"), tmp_path, tmp_path / "sweep")
    assert _tree(tmp_path) == before
    return refused.value.message


@pytest.mark.parametrize("overrides, says", BAD)
def test_one_preflight_refuses_a_bad_config_alike_for_a_run_a_stacked_seed_and_a_trial(tmp_path, overrides, says):
    if "train.device=cuda" in overrides:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    cfg = _config(tmp_path, overrides)
    message = _refusal(cfg, tmp_path)
    assert message.startswith("bad configuration: ") and says in message and "\n" not in message
    # a stacked group leaves the seed to its job, and makes nothing for it
    from flowvae.sweeps.group import Member, _join

    with ExitStack() as held:
        assert _join(Member(cfg, tmp_path / "sweep" / "1"), tmp_path, tmp_path / "sweep", held) is None
    assert not (tmp_path / "sweep").exists()
    # the job (a single run, a stacked seed's, a search trial's): the same message, exit 2, no row
    try:
        outcome = job.execute(cfg, tmp_path / "sweep" / "0", tmp_path, sweep_dir=tmp_path / "sweep")
    finally:
        stopping.reset()
    status = json.loads(RunFiles(tmp_path / "sweep" / "0").status.read_text())
    assert outcome == job.Outcome(2, None) and outcome.objective("kl_sum") == float("inf")
    assert status == {"status": "invalid", "exit_code": 2, "message": message}
    assert _tree(tmp_path / "sweep") == {Path("0"), Path("0/status.json")}  # its status, nothing else
    assert not (tmp_path / "results.csv").exists()


def test_a_checked_run_carries_what_its_work_needs_and_an_ok_row_is_taken_instead(tmp_path):
    cfg = compose_config(*TINY, f"results_csv={tmp_path / 'results.csv'}")
    checked = preflight(cfg, RunFiles(tmp_path / "run"), tmp_path)
    assert isinstance(checked, Checked) and checked.results_csv == tmp_path / "results.csv"
    assert checked.events.train.shape[0] == 200 and checked.feature_map is not None
    assert list(tmp_path.iterdir()) == []  # the checks made nothing
    try:
        outcome = job.execute(cfg, tmp_path / "run", tmp_path)
    finally:
        stopping.reset()
    assert outcome.code == 0 and outcome.row["status"] == "ok"
    again = compose_config(*TINY, f"results_csv={tmp_path / 'results.csv'}", "skip_existing=true")
    existing = preflight(again, RunFiles(tmp_path / "again"), tmp_path)
    assert isinstance(existing, Existing) and existing.row["config_hash"] == outcome.row["config_hash"]
    assert float(existing.row["kl_sum"]) == outcome.objective("kl_sum")


def test_a_stacked_sweep_refuses_a_bad_objective_before_training_any_seed(tmp_path):
    """Each seed's job refuses it with the preflight's message, and the group trains none of them first."""
    cfg = compose_config(*TINY, f"results_csv={tmp_path / 'results.csv'}", "optimize.metric=train.lr")
    message = _refusal(cfg, tmp_path)
    out = run_flowvae(["train", "-m", *TINY, "hydra/launcher=stacked", "seed=0,1", "optimize.metric=train.lr",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_csv={tmp_path / 'results.csv'}"],
                      cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "training 2 seeds" not in out.stdout + out.stderr
    statuses = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/status.json"))]
    assert statuses == [{"status": "invalid", "exit_code": 2, "message": message}] * 2
    assert not list((tmp_path / "sweep").glob("*/checkpoint.pt")) and not (tmp_path / "results.csv").exists()


def test_a_runs_row_is_its_cell_metric_columns_status_settings_and_bookkeeping(tmp_path):
    from flowvae.data.events import load_events
    from flowvae.identity import run_settings
    from flowvae.metrics.latent import LATENT_COLUMNS
    from flowvae.metrics.row import TRAINING_COLUMNS, metric_columns, row_columns
    from flowvae.run.row import metric_values, result_row

    cfg = compose_config(*TINY, "flow=planar", "n_flows=2", "seed=3")
    events = load_events(cfg.data, tmp_path)
    columns = metric_columns(3)
    assert columns == [*row_columns(3), *TRAINING_COLUMNS, *LATENT_COLUMNS]
    row = result_row(cfg, events, {"kl_sum": 0.5, "epochs_run": 2, "not_a_column": 1}, "ok", "", 0.0, tmp_path, "h")
    settings = [key for key in run_settings(cfg) if key not in ("flow", "n_flows", "seed")]
    assert list(row) == ["flow", "n_flows", "seed", *columns, "status", "error", *settings, "wall_seconds",
                         "finished_at", "run_dir", "config_hash", "train_hash", "flowvae_version", "host"]
    assert (row["flow"], row["n_flows"], row["seed"], row["kl_sum"], row["epochs_run"], row["w1_sum"]) == (
        "planar", 2, 3, 0.5, 2, "")  # a metric it has not: blank, as in a failed run's row
    assert list(metric_values(row, events, "scaled")) == [*columns, "wall_seconds"]
