"""A search's pruning: the job's link to its trial through Hydra's grammar and the environment, each epoch's
validation loss or objective on the validation events reported to that trial (the objective equal to the metric
recomputed from that epoch's weights, and reporting it changing nothing that is trained), the median and
successive-halving decisions with the numbers they compared, a search whose pruned trials are told PRUNED and whose
rows say so (basic and joblib launchers, tracked in MLflow), and a search that cannot prune refused before its first
trial."""

from __future__ import annotations

import copy
import json
import logging
import statistics

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from flowvae.app import register_configs
from flowvae.errors import ConfigError
from flowvae.results.store import read_rows
from flowvae.run.trial import Pruning, from_environment, pruning
from flowvae.search.pruning import ENV, TrialLink, check_report, objective_metric
from flowvae.training.callbacks import Callback
from tests.conftest import TINY, compose_config, require_extra, run_flowvae

optuna = require_extra("optuna", "search")
from optuna.trial import TrialState, create_trial  # noqa: E402

MEDIAN = {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 2, "min_resource": 1, "reduction_factor": 2,
          "report": "val_loss"}


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
    assert from_environment({ENV: parsed}) == nasty and from_environment({}) is None and pruning(None) is None


def _study(tmp_path, name="s"):
    from flowvae.search.storage import open_storage

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
    prune = pruning(TrialLink(storage=spec, study="s", number=running.number, pruner=MEDIAN)).should_prune
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
        prunes.append(pruning(TrialLink(storage=spec, study="s", number=trial.number, pruner=halving)).should_prune(
            {"epoch": 1, "val_loss": loss}))
    assert prunes[0] is None  # alone at its rung
    # the third: 3.0 is not in the best half of [1, 2, 3]
    assert prunes[2] == ("pruned by the search after epoch 1 (val_loss 3: not in the best 1/2 of the 3 trials that "
                         "reached this rung)")


def _default_pruner(*overrides: str) -> dict:
    """The pruner settings a trial of `flowvae train -m +search=default OVERRIDES` gets: the sweeper's defaults,
    its n_warmup_steps made from the space as the sweeper makes it."""
    from flowvae.sweeps.optuna_sweeper import OptunaSweeper

    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+search=default", *overrides], return_hydra_config=True)
    sweeper = OptunaSweeper.from_config(cfg)
    space, _, _ = sweeper._space(list(cfg.hydra.overrides.task))
    return sweeper._pruner_settings(space)


def test_the_default_pruner_prunes_an_obviously_bad_trial_in_a_short_search_of_a_few_trials():
    """`+search=default train.epochs=3`: trials report after epochs 1 and 2 (not after the last); the median pruner
    judges from the end of the longest warm-up (epoch 2) once 3 trials have finished."""
    from flowvae.search.pruning import make_pruner

    settings = _default_pruner("train.epochs=3")
    assert (settings["name"], settings["n_startup_trials"], settings["n_warmup_steps"]) == ("median", 3, 2)
    assert _default_pruner()["n_warmup_steps"] == 5  # 20 epochs: warm-ups of up to 5 epochs
    assert _default_pruner("train.epochs=3", "train.warmup_epochs=0")["n_warmup_steps"] == 0
    assert _default_pruner("train.epochs=3", "hydra.sweeper.pruner.n_warmup_steps=1")["n_warmup_steps"] == 1
    study = optuna.create_study(direction="minimize", pruner=make_pruner(settings))

    def trial(values: list[float]) -> int | None:
        """The epoch at which the pruner stops a trial reporting ``values`` after epochs 1, 2, ...; None: it ends."""
        running = study.ask()
        for epoch, value in enumerate(values, start=1):
            running.report(value, epoch)
            if running.should_prune():
                study.tell(running, state=TrialState.PRUNED)
                return epoch
        study.tell(running, values[-1])
        return None

    bad = [30.0, 25.0]
    assert [trial(v) for v in ([9.0, 5.0], [8.0, 4.0])] == [None, None]
    assert trial(bad) is None  # 2 finished trials are too few to judge: it finishes, the third
    assert trial(bad) == 2  # worse than the median (5), judged once the warm-up epochs are over (not at epoch 1)
    assert trial([7.0, 4.5]) is None  # better than the median: goes on
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == 1 and len(states) == 5  # a search of 5 trials pruned one


@pytest.mark.parametrize("name", ["successive_halving", "median"])
def test_a_reduction_factor_of_one_is_refused_up_front_naming_the_key(name):
    from flowvae.search.pruning import make_pruner

    with pytest.raises(ConfigError) as refused:
        make_pruner({**MEDIAN, "name": name, "reduction_factor": 1})
    assert str(refused.value) == ("hydra.sweeper.pruner.reduction_factor=1 is not allowed: an integer >= 2 for the "
                                  "successive_halving pruner")
    make_pruner({**MEDIAN, "name": name})  # 2 is allowed
    with pytest.raises(ConfigError, match="n_warmup_steps=None is not allowed"):
        make_pruner({**MEDIAN, "n_warmup_steps": None})  # the sweeper makes null a number first


def test_pruning_never_fails_a_run(tmp_path, caplog):
    spec, study = _study(tmp_path)
    with caplog.at_level(logging.WARNING, logger="flowvae.search.pruning"):
        assert pruning(TrialLink(storage=spec, study="no such study", number=0, pruner=MEDIAN)) is None
        trial = study.ask()
        prune = pruning(TrialLink(storage=spec, study="s", number=trial.number, pruner=MEDIAN)).should_prune
        assert prune({"epoch": 1, "train_loss": 1.0}) is None  # no validation: nothing to report
        study.tell(trial, 1.0)  # told already: reporting to it fails, and the run trains on
        assert prune({"epoch": 2, "val_loss": 1.0}) is None and prune({"epoch": 3, "val_loss": 1.0}) is None
    assert "could not open the study" in caplog.text and "has no val_loss to report" in caplog.text
    assert caplog.text.count("could not report to the trial") == 1


def test_the_objective_of_a_trial_is_the_rows_metric_for_per_feature_distances_and_refused_for_the_rest():
    from flowvae.metrics import score

    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(30, 3, 5)), rng.normal(0.2, 1.1, size=(40, 3, 5))
    gen_mask, ref_mask = rng.random((30, 5)) < 0.7, rng.random((40, 5)) < 0.8
    row = score(gen, ref, gen_mask, ref_mask, bins=17, eps=1e-9)
    for metric in ("kl_sum", "w1_sum", "js_sum", "kl_2", "w1_0", "js_1"):
        assert objective_metric(metric, bins=17, eps=1e-9)(gen, gen_mask, ref, ref_mask) == row[metric], metric
    objective = {**MEDIAN, "report": "objective"}
    for metric in ("kl_sum", "w1_3", "js_sum"):
        check_report(objective, metric)
    check_report(MEDIAN, "fpd")  # val_loss reports anything
    check_report(objective, "train.lr")  # no row's column: the job refuses it with the data's columns
    check_report({**objective, "name": "none"}, "fpd")  # nothing is reported without a pruner
    for metric in ("w1p_2_floor", "gen_mean_1", "final_test_loss", "noise_floor"):
        with pytest.raises(ConfigError):
            check_report(objective, metric)
    with pytest.raises(ConfigError) as refused:
        check_report(objective, "w1m")
    assert str(refused.value).startswith("hydra.sweeper.pruner.report=objective is not allowed: val_loss for "
                                         "optimize.metric=w1m: a trial reports its objective after each epoch only "
                                         "for the per-feature distances")
    assert "hydra.sweeper.pruner.report=val_loss" in str(refused.value)


@pytest.mark.parametrize("metric, overrides", [("kl_sum", []), ("w1_1", ["data=jets", "eval.source=posterior"])])
def test_a_trial_reports_its_objective_on_the_validation_events_and_training_is_unchanged(tmp_path, monkeypatch,
                                                                                          metric, overrides):
    import torch

    from flowvae.data.events import load_events
    from flowvae.data.units import data_units, model_input
    from flowvae.files import RunFiles
    from flowvae.metrics.row import score_row
    from flowvae.models.sampling import generate_events
    from flowvae.run import experiment
    from flowvae.training.kit import split_validation

    cfg = compose_config(*TINY, *overrides, "train.epochs=3", "train.val_fraction=0.2", f"optimize.metric={metric}")
    events = load_events(cfg.data)
    spec, study = _study(tmp_path)
    trial = study.ask()
    never = {**MEDIAN, "n_startup_trials": 100, "report": "objective"}  # reports, never prunes
    weights, modes, real_fit = [], [], experiment.fit

    def fit(model, *args, callbacks=(), **options):  # each reported epoch's weights, and the model's mode after
        class Watched(Callback):
            def __init__(self, pruner: Pruning) -> None:
                self.pruner = pruner

            def should_prune(self, row):
                weights.append(copy.deepcopy(model.state_dict()))
                said = self.pruner.should_prune(row)
                modes.append(model.training)
                return said

        callbacks = [Watched(c) if isinstance(c, Pruning) else c for c in callbacks]
        return real_fit(model, *args, callbacks=callbacks, **options)

    monkeypatch.setattr(experiment, "fit", fit)
    for run in ("reported", "plain"):
        (tmp_path / run).mkdir()
    monkeypatch.setenv(ENV, json.dumps(TrialLink(spec, "s", trial.number, never).__dict__))
    reported = experiment.train_and_score(cfg, events, RunFiles(tmp_path / "reported"))
    monkeypatch.delenv(ENV)
    plain = experiment.train_and_score(cfg, events, RunFiles(tmp_path / "plain"))
    # the same training: the same curves (to the last digit) and the same scored row
    assert reported[0] == plain[0] == "ok" and reported[2] == plain[2]
    curves = [pd.read_csv(tmp_path / run / "training_curves.csv").drop(columns="seconds") for run in ("reported",
                                                                                                       "plain")]
    pd.testing.assert_frame_equal(*curves, check_exact=True)
    assert len(weights) == 2 and modes == [True, True]  # asked after epochs 1 and 2, the model left training
    # each reported value: the row's metric of events generated from that epoch's weights, against the validation
    # events (held out of the data-unit training events by the same split)
    feature_map = experiment.fit_feature_map(cfg, events)
    train_x = model_input(feature_map.forward(events.train, events.train_mask), "cpu", events.train_mask)
    val_x = split_validation(train_x, 0.2, cfg.data.seed)[1]
    val_events = split_validation(torch.from_numpy(events.train), 0.2, cfg.data.seed)[1].numpy()
    n = min(cfg.eval.n_samples, len(val_events))
    assert n == 40
    expected = {}
    for epoch, state in enumerate(weights, start=1):
        model = experiment.seeded_model(cfg, events, torch.device("cpu"))
        model.load_state_dict(state)
        generated, mask = generate_events(model, OmegaConf.merge(cfg.eval, {"n_samples": n}), val_x,
                                                     cfg.seed, events.train.shape[1:])
        generated = data_units(feature_map, generated, mask, events.kinematics)
        expected[epoch] = score_row(generated, mask, val_events, None, events.kinematics, bins=cfg.eval.bins,
                                    eps=cfg.eval.eps, seed=cfg.seed)[metric]
    heard = optuna.load_study(study_name="s", storage=study._storage).trials[trial.number].intermediate_values
    assert heard == expected and expected[1] != expected[2]


# --- searches that prune -----------------------------------------------------------------------------------------

EPOCHS = 6
# a bad learning rate beside a good one: the bad trials fall behind from the first epochs
PRUNED_SEARCH = ["+search=default", *TINY, f"train.epochs={EPOCHS}", "train.warmup_epochs=0", "flow=planar",
                 "n_flows=1", "train.lr=choice(1e-5, 3e-3)", "results_csv=results.csv",
                 "hydra.sweeper.study_name=test", "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner.n_startup_trials=1",
                 "hydra.sweeper.pruner.n_warmup_steps=1"]


@pytest.mark.parametrize("launcher, report", [("basic", "objective"),
                                              pytest.param("basic", "val_loss", marks=pytest.mark.slow),
                                              pytest.param("joblib", "objective", marks=pytest.mark.slow)])
def test_a_search_prunes_trials_that_fall_behind_and_each_trial_hears_from_its_own_run(tmp_path, launcher, report):
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    extra.append(f"hydra.sweeper.pruner.report={report}")
    tracked = ["logger=mlflow", f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if launcher == "basic" \
        else []
    out = run_flowvae(["train", "-m", *PRUNED_SEARCH, f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra, *tracked],
                      cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    from flowvae.search.storage import open_storage

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
        if report == "val_loss":
            assert trial.intermediate_values == dict(zip(curves["epoch"][:heard], curves["val_loss"][:heard],
                                                         strict=True))
        else:  # the values themselves: test_a_trial_reports_its_objective_on_the_validation_events_...
            assert sorted(trial.intermediate_values) == list(curves["epoch"][:heard])
        label = "val_loss" if report == "val_loss" else "validation kl_sum"
        if trial.state == TrialState.PRUNED:
            assert row["status"] == "pruned" and row["kl_sum"] == "" and trained < EPOCHS
            assert row["error"].startswith(f"pruned by the search after epoch {trained} ({label} ")
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
    (["hydra.sweeper.pruner.report=elbo"], "hydra.sweeper.pruner.report=elbo is not allowed: one of objective, "
                                           "val_loss"),
    (["hydra.sweeper.pruner.reduction_factor=1"], "hydra.sweeper.pruner.reduction_factor=1 is not allowed: an "
                                                  "integer >= 2 for the successive_halving pruner"),
    (["optimize.metric=fpd"], "hydra.sweeper.pruner.report=objective is not allowed: val_loss for "
                              "optimize.metric=fpd: a trial reports its objective after each epoch only for the "
                              "per-feature distances"),
])
def test_a_search_that_cannot_work_is_refused_before_its_first_trial(tmp_path, overrides, says):
    out = run_flowvae(["train", "-m", "+search=default", *TINY, "hydra.sweeper.study_name=test",
                       "results_csv=results.csv", *overrides], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing made: no sweep folder, no journal
