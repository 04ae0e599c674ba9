"""An Optuna search (`+search=default`, flowvae's sweeper): the override grammar read into Optuna's distributions,
objectives from the rows, the worst value of the direction for a bad trial, n_trials as the study's total, a study
that the same command continues from its journal (resuming a killed trial) and that any other command does not
share, two processes on one study, the default warm-up range shortened to the training, and a search that cannot
work refused before anything is made."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from flowvae.app import register_configs
from flowvae.errors import ConfigError
from tests.conftest import TINY, flowvae_command, require_extra, run_flowvae

optuna = require_extra("optuna", "search")
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

# TINY trains 2 epochs: the search's warm-up must stay below that (0 or 1 epoch)
SHORT_WARMUP = "train.warmup_epochs=range(0,1)"


def _args(tmp_path, *overrides, study="test", sweep="sweep"):
    named = [f"hydra.sweeper.study_name={study}"] if study else []
    return ["train", "-m", "+search=default", *TINY, SHORT_WARMUP, "flow=planar", "n_flows=1",
            "results_csv=results.csv", f"hydra.sweep.dir={tmp_path / sweep}", *named, *overrides]


def _search(tmp_path, *overrides, study="test", sweep="sweep"):
    return run_flowvae(_args(tmp_path, *overrides, study=study, sweep=sweep), cwd=tmp_path)


def _storage(tmp_path):
    from flowvae.search.storage import open_storage

    return open_storage(f"journal:{tmp_path / 'outputs' / 'optuna.journal'}")


def _trials(tmp_path, study="test"):
    return optuna.load_study(study_name=study, storage=_storage(tmp_path)).trials


def _rows_by_run(tmp_path) -> dict:
    rows = pd.read_csv(tmp_path / "results.csv", keep_default_na=False)
    return {row["run_dir"]: row for _, row in rows.iterrows()}


# --- the space: Hydra's override grammar as Optuna's distributions --------------------------------------------


@pytest.mark.parametrize("argument, key, expected", [
    ("train.lr=tag(log, interval(1e-4, 3e-3))", "train.lr", FloatDistribution(1e-4, 3e-3, log=True)),
    ("train.lr=interval(0.1, 0.5)", "train.lr", FloatDistribution(0.1, 0.5)),
    ("train.warmup_epochs=range(0, 5)", "train.warmup_epochs", IntDistribution(0, 5)),  # 5 included
    ("train.epochs=range(1, 10, 3)", "train.epochs", IntDistribution(1, 10, step=3)),  # 1, 4, 7, 10
    ("data.sigma=range(0.25, 1.0, 0.25)", "data.sigma", FloatDistribution(0.25, 1.0, step=0.25)),
    ("train.batch_size=tag(log, range(16, 256))", "train.batch_size", IntDistribution(16, 256, log=True)),
    ("train.grad_clip=choice(0.5, 1.0, 5.0)", "train.grad_clip", CategoricalDistribution([0.5, 1.0, 5.0])),
    ("flow=choice(planar, iaf)", "flow", CategoricalDistribution(["planar", "iaf"])),
    ("seed=0,1,2", "seed", CategoricalDistribution([0, 1, 2])),
    ("+extra=choice(a, 'b c', 'x,y')", "+extra", CategoricalDistribution(["a", "b\\ c", "x\\,y"])),  # as overrides
])
def test_the_override_grammar_is_read_into_optunas_distributions(argument, key, expected):
    from flowvae.search.space import parse_space

    space, fixed = parse_space(["data=jets", argument])
    assert space == {key: expected} and fixed == {"data": "data=jets"}


def test_a_later_override_of_a_key_replaces_an_earlier_one():
    from flowvae.search.space import parse_space

    space, fixed = parse_space(["train.lr=interval(0.1, 0.5)", "seed=1", "train.lr=0.01", "+seed=range(0, 3)"])
    assert space == {"+seed": IntDistribution(0, 3)} and fixed == {"train.lr": "train.lr=0.01"}


@pytest.mark.parametrize("argument, says", [
    ("seed=shuffle(range(3))", "shuffle() orders a grid"),
    ("seed=tag(log, choice(1, 2))", "tag(log, ...) belongs to an interval"),
    ("train.lr=interval(0.5, 0.1)", "a distribution Optuna can sample"),
    ("train.lr=tag(log, interval(0, 1))", "a distribution Optuna can sample"),
    ("train.lr=glob(*)", "choice(a, b, ...), range(a, b), interval(a, b)"),
])
def test_a_space_a_sampler_cannot_sample_is_refused_by_key(argument, says):
    from flowvae.search.space import parse_space

    with pytest.raises(ConfigError) as err:
        parse_space([argument], sources=[f"hydra.sweeper.params.{argument}"])
    key, _, text = argument.partition("=")
    assert str(err.value).startswith(f"hydra.sweeper.params.{key}={text} is not allowed: ") and says in str(err.value)


# --- searches ----------------------------------------------------------------------------------------------------


def test_a_search_minimizes_the_rows_metric_and_says_how_to_rerun_the_best(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=3")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = pd.read_csv(tmp_path / "results.csv")
    trials = _trials(tmp_path)
    assert [t.value for t in trials] == list(rows["kl_sum"])  # one sequential trial per row, in order
    assert [t.user_attrs["run_dir"] for t in trials] == list(rows["run_dir"])
    assert [t.params["train.lr"] for t in trials] == list(rows["train.lr"])
    best = rows.loc[rows["kl_sum"].idxmin()]
    text = out.stdout + out.stderr
    assert f"best trial: kl_sum = {best['kl_sum']}" in text
    assert f"train.lr={best['train.lr']}" in text and "flowvae train" in text
    results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert results.best_value == best["kl_sum"] and trials[results.best_trial].value == best["kl_sum"]
    # n_trials is the study's total: the same command once more runs nothing, a larger total runs the rest
    out = _search(tmp_path, "hydra.sweeper.n_trials=3", sweep="again")
    assert out.returncode == 0 and "3 of 3 trials" in out.stdout + out.stderr, out.stdout + out.stderr
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3 and len(_trials(tmp_path)) == 3
    out = _search(tmp_path, "hydra.sweeper.n_trials=4")  # into the same sweep folder: trial 3 gets its own
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4 and len(_trials(tmp_path)) == 4
    assert _trials(tmp_path)[3].user_attrs["run_dir"] == str(tmp_path / "sweep" / "3_planar_K1_s0")


def test_a_failed_trial_scores_inf_and_the_study_goes_on(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=2", "optimize.metric=w1_sum")
    assert out.returncode == 0, out.stdout + out.stderr
    # the same study again, with a trial that cannot run: it scores +inf, the study goes on
    out = _search(tmp_path, "hydra.sweeper.n_trials=3", "optimize.metric=w1_sum", "data.sigma=0", sweep="bad")
    assert out.returncode == 2, out.stdout + out.stderr  # the sweep's exit code still says a run was refused
    trials = _trials(tmp_path)
    rows = pd.read_csv(tmp_path / "results.csv")
    assert len(trials) == 3 and len(rows) == 2
    assert [t.value for t in trials[:2]] == list(rows["w1_sum"])
    assert trials[2].value == math.inf and trials[2].state == TrialState.COMPLETE  # the worst when minimizing
    assert trials[2].user_attrs["status"] == "invalid"
    # refused by the run's own preflight, with the message `flowvae train` gives
    import json
    from pathlib import Path

    from flowvae.files import RunFiles
    from flowvae.run.preflight import Refused, preflight
    from tests.conftest import compose_config

    with pytest.raises(Refused) as refused:
        preflight(compose_config(*TINY, "results_csv=results.csv", "data.sigma=0"), RunFiles(tmp_path / "no"),
                  tmp_path)
    status = json.loads(RunFiles(Path(trials[2].user_attrs["run_dir"])).status.read_text())
    assert status["message"] == refused.value.message and "data.sigma=0" in status["message"]


@pytest.mark.parametrize("status, value, expected", [("ok", "0.25", 0.25), ("diverged", "", math.inf),
                                                      ("failed", "", math.inf), ("ok", "nan", math.inf),
                                                      ("failed", "0.25", math.inf)])  # scored, row not written
def test_the_objective_is_the_rows_metric_or_inf(status, value, expected):
    from flowvae.run.job import Outcome

    assert Outcome(0, {"status": status, "kl_sum": value}).objective("kl_sum") == expected
    assert Outcome(2).objective("kl_sum") == math.inf  # refused or interrupted: no row


@pytest.mark.parametrize("direction, worst", [("minimize", math.inf), ("maximize", -math.inf)])
@pytest.mark.parametrize("status, row", [("ok", {"status": "ok"}),  # the metric missing from the row
                                         ("ok", {"status": "ok", "kl_sum": "nan"}),
                                         ("failed", None), ("invalid", None)])
def test_a_failed_trial_scores_the_worst_value_of_the_direction_and_is_never_the_best(tmp_path, direction, worst,
                                                                                      status, row):
    """What the sweeper tells the study of a job: the job's own objective (+inf without a finite metric) is the
    worst value when minimizing, and -inf, not +inf, when maximizing."""
    import json
    from types import SimpleNamespace

    from hydra.core.utils import JobStatus

    from flowvae.files import RunFiles
    from flowvae.run.job import Outcome
    from flowvae.sweeps.optuna_sweeper import OptunaSweeper

    sweeper = OptunaSweeper(direction=direction)
    sweeper.config = OmegaConf.create({"optimize": {"metric": "kl_sum"}})
    study = optuna.create_study(direction=direction)

    def tell(run_status: str, last_row: dict | None):
        run_dir = tmp_path / str(len(study.trials))
        run_dir.mkdir()
        RunFiles(run_dir).status.write_text(json.dumps({"status": run_status, "message": "why"}))
        ret = SimpleNamespace(hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}}),
                              status=JobStatus.COMPLETED, return_value=Outcome(0, last_row).objective("kl_sum"))
        sweeper._tell(study, study.ask(), ret)

    tell("ok", {"status": "ok", "kl_sum": "0.25"})
    tell(status, row)
    assert [t.value for t in study.trials] == [0.25, worst]
    assert study.best_trial.number == 0 and sweeper.worst() == worst


def _task(tmp_path, sweeper: str, *overrides):
    """Hydra's task function of `flowvae train` run in this process as a job of a sweep whose sweeper is the
    class ``sweeper``, and what Hydra hands that sweeper: (return value, the job's directory)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flowvae import cli, stopping

    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"results_csv={tmp_path / 'results.csv'}",
                                                       *overrides], return_hydra_config=True)
    run_dir = tmp_path / "sweep" / str(len(list(tmp_path.glob("sweep/*"))))
    cfg.hydra.mode, cfg.hydra.sweep.dir = RunMode.MULTIRUN, str(tmp_path / "sweep")
    cfg.hydra.runtime.cwd, cfg.hydra.runtime.output_dir = str(tmp_path), str(run_dir)
    cfg.hydra.sweeper = {"_target_": sweeper}
    hydra_config = HydraConfig.instance()
    saved, _ = hydra_config.cfg, hydra_config.set_config(cfg)
    task = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    try:
        return cli.train.__wrapped__(task), run_dir
    finally:
        hydra_config.cfg = saved
        stopping.reset()


def _renamed_sweeper():
    from flowvae.sweeps.optuna_sweeper import OptunaSweeper

    class Renamed(OptunaSweeper):
        """flowvae's sweeper under a name without "optuna" in it."""

    return Renamed


def test_the_sweeper_gets_the_objective_from_the_jobs_return_value_and_knows_its_subclasses(tmp_path, monkeypatch):
    """A search's job hands its objective back through Hydra (the task function's return value, which Hydra gives
    the sweeper as JobReturn.return_value), recognised by the sweeper's class: a subclass under any name gets it;
    any other sweeper the exit code."""
    import json
    import sys
    from types import ModuleType, SimpleNamespace

    import pandas as pd
    from hydra.core.utils import JobStatus

    from flowvae.sweeps.optuna_sweeper import OptunaSweeper

    module = ModuleType("renamed_sweepers")
    module.Renamed = _renamed_sweeper()
    module.Other = type("OptunaLookalike", (), {})  # "optuna" in its name, and not flowvae's sweeper
    monkeypatch.setitem(sys.modules, "renamed_sweepers", module)
    value, run_dir = _task(tmp_path, "renamed_sweepers.Renamed")
    row = pd.read_csv(tmp_path / "results.csv").iloc[-1]
    assert value == row["kl_sum"] and row["run_dir"] == str(run_dir)
    sweeper = OptunaSweeper()
    sweeper.config = OmegaConf.create({"optimize": {"metric": "kl_sum"}})
    study = optuna.create_study()
    ret = SimpleNamespace(hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}}),
                          status=JobStatus.COMPLETED, return_value=value)
    sweeper._tell(study, study.ask(), ret)
    assert study.trials[0].value == row["kl_sum"]
    # refused before any work: +inf, and the status says why
    value, run_dir = _task(tmp_path, "renamed_sweepers.Renamed", "n_flows=-1")
    assert value == math.inf and json.loads((run_dir / "status.json").read_text())["status"] == "invalid"
    # flowvae's sweeper as the config names it, for a trial that takes the row: the row's value
    value, _ = _task(tmp_path, "hydra_plugins.flowvae_plugins.optuna_sweeper.OptunaSweeper", "skip_existing=true")
    assert value == row["kl_sum"]
    # any other sweeper gets the exit code, whatever its name says
    for other in ("renamed_sweepers.Other", "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                  "no_such_module.OptunaSweeper"):
        value, _ = _task(tmp_path, other, "skip_existing=true")
        assert value == 0 and isinstance(value, int), other


def test_an_objective_that_is_not_a_metric_column_is_refused(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", "optimize.metric=train.lr")
    assert "optimize.metric=train.lr is not allowed" in out.stdout + out.stderr
    assert _trials(tmp_path)[0].value == math.inf


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


def test_two_searches_that_differ_only_in_direction_are_two_studies():
    base = _study_name("flow=planar", "n_flows=10", "hydra.sweeper.pruner.name=none")
    maximized = _study_name("flow=planar", "n_flows=10", "hydra.sweeper.pruner.name=none",
                            "hydra.sweeper.direction=maximize")
    assert base != maximized and base.rpartition("_")[0] == maximized.rpartition("_")[0]
    assert _study_name("flow=planar", "n_flows=10", "hydra.sweeper.pruner.name=none",
                       "hydra.sweeper.direction=minimize") == base  # the default, written out


def test_each_data_file_has_its_own_study(tmp_path, monkeypatch):
    for name, seed in (("a", 0), ("b", 1)):
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(seed).normal(size=(40, 3, 5)).astype(np.float32))
    monkeypatch.chdir(tmp_path)  # the launch directory: relative data paths are taken from here
    a, b = (_study_name("data=npy", f"data.path={name}.npy") for name in ("a", "b"))
    digest = hashlib.sha256(b"None\n" + (tmp_path / "a.npy").read_bytes()).hexdigest()[:8]
    assert a.startswith(f"flowvae_none_K0_a_{digest}_") and b.startswith("flowvae_none_K0_b_") and a != b
    assert _study_name("data=npy", f"data.path={tmp_path / 'a.npy'}") == a  # the same file, named absolutely


def _multirun_config(*overrides: str):
    """The config `flowvae train -m +search=default OVERRIDES` composes in the launching process (sweeps allowed)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    register_configs()
    with initialize_config_module(config_module="flowvae.conf", version_base="1.3"):
        return GlobalHydra.instance().config_loader().load_configuration(
            "config", ["+search=default", *overrides, "hydra.mode=MULTIRUN"], run_mode=RunMode.MULTIRUN)


@pytest.mark.parametrize("overrides, longest", [
    (["train.epochs=1"], 0), (["train.epochs=2"], 1), (["train.epochs=3"], 2), (["train.epochs=5"], 4),
    (["train.epochs=6"], 5), ([], 5),  # the default 20 epochs: 0..5 as before
    (["train.epochs=choice(3,10)"], 2), (["train.epochs=range(4,8)"], 3),  # the shortest sampled training
])
def test_the_default_warmup_range_is_shortened_to_what_training_allows(overrides, longest):
    """The default space samples train.warmup_epochs in 0..5 (Optuna's range includes its end), and at most the
    shortest training's epochs less one: every trial's beta reaches 1, and a short search is not refused."""
    from flowvae.search.space import search_space

    cfg = _multirun_config(*overrides)
    space, written = search_space(cfg)
    assert space["train.warmup_epochs"] == IntDistribution(0, longest)
    assert written["train.warmup_epochs"] == f"hydra.sweeper.params.train.warmup_epochs=range(0, {longest})"
    assert OmegaConf.select(cfg, "hydra.sweeper.study_name").startswith("flowvae_none_K0_gaussian_")  # not refused


def test_the_warmup_range_follows_epochs_sampled_in_the_searchs_own_params():
    from flowvae.search.space import longest_warmup

    register_configs()
    root = OmegaConf.create({"train": {"epochs": 20}, "hydra": {"overrides": {"task": []}, "sweeper": {"params": {
        "train.epochs": "choice(4, 9)", "train.warmup_epochs": "range(0, ${flowvae.longest_warmup:5})"}}}})
    assert root.hydra.sweeper.params["train.warmup_epochs"] == "range(0, 3)"
    assert longest_warmup(2, root) == 2  # and never longer than asked


def test_a_warmup_written_on_the_command_line_that_can_outlast_training_is_refused_with_the_range_that_fits(capsys):
    with pytest.raises(SystemExit) as exit_:
        OmegaConf.select(_multirun_config("train.epochs=3", "train.warmup_epochs=range(0,5)"),
                         "hydra.sweeper.study_name")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("flowvae train: train.warmup_epochs=range(0,5) is not allowed: a warm-up shorter than "
                          "training in every trial: train.warmup_epochs up to 5 with train.epochs=3 never reaches "
                          "beta = 1; search a shorter warm-up, e.g. train.warmup_epochs='range(0,2)' on the command "
                          "line")


def test_the_sweepers_callback_makes_every_check_when_hydra_instantiates_it(capsys):
    """Hydra instantiates its callbacks before any of them makes the sweep folder: a refusal there leaves nothing."""
    from hydra.utils import instantiate

    from flowvae.sweeps.optuna_sweeper import SearchCheck

    check = instantiate(_multirun_config("train.epochs=3").hydra.callbacks.search_check)
    assert isinstance(check, SearchCheck) and check.checked is True
    from hydra.types import RunMode

    single_run = _multirun_config("train.epochs=3", "hydra.sweeper.n_trials=-1")
    single_run.hydra.mode = RunMode.RUN
    assert instantiate(single_run.hydra.callbacks.search_check).checked is False  # a single run checks nothing
    for overrides, says in ((["train.warmup_epochs=range(0,5)"], "train.warmup_epochs=range(0,5) is not allowed"),
                            (["hydra.sweeper.n_trials=-1"], "hydra.sweeper.n_trials=-1 is not allowed"),
                            (["hydra.sweeper.study_name=mine", "hydra.sweeper.pruner.reduction_factor=1"],
                             "hydra.sweeper.pruner.reduction_factor=1 is not allowed")):
        with pytest.raises(SystemExit) as exit_:
            instantiate(_multirun_config("train.epochs=3", *overrides).hydra.callbacks.search_check)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"flowvae train: {says}") and len(err.splitlines()) == 1


def _tree(root) -> dict:
    return {str(path.relative_to(root)): (path.is_dir(), path.stat().st_size, path.stat().st_mtime_ns)
            for path in [root, *root.rglob("*")]}


@pytest.mark.parametrize("overrides, says", [
    (["train.warmup_epochs=range(0,5)"], "train.warmup_epochs=range(0,5) is not allowed"),  # the study's name
    (["hydra.sweeper.n_trials=-1"], "hydra.sweeper.n_trials=-1 is not allowed"),  # the sweeper's settings
])
def test_a_refused_search_leaves_the_tree_as_it_was(tmp_path, overrides, says):
    (tmp_path / "outputs" / "multirun").mkdir(parents=True)
    (tmp_path / "outputs" / "results.csv").write_text("a row\n")
    before = _tree(tmp_path)
    out = run_flowvae(["train", "-m", "+search=default", "data=jets", "flow=planar", "n_flows=10", "train.epochs=3",
                       *overrides], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert _tree(tmp_path) == before  # no sweep folder, no sweep.json, no journal, no lock


def test_a_contradicting_space_is_refused_before_any_trial(tmp_path):
    # the epochs sampled on the command line, a warm-up fixed there: 3 epochs of warm-up in a 3-epoch trial
    tiny = [o for o in TINY if not o.startswith("train.epochs=")]
    out = run_flowvae(["train", "-m", "+search=default", *tiny, "train.epochs=choice(3,10)", "train.warmup_epochs=3",
                       "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert ("flowvae train: train.epochs=choice(3,10) is not allowed: a warm-up shorter than training in every "
            "trial: train.warmup_epochs up to 3 with train.epochs from 3 never reaches beta = 1") in out.stderr
    assert "Traceback" not in out.stderr and list(tmp_path.iterdir()) == []  # nothing made


def test_another_command_starts_its_own_study_and_its_best_trial_reruns_to_its_number(tmp_path):
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", study=None)
    assert out.returncode == 0, out.stdout + out.stderr
    out = _search(tmp_path, "hydra.sweeper.n_trials=1", "data.n_train=100", study=None, sweep="other")  # its own
    assert out.returncode == 0, out.stdout + out.stderr
    other = pd.read_csv(tmp_path / "results.csv").iloc[-1]
    line = next(line for line in (out.stdout + out.stderr).splitlines() if "best trial:" in line)
    out = _search(tmp_path, "hydra.sweeper.n_trials=2", study=None, sweep="again")  # the first one's study goes on
    assert out.returncode == 0, out.stdout + out.stderr
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(_storage(tmp_path))}
    assert sorted(studies.values()) == [1, 2], studies
    # the second command's best trial is its own, and its command line gives its number again
    assert f"kl_sum = {other['kl_sum']};" in line
    command = shlex.split(line.partition("rerun it with: flowvae ")[2])
    out = run_flowvae([c if c != "results_csv=results.csv" else "results_csv=rerun.csv" for c in command],
                      cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert pd.read_csv(tmp_path / "rerun.csv").iloc[0]["kl_sum"] == other["kl_sum"]


# --- several processes, kills and resumes ------------------------------------------------------------------------

# trials long enough (40 epochs, about a second) to be caught while training
LONG = ["train.epochs=40", "hydra.sweeper.pruner.name=none"]


def _start(tmp_path, *overrides, sweep):
    return subprocess.Popen([*flowvae_command(), *_args(tmp_path, *LONG, *overrides, sweep=sweep)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def _wait_for(path_glob, tmp_path, proc, timeout=120):
    deadline = time.time() + timeout
    while not list(tmp_path.glob(path_glob)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(path_glob)), f"nothing matched {path_glob}"


def test_two_processes_share_one_study_and_its_budget(tmp_path):
    """The README's two workers: the same command twice on one journal file (the second started while the first
    trains); every trial runs once, in one of them, and the study ends with n_trials trials."""
    first = _start(tmp_path, "hydra.sweeper.n_trials=6", sweep="a")
    _wait_for("a/*/checkpoint.pt", tmp_path, first)
    second = _start(tmp_path, "hydra.sweeper.n_trials=6", sweep="b")
    outputs = [proc.communicate(timeout=300)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    trials = _trials(tmp_path)
    assert len(trials) == 6 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both contributed
    rows = _rows_by_run(tmp_path)
    assert len(rows) == 6 and {row["status"] for row in rows.values()} == {"ok"}
    for trial in trials:  # no trial lost, none run twice: each is its own row, with its value and its parameters
        row = rows[trial.user_attrs["run_dir"]]
        assert row["kl_sum"] == trial.value and row["train.lr"] == trial.params["train.lr"]
    assert {str(tmp_path / s) for s in ("a", "b")} == {os.path.dirname(run) for run in rows}
    # a trial's folder is numbered after it, whichever process ran it
    assert sorted(int(os.path.basename(t.user_attrs["run_dir"]).split("_")[0]) for t in trials) == list(range(6))
    assert len({t.params["train.lr"] for t in trials}) == 6  # a second worker does not repeat the first's draws


@pytest.mark.parametrize("stop", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_a_killed_search_resumes_its_interrupted_trial_in_the_same_study(tmp_path, stop):
    """SIGTERM: the trial is told FAIL and queued again at once; SIGKILL: nobody tells, and the next start finds the
    trial of a process that is gone. Either way the same command resumes the run from its checkpoint."""
    proc = _start(tmp_path, "hydra.sweeper.n_trials=2", sweep="killed")
    _wait_for("killed/*/checkpoint.pt", tmp_path, proc)
    proc.send_signal(stop)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == (3 if stop == signal.SIGTERM else -signal.SIGKILL), output
    killed = _trials(tmp_path)[0]
    out = run_flowvae(_args(tmp_path, *LONG, "hydra.sweeper.n_trials=2", sweep="again"), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    if stop == signal.SIGKILL:
        assert f"its process ({killed.user_attrs['worker']['pid']}) is gone" in out.stdout + out.stderr
    trials = _trials(tmp_path)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    resumed = trials[1]
    assert resumed.params == killed.params and resumed.user_attrs["resumes"] == 0
    rows = _rows_by_run(tmp_path)
    assert len(rows) == 2  # the interrupted run wrote none
    row = rows[resumed.user_attrs["run_dir"]]
    assert str(tmp_path / "killed") in row["run_dir"]  # went on in the killed run's own directory
    assert 0 < int(row["resumed_from"]) < 40 and int(row["epochs_trained"]) == 40 and row["kl_sum"] == resumed.value


def test_a_sampled_choice_goes_back_into_its_trials_override_as_the_value_it_was():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from flowvae.search.space import parse_space

    space, _ = parse_space(["+extra=choice(planar, 'b c', 'x,y', 0.5, true)"])
    parser = OverridesParser.create()
    assert [parser.parse_override(f"+extra={c}").value() for c in space["+extra"].choices] == [
        "planar", "b c", "x,y", 0.5, True]


def _worker_asking_slowly(spec: str, done) -> None:
    """One process of the test below: asks and tells trials until the study is full, each ask 50 ms late."""
    from flowvae.search.storage import open_storage
    from flowvae.sweeps.optuna_sweeper import OptunaSweeper, _worker

    study = optuna.load_study(study_name="race", storage=open_storage(spec))
    ask = study.ask

    def slow_ask(*args, **kwargs):
        time.sleep(0.05)  # between counting the trials and adding one: where another process could count too
        return ask(*args, **kwargs)

    study.ask = slow_ask
    sweeper = OptunaSweeper(n_trials=5, n_jobs=1, sampler={"name": "random", "seed": 0})
    space, worker = {"x": FloatDistribution(0, 1)}, _worker()
    while trials := sweeper._next(study, spec, space, worker):
        for trial in trials:
            study.tell(trial, trial.params["x"])
    done.put(os.getpid())


def test_processes_that_ask_at_once_never_take_more_than_the_studys_trials(tmp_path):
    import multiprocessing

    from flowvae.search.storage import open_storage

    spec = f"journal:{tmp_path / 'race.journal'}"
    optuna.create_study(study_name="race", storage=open_storage(spec))
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    workers = [context.Process(target=_worker_asking_slowly, args=(spec, done)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(done.get(timeout=5) for _ in workers) == sorted(w.pid for w in workers)
    trials = optuna.load_study(study_name="race", storage=open_storage(spec)).trials
    assert len(trials) == 5 and {t.state for t in trials} == {TrialState.COMPLETE}


def test_a_batch_is_launched_in_runs_of_consecutive_trial_numbers():
    """Job numbers are trial numbers; a queued trial (an older number) among new ones is launched on its own."""
    from types import SimpleNamespace

    from flowvae.sweeps.optuna_sweeper import _numbered_runs

    trials = [SimpleNamespace(number=n) for n in (12, 3, 13, 14, 7)]
    assert [[t.number for t in run] for run in _numbered_runs(trials)] == [[3], [7], [12, 13, 14]]
