"""An Optuna search (`+search=default`, Hydra's Optuna sweeper): objectives from the rows, +inf for a bad trial,
a study that the same command continues from its SQLite file and that any other command does not share, and a
space that contradicts the fixed settings refused before its first trial."""

from __future__ import annotations

import hashlib
import math
import re
import shlex

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from flowvae.config import register_configs
from tests.conftest import TINY, require_extra, run_flowvae

optuna = require_extra("optuna", "search")

# TINY trains 2 epochs: the search's warm-up must stay below that (0 or 1 epoch)
SHORT_WARMUP = "train.warmup_epochs=range(0,1)"


def _search(tmp_path, *overrides, study="test", sweep="sweep"):
    named = [f"hydra.sweeper.study_name={study}"] if study else []
    args = ["train", "-m", "+search=default", *TINY, SHORT_WARMUP, "flow=planar", "n_flows=1",
            "results_csv=results.csv", f"hydra.sweep.dir={tmp_path / sweep}", *named, *overrides]
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


# --- a study's identity ----------------------------------------------------------------------------------------


def _study_name(*overrides: str) -> str:
    """The study name `flowvae train -m +search=default OVERRIDES` gets, as the launching process resolves it."""
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+search=default", *overrides], return_hydra_config=True)
    return OmegaConf.select(cfg, "hydra.sweeper.study_name")


def test_a_study_is_keyed_by_every_setting_that_is_not_searched():
    base = _study_name("flow=planar", "n_flows=10")
    assert re.fullmatch(r"flowvae_planar_K10_gaussian_[0-9a-f]{8}", base), base
    # what does not change a number: more trials, where rows and trackers go, threads
    assert _study_name("flow=planar", "n_flows=10", "hydra.sweeper.n_trials=40", "results_csv=other.csv",
                       "logger=mlflow", "train.threads=2") == base
    # anything else fixed is another study: the two commands, a seed, the metric, a key taken out of the space
    others = [_study_name("flow=planar", "n_flows=10", *extra) for extra in (
        ["train.epochs=10"], ["data.n_train=2000"], ["seed=1"], ["optimize.metric=w1_sum"], ["train.lr=0.001"],
        ["model.latent_dim=8"], ["data=jets"])]
    assert len({base, *others}) == len(others) + 1, others
    assert _study_name("flow=iaf", "n_flows=10").startswith("flowvae_iaf_K10_gaussian_")


def test_each_data_file_has_its_own_study(tmp_path, monkeypatch):
    for name, seed in (("a", 0), ("b", 1)):
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(seed).normal(size=(40, 3, 5)).astype(np.float32))
    monkeypatch.chdir(tmp_path)  # the launch directory: relative data paths are taken from here
    a, b = (_study_name("data=npy", f"data.path={name}.npy") for name in ("a", "b"))
    digest = hashlib.sha256(b"None\n" + (tmp_path / "a.npy").read_bytes()).hexdigest()[:8]
    assert a.startswith(f"flowvae_none_K0_a_{digest}_") and b.startswith("flowvae_none_K0_b_") and a != b
    assert _study_name("data=npy", f"data.path={tmp_path / 'a.npy'}") == a  # the same file, named absolutely


@pytest.mark.parametrize("epochs, refused", [(2, True), (5, True), (6, False)])
def test_a_warmup_that_can_outlast_training_is_refused(capsys, epochs, refused):
    """The default space samples train.warmup_epochs in 0..5 (Optuna's range includes its end)."""
    if not refused:
        assert _study_name(f"train.epochs={epochs}").startswith("flowvae_none_K0_gaussian_")
        return
    with pytest.raises(SystemExit) as exit_:
        _study_name(f"train.epochs={epochs}")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("flowvae train: hydra.sweeper.params.train.warmup_epochs=range(0, 5) is not allowed")
    assert f"train.warmup_epochs up to 5 with train.epochs={epochs}" in err


def test_a_contradicting_space_is_refused_before_any_trial(tmp_path):
    # the epochs sampled on the command line, a warm-up fixed there: 3 epochs of warm-up in a 3-epoch trial
    tiny = [o for o in TINY if not o.startswith("train.epochs=")]
    out = run_flowvae(["train", "-m", "+search=default", *tiny, "train.epochs=choice(3,10)", "train.warmup_epochs=3",
                       "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert ("flowvae train: train.epochs=choice(3,10) is not allowed: a warm-up shorter than training in every "
            "trial: train.warmup_epochs up to 3 with train.epochs from 3 never reaches beta = 1") in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "results.csv").exists()


def test_another_command_starts_its_own_study_and_its_best_trial_reruns_to_its_number(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", study=None)
    assert out.returncode == 0, out.stdout + out.stderr
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", "data.n_train=100", study=None, sweep="other")  # its own
    assert out.returncode == 0, out.stdout + out.stderr
    other = pd.read_csv(tmp_path / "results.csv").iloc[-1]
    line = next(line for line in (out.stdout + out.stderr).splitlines() if "best trial:" in line)
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", study=None, sweep="again")  # the first one's study goes on
    assert out.returncode == 0, out.stdout + out.stderr
    storage = f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}"
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert sorted(studies.values()) == [1, 2], studies
    # the second command's best trial is its own, and its command line gives its number again
    assert f"kl_sum = {other['kl_sum']};" in line
    command = shlex.split(line.partition("rerun it with: flowvae ")[2])
    out = run_flowvae([c if c != "results_csv=results.csv" else "results_csv=rerun.csv" for c in command],
                      cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert pd.read_csv(tmp_path / "rerun.csv").iloc[0]["kl_sum"] == other["kl_sum"]
