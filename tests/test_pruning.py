"""A search's pruning: the job's link to its trial through Hydra's grammar and the environment, each epoch's
validation loss reported to that trial, the median and successive-halving decisions with the numbers they
compared, a search whose pruned trials are told PRUNED and whose rows say so (basic and joblib launchers, tracked
in MLflow), and a search that cannot prune refused before its first trial."""

from __future__ import annotations

import json
import logging
import statistics

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from flowvae.config import register_configs
from flowvae.pruning import ENV, TrialLink, from_environment, hook
from flowvae.results import read_rows
from tests.conftest import TINY, compose_config, require_extra, run_flowvae

optuna = require_extra("optuna", "search")
from optuna.trial import TrialState, create_trial  # noqa: E402

MEDIAN = {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2, "min_resource": 1, "reduction_factor": 2}


def test_a_trial_link_goes_through_hydras_grammar_and_is_no_part_of_the_runs_identity():
    from flowvae.identity import run_hash

    nasty = TrialLink(storage="journal:/data/it's a $HOME/${x}/a,b=c\\d \"q\" é", study="s'\"\\", number=7,
                      pruner=MEDIAN)
    override = nasty.override()
    assert override.startswith(f"++hydra.job.env_set.{ENV}=")
    parsed = OverridesParser.create().parse_override(override).value()
    assert TrialLink.parse(parsed) == nasty
    # composed into a job's config as the sweeper passes it: the variable's value, and the same run identity
    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        with_link = compose(config_name="config", overrides=[*TINY, override], return_hydra_config=True)
    assert TrialLink.parse(with_link.hydra.job.env_set[ENV]) == nasty
    assert run_hash(compose_config(*TINY, override)) == run_hash(compose_config(*TINY))
    assert from_environment({ENV: parsed}) == nasty and from_environment({}) is None and hook(None) is None


def _study(tmp_path, name="s"):
    from flowvae.sweeper import open_storage

    spec = f"journal:{tmp_path / 'study.journal'}"
    return spec, optuna.create_study(study_name=name, storage=open_storage(spec), direction="minimize")


def _finished(study, curves: list[dict[int, float]]):
    for values in curves:
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, intermediate_values=values))


def test_a_trial_reports_each_epochs_validation_loss_and_is_pruned_against_the_median(tmp_path):
    spec, study = _study(tmp_path)
    # at epoch 2 the finished trials' median is 4, at epoch 3 it is 2
    _finished(study, [{2: 3.0, 3: 1.0}, {2: 4.0, 3: 2.0}, {2: 5.0, 3: 3.0}])
    running = study.ask()
    prune = hook(TrialLink(storage=spec, study="s", number=running.number, pruner=MEDIAN))
    assert prune({"epoch": 1, "val_loss": 9.0}) is None  # warm-up: epoch 1 < n_warmup_steps = 2
    assert prune({"epoch": 2, "val_loss": 2.5}) is None  # 2.5 < 4
    message = prune({"epoch": 3, "val_loss": 2.4})  # its best so far, 2.4, is worse than the median, 2
    median = statistics.median([1.0, 2.0, 3.0])
    assert message == (f"pruned by the search after epoch 3 (val_loss 2.4, its best so far; the median of 3 finished "
                       f"trials at that epoch was {median:g})")
    reported = optuna.load_study(study_name="s", storage=study._storage).trials[running.number]
    assert reported.intermediate_values == {1: 9.0, 2: 2.5, 3: 2.4} and reported.state == TrialState.RUNNING


def test_successive_halving_prunes_a_trial_outside_the_best_share_of_its_rung(tmp_path):
    spec, study = _study(tmp_path)
    halving = {**MEDIAN, "name": "successive_halving", "min_resource": 1, "reduction_factor": 2}
    prunes = []
    for loss in (1.0, 2.0, 3.0):  # one after the other, each reaching rung 0 (epoch 1)
        trial = study.ask()
        prunes.append(hook(TrialLink(storage=spec, study="s", number=trial.number, pruner=halving))(
            {"epoch": 1, "val_loss": loss}))
    assert prunes[0] is None  # alone at its rung
    # the third: 3.0 is not in the best half of [1, 2, 3]
    assert prunes[2] == ("pruned by the search after epoch 1 (val_loss 3: not in the best 1/2 of the 3 trials that "
                         "reached this rung)")


def test_pruning_never_fails_a_run(tmp_path, caplog):
    spec, study = _study(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flowvae.pruning"):
        assert hook(TrialLink(storage=spec, study="no such study", number=0, pruner=MEDIAN)) is None
        trial = study.ask()
        prune = hook(TrialLink(storage=spec, study="s", number=trial.number, pruner=MEDIAN))
        assert prune({"epoch": 1, "train_loss": 1.0}) is None  # no validation: nothing to report
        study.tell(trial, 1.0)  # told already: reporting to it fails, and the run trains on
        assert prune({"epoch": 2, "val_loss": 1.0}) is None and prune({"epoch": 3, "val_loss": 1.0}) is None
    assert "could not open the study" in caplog.text and "has no val_loss to report" in caplog.text
    assert caplog.text.count("could not report to the trial") == 1


# --- searches that prune -----------------------------------------------------------------------------------------

EPOCHS = 6
# a bad learning rate beside a good one: the bad trials fall behind from the first epochs
PRUNED_SEARCH = ["+search=default", *TINY, f"train.epochs={EPOCHS}", "train.warmup_epochs=0", "flow=planar",
                 "n_flows=1", "train.lr=choice(1e-5, 3e-3)", "results_csv=results.csv",
                 "hydra.sweeper.study_name=test", "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner.n_startup_trials=1",
                 "hydra.sweeper.pruner.n_warmup_steps=1"]


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
def test_a_search_prunes_trials_that_fall_behind_and_each_trial_hears_from_its_own_run(tmp_path, launcher):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    tracked = ["logger=mlflow", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if launcher == "basic" \
        else []
    out = run_flowvae(["train", "-m", *PRUNED_SEARCH, f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra, *tracked],
                      cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    from flowvae.sweeper import open_storage

    trials = optuna.load_study(study_name="test", storage=open_storage(
        f"journal:{tmp_path / 'outputs' / 'optuna.journal'}")).trials
    states = [t.state for t in trials]
    assert len(trials) == 6 and TrialState.PRUNED in states and TrialState.COMPLETE in states, states
    rows = {row["run_dir"]: row for row in read_rows(tmp_path / "results.csv")}
    assert len(rows) == 6
    for trial in trials:
        row = rows[trial.user_attrs["run_dir"]]
        curves = pd.read_csv(f"{row['run_dir']}/training_curves.csv")
        trained = int(row["epochs_trained"])
        assert len(curves) == trained
        # the trial heard its own run's validation loss after every epoch but the last of a whole training (fit
        # asks the pruner after each epoch that has one after it)
        heard = trained if trial.state == TrialState.PRUNED else trained - 1
        assert trial.intermediate_values == dict(zip(curves["epoch"][:heard], curves["val_loss"][:heard], strict=True))
        if trial.state == TrialState.PRUNED:
            assert row["status"] == "pruned" and row["kl_sum"] == "" and trained < EPOCHS
            assert row["error"].startswith(f"pruned by the search after epoch {trained} (val_loss ")
            assert trial.user_attrs["status"] == "pruned"
        else:
            assert row["status"] == "ok" and float(row["kl_sum"]) == trial.value and trained == EPOCHS
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/status.json")]
    assert {s["exit_code"] for s in statuses} == {0}
    if tracked:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracked[1].partition("=")[2])
        runs = client.search_runs([client.get_experiment_by_name("flowvae_gaussian").experiment_id])
        by_dir = {run.data.tags["run_dir"]: run for run in runs}
        for trial in trials:
            run = by_dir[trial.user_attrs["run_dir"]]
            pruned = trial.state == TrialState.PRUNED
            assert run.info.status == ("KILLED" if pruned else "FINISHED")
            assert run.data.tags["status"] == ("pruned" if pruned else "ok")


@pytest.mark.parametrize("overrides, says", [
    (["train.val_fraction=0"], "train.val_fraction=0 is not allowed: > 0 in every trial of a search with a pruner"),
    (["hydra.sweeper.direction=maximize"], "hydra.sweeper.pruner.name=median is not allowed: none with "
                                           "direction=maximize"),
    (["train.epochs=interval(2, 4)"], "train.epochs=interval(2, 4) is not allowed: an integer key, sampled from "
                                      "integers"),
    (["hydra.sweeper.pruner.name=hyperband"], "hydra.sweeper.pruner.name=hyperband is not allowed: one of median, "
                                              "successive_halving, none"),
])
def test_a_search_that_cannot_work_is_refused_before_its_first_trial(tmp_path, overrides, says):
    out = run_flowvae(["train", "-m", "+search=default", *TINY, "hydra.sweeper.study_name=test",
                       "results_csv=results.csv", *overrides], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "results.csv").exists()
