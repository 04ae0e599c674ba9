"""train.select_by: a metric of events generated after each epoch (kl_sum, ...) picks the best epoch (best.pt,
best_epoch, the patience) instead of the validation loss; the selection resumes exactly; a run computes the real
metric on its validation events and scores the epoch with its lowest value; settings that cannot work are refused."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from flowvae import stopping
from flowvae.files import RunFiles
from flowvae.models import FlowVAE
from flowvae.run import experiment, job, trial
from flowvae.run.rebuild import load_run
from flowvae.training import kit
from flowvae.training.callbacks import Callback
from flowvae.training.kit import check_selection, split_validation
from flowvae.training.loop import fit
from tests.conftest import TINY, compose_config, stop_after_step, stopped_and_whole_rows


def _cfg(**overrides):
    base = {"epochs": 6, "batch_size": 20, "lr": 1e-3, "warmup_epochs": 0, "grad_clip": None, "checkpoint_every": 1,
            "eval_every": 1, "progress": "log", "val_fraction": 0.2, "patience": None, "lr_schedule": "constant",
            "lr_min_factor": 0.0, "ema": 0.0, "select_by": "kl_sum"}
    return OmegaConf.create({**base, **overrides})


def _model():
    torch.manual_seed(0)
    return FlowVAE(30, [16], 3, "planar", 2)


def _split():
    """(training, validation, held-out) events: 100 to train on (5 steps an epoch), 25 to validate."""
    g = torch.Generator().manual_seed(1)
    train_x, val_x = split_validation(torch.randn(125, 30, generator=g), 0.2, 0)
    return train_x, val_x, torch.randn(40, 30, generator=g)


class _Sequence:
    """A measure that returns ``values`` one an epoch; ``calls``: how often it was asked."""

    def __init__(self, values: list[float]) -> None:
        self.values, self.calls = iter(values), 0

    def __call__(self) -> float:
        self.calls += 1
        return next(self.values)


def _validation_losses(monkeypatch, losses: list[float]):
    """Make the validation pass return ``losses`` epoch by epoch (the test loss is evaluated as usual)."""
    evaluate, calls = kit.evaluate_loss, iter(losses)

    def patched(model, x, seed=0, batch_size=1000):
        if seed % 10 == kit.VAL_SEED_OFFSET:
            return {"loss": next(calls), "recon": 0.0, "kl": 0.0}
        return evaluate(model, x, seed, batch_size)

    monkeypatch.setattr(kit, "evaluate_loss", patched)


class _Snapshots(Callback):
    def __init__(self, model, store: list) -> None:
        self.model, self.store = model, store

    def on_epoch_end(self, row, history):
        self.store.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_the_epoch_with_the_lowest_metric_is_the_best_and_its_patience_stops(tmp_path, monkeypatch, caplog):
    """kl_sum is lowest in epoch 2, the validation loss in epoch 4: epoch 2 is the best (best.pt, the model's
    weights, best_epoch), and 3 epochs without a lower kl_sum stop training after epoch 5 although the validation
    loss fell."""
    train_x, val_x, test_x = _split()
    _validation_losses(monkeypatch, [5.0, 4.0, 3.0, 1.0, 2.0, 0.5])
    measure = _Sequence([0.5, 0.2, 0.3, 0.2, 0.4, 0.1])  # 0.2 again in epoch 4 is no better
    model, snapshots = _model(), []
    with caplog.at_level(logging.INFO, logger="flowvae.training.loop"):
        outcome = fit(model, train_x, test_x, _cfg(patience=3), seed=10, val_x=val_x, select=measure,
                      checkpoint=tmp_path / "checkpoint.pt", best=tmp_path / "best.pt",
                      callbacks=_Snapshots(model, snapshots))
    assert outcome.status == "ok" and outcome.best_epoch == 2 and outcome.epochs_trained == 5 == measure.calls
    assert [row["val_kl_sum"] for row in outcome.history] == [0.5, 0.2, 0.3, 0.2, 0.4]
    assert [row["val_loss"] for row in outcome.history] == [5.0, 4.0, 3.0, 1.0, 2.0]  # still in the curves
    assert "no better validation kl_sum for 3 epochs; best epoch 2 (validation kl_sum 0.2000)" in caplog.text
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["val_kl_sum"] == 0.2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshots[1][name]) and torch.equal(best["model"][name], tensor), name
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["validation"]
    assert state == {"best_loss": 0.2, "best_epoch": 2, "since_best": 3, "stopped": True, "select_by": "kl_sum"}

    again = _model()  # a rerun trains no further, measures nothing and ends with the same weights
    outcome = fit(again, train_x, test_x, _cfg(patience=3), seed=10, val_x=val_x, select=_Sequence([]),
                  checkpoint=tmp_path / "checkpoint.pt", best=tmp_path / "best.pt")
    assert outcome.epochs_run == 0 and outcome.best_epoch == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_a_metric_the_generated_events_fail_is_never_the_best(monkeypatch, caplog):
    train_x, val_x, test_x = _split()

    def failing():
        failing.calls += 1
        if failing.calls == 1:
            raise ValueError("the generated events are not finite")
        return 1.0

    failing.calls = 0
    with caplog.at_level(logging.WARNING, logger="flowvae.training.kit"):
        outcome = fit(_model(), train_x, test_x, _cfg(epochs=2), seed=0, val_x=val_x, select=failing)
    assert [row["val_kl_sum"] for row in outcome.history] == [math.inf, 1.0] and outcome.best_epoch == 2
    assert "validation kl_sum after epoch 1 is inf: the generated events are not finite" in caplog.text


def _weights_measure(model, val_x):
    """A stand-in for a metric of generated events: a function of the weights alone that is not the validation
    loss (the validation loss under other noise, its sign turned: it picks another epoch)."""
    return lambda: -kit.evaluate_loss(model, val_x, seed=99)["loss"]


# inside epoch 2 (5 steps an epoch), at its end, inside epoch 3, inside epoch 4 (the last: patience 3 after 1)
@pytest.mark.parametrize("stop_at", [7, 10, 13, 18])
def test_resume_after_a_stop_gives_the_uninterrupted_selection(tmp_path, monkeypatch, stop_at):
    train_x, val_x, test_x = _split()
    cfg = _cfg(lr=3e-2, patience=3, lr_schedule="cosine", ema=0.9)
    reference = _model()
    whole = fit(reference, train_x, test_x, cfg, seed=0, val_x=val_x, select=_weights_measure(reference, val_x),
                best=tmp_path / "whole_best.pt")
    by_loss = min(range(len(whole.history)), key=lambda i: whole.history[i]["val_loss"]) + 1
    assert whole.best_epoch == 1 and by_loss != 1 and whole.epochs_trained == 4  # the metric's pick, not the loss's
    checkpoint, best = tmp_path / "checkpoint.pt", tmp_path / "best.pt"
    model = _model()
    with monkeypatch.context() as patch:
        stop = stop_after_step(patch, stop_at)
        outcome = fit(model, train_x, test_x, cfg, seed=0, val_x=val_x, select=_weights_measure(model, val_x),
                      checkpoint=checkpoint, best=best, callbacks=stop)
    assert outcome.status == "interrupted"
    resumed = _model()
    torch.manual_seed(123)
    outcome = fit(resumed, train_x, test_x, cfg, seed=0, val_x=val_x, select=_weights_measure(resumed, val_x),
                  checkpoint=checkpoint, best=best)
    assert (outcome.best_epoch, outcome.epochs_trained) == (whole.best_epoch, whole.epochs_trained)
    assert _history(outcome) == _history(whole)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def _history(outcome):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in outcome.history]


def test_a_checkpoint_selected_otherwise_is_not_resumed(tmp_path):
    train_x, val_x, test_x = _split()
    fit(_model(), train_x, test_x, _cfg(epochs=1, select_by="val_loss"), seed=0, val_x=val_x,
        checkpoint=tmp_path / "c.pt")
    with pytest.raises(kit.CheckpointMismatch, match="chose its best epoch by val_loss"):
        fit(_model(), train_x, test_x, _cfg(epochs=2), seed=0, val_x=val_x, select=_Sequence([1.0]),
            checkpoint=tmp_path / "c.pt")


def test_the_loops_refuse_a_selection_they_cannot_make():
    train_x, val_x, test_x = _split()
    with pytest.raises(ValueError, match=r"train.select_by=kl_sum needs validation events"):
        check_selection(_cfg(), None, _Sequence([]))
    with pytest.raises(ValueError, match=r"train.select_by=kl_sum needs its measure"):
        fit(_model(), train_x, test_x, _cfg(), seed=0, val_x=val_x)
    with pytest.raises(ValueError, match="train.select_by is val_loss"):
        check_selection(_cfg(select_by="val_loss"), val_x, _Sequence([]))


def _patch_metric(monkeypatch, values: list[float]):
    """The run's metric on its validation events returns ``values`` one a call (generation runs as usual)."""
    real = trial.objective_metric
    calls = iter(values)

    def patched(metric, bins, eps):
        real(metric, bins, eps)  # refuses what it refuses
        return lambda *events: next(calls)

    monkeypatch.setattr(trial, "objective_metric", patched)


def test_a_run_scores_the_epoch_its_metric_picks(tmp_path, monkeypatch):
    """Through the job, the metric made to return a known sequence: the row's best_epoch, the curves' column and
    the rebuilt run's weights are the epoch with the lowest kl_sum (2), not the lowest validation loss."""
    _patch_metric(monkeypatch, [0.3, 0.1, 0.2, 0.4])
    cfg = compose_config(*TINY, "seed=10", "train.epochs=4", "train.val_fraction=0.2", "train.select_by=kl_sum",
                         f"results_csv={tmp_path / 'results.csv'}")
    assert job.run(cfg, tmp_path / "run", tmp_path) == 0
    stopping.reset()
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert (row["best_epoch"], row["epochs_trained"]) == (2, 4)
    curves = pd.read_csv(RunFiles(tmp_path / "run").curves)
    assert list(curves["val_kl_sum"]) == [0.3, 0.1, 0.2, 0.4]
    assert curves["val_loss"].idxmin() + 1 != 2  # the validation loss would have picked another epoch
    files = RunFiles(tmp_path / "run")
    files.config.parent.mkdir()
    OmegaConf.save(cfg, files.config)
    run = load_run(tmp_path / "run", device="cpu")
    best = torch.load(files.best, weights_only=True)
    assert run.scored_epoch == best["epoch"] == 2
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, best["model"][name]), name


def test_the_real_metric_is_the_validation_events_kl_sum_of_the_scored_model(tmp_path):
    """Unpatched: each epoch's val_kl_sum is validation_objective's kl_sum of the weights of that epoch; the scored
    (rebuilt) model's is the lowest of them."""
    cfg = compose_config(*TINY, "train.epochs=3", "train.val_fraction=0.2", "train.select_by=kl_sum",
                         "train.ema=0.9", f"results_csv={tmp_path / 'results.csv'}")
    assert job.run(cfg, tmp_path / "run", tmp_path) == 0
    stopping.reset()
    files = RunFiles(tmp_path / "run")
    curves = pd.read_csv(files.curves)
    files.config.parent.mkdir()
    OmegaConf.save(cfg, files.config)
    run = load_run(tmp_path / "run", device="cpu")
    _, val_x, _ = experiment.model_tensors(run.cfg, run.events, run.feature_map, run.device)
    value = trial.validation_objective(run.cfg, run.model, val_x, run.events, run.feature_map, metric="kl_sum")()
    assert value == curves["val_kl_sum"].min() == curves["val_kl_sum"][run.scored_epoch - 1]
    assert pd.read_csv(tmp_path / "results.csv").iloc[0]["best_epoch"] == run.scored_epoch


def test_a_run_stopped_by_sigterm_and_rerun_scores_what_an_uninterrupted_run_scores(tmp_path, monkeypatch):
    """The whole job with select_by=kl_sum (the real metric), the average and patience: SIGTERM after the first
    epoch, then the same command again, gives the row of a run never stopped."""
    settings = [*TINY, "seed=10", "train.epochs=4", "train.val_fraction=0.25", "train.patience=1",
                "train.select_by=kl_sum", "train.ema=0.9", "train.lr=3e-2"]
    resumed, uninterrupted = stopped_and_whole_rows(monkeypatch, tmp_path, settings)
    assert resumed["resumed_from"] == 1 and uninterrupted["resumed_from"] == 0
    scored = [c for c in resumed.index
              if c.startswith(("kl_", "w1_", "final_")) or c in ("epochs_trained", "best_epoch")]
    assert (resumed[scored] == uninterrupted[scored]).all()
    curves = [pd.read_csv(RunFiles(tmp_path / name).curves) for name in ("stopped", "whole")]
    pd.testing.assert_frame_equal(curves[0].drop(columns="seconds"), curves[1].drop(columns="seconds"))
    assert uninterrupted["best_epoch"] == curves[1]["val_kl_sum"].idxmin() + 1


def test_a_trial_reports_the_metric_its_run_selected_by_without_generating_again():
    """A search trial reporting its objective (kl_sum) in a run that selects by kl_sum: the epoch's value from the
    row, the measure not called again (the same weights and noise would give the same number)."""
    from types import SimpleNamespace

    from flowvae.search.pruning import TrialLink

    reported = []
    fake_trial = SimpleNamespace(report=lambda value, step: reported.append((value, step)), should_prune=lambda: False)

    def measure():
        raise AssertionError("generated again")

    measure.metric = "kl_sum"
    pruning = trial.Pruning(TrialLink("sqlite:///x", "s", 0, {"name": "median"}), None, fake_trial, "objective",
                            measure)
    assert pruning.should_prune({"epoch": 3, "val_loss": 1.0, "val_kl_sum": 0.25}) is None
    assert reported == [(0.25, 3)]
    measure.metric = "w1_sum"
    with pytest.raises(AssertionError, match="generated again"):
        pruning.should_prune({"epoch": 4, "val_loss": 1.0, "val_kl_sum": 0.25})


def test_a_stacked_group_leaves_select_by_runs_to_their_jobs(tmp_path, caplog):
    """hydra/launcher=stacked: seeds that select by a metric of generated events are not stacked (the group does
    not build their measures); each job trains alone. train.ema alone stacks."""
    from flowvae.sweeps.group import Member, train_group

    settings = [*TINY, "train.val_fraction=0.2", f"results_csv={tmp_path / 'results.csv'}"]
    members = [Member(compose_config(*settings, "train.select_by=kl_sum", f"seed={seed}"), tmp_path / f"s{seed}")
               for seed in range(2)]
    with caplog.at_level(logging.INFO, logger="flowvae.sweeps.group"):
        assert train_group(members, tmp_path, tmp_path) == 0
    assert "stacked training skipped (train.select_by=kl_sum" in caplog.text
    assert not any(member.run_dir.exists() for member in members)
    enough = ["train.batch_size=8", "train.epochs=3"]  # 60 steps a seed: enough to stack (group.MIN_STEPS)
    members = [Member(compose_config(*settings, *enough, "train.ema=0.9", f"seed={seed}"), tmp_path / f"e{seed}")
               for seed in range(2)]
    assert train_group(members, tmp_path, tmp_path) == 2
    assert all("ema" in torch.load(RunFiles(m.run_dir).checkpoint, weights_only=False) for m in members)
