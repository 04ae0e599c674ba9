"""An Optuna search (`+search=default`, Hydra's Optuna sweeper): objectives from the rows, +inf for a bad trial,
a study that a second command continues from its SQLite file."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from tests.conftest import TINY, require_extra, run_flowvae

optuna = require_extra("optuna", "search")


def _search(tmp_path, *overrides):
    args = ["train", "-m", "+search=default", *TINY, "flow=planar", "n_flows=1", "results_csv=results.csv",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweeper.study_name=test", *overrides]
    return run_flowvae(args, cwd=tmp_path)


def _trials(tmp_path):
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    return study.trials


def test_a_search_minimizes_the_rows_metric_and_says_how_to_rerun_the_best(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=3")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = pd.read_csv(tmp_path / "results.csv")
    values = [trial.value for trial in _trials(tmp_path)]
    assert len(values) == 3 and values == list(rows["kl_sum"])  # one sequential trial per row, in order
    best = rows.loc[rows["kl_sum"].idxmin()]
    text = out.stdout + out.stderr
    assert f"best trial: kl_sum = {best['kl_sum']}" in text
    assert f"train.lr={best['train.lr']}" in text and "flowvae train" in text


def test_a_killed_search_goes_on_from_its_sqlite_study_and_a_failed_trial_scores_inf(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=2", "optimize.metric=w1_sum")
    assert out.returncode == 0, out.stdout + out.stderr
    # the same study again (as after a kill), with a trial that cannot run: it scores +inf, the study goes on
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", "optimize.metric=w1_sum", "data.sigma=0")
    assert out.returncode == 2, out.stdout + out.stderr  # the sweep's exit code still says a run was refused
    trials = _trials(tmp_path)
    rows = pd.read_csv(tmp_path / "results.csv")
    assert len(trials) == 3 and len(rows) == 2
    assert [t.value for t in trials[:2]] == list(rows["w1_sum"])
    assert math.isinf(trials[2].value) and trials[2].state == optuna.trial.TrialState.COMPLETE


@pytest.mark.parametrize("status, value, expected", [("ok", "0.25", 0.25), ("diverged", "", math.inf),
                                                      ("failed", "", math.inf), ("ok", "nan", math.inf)])
def test_the_objective_is_the_rows_metric_or_inf(monkeypatch, status, value, expected):
    from flowvae import job

    monkeypatch.setattr(job, "_last_row", {"status": status, "kl_sum": value})
    assert job.objective("kl_sum") == expected
    monkeypatch.setattr(job, "_last_row", None)  # refused or interrupted: no row
    assert job.objective("kl_sum") == math.inf


def test_an_objective_that_is_not_a_metric_column_is_refused(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", "optimize.metric=train.lr")
    assert "optimize.metric=train.lr is not allowed" in out.stdout + out.stderr
    assert math.isinf(_trials(tmp_path)[0].value)
