"""Validation split, early stopping on the validation loss, the best epoch's weights, the cosine learning rate, and
exact resume with all of them on."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from flowvae import stopping
from flowvae.config import validate
from flowvae.errors import ConfigError
from flowvae.files import RunFiles
from flowvae.models import FlowVAE
from flowvae.run import experiment, job
from flowvae.run.rebuild import load_run
from flowvae.training import kit
from flowvae.training import loop as train_module
from flowvae.training.callbacks import Callback
from flowvae.training.kit import check_checkpoint, learning_rate, split_validation
from flowvae.training.loop import fit
from tests.conftest import TINY, compose_config, stop_after_step, stopped_and_whole_rows


def _cfg(**overrides):
    base = {"epochs": 6, "batch_size": 20, "lr": 1e-3, "warmup_epochs": 0, "grad_clip": None, "checkpoint_every": 1,
            "eval_every": 1, "progress": "log", "val_fraction": 0.2, "patience": None, "lr_schedule": "constant",
            "lr_min_factor": 0.0}
    return OmegaConf.create({**base, **overrides})


def _model():
    torch.manual_seed(0)
    return FlowVAE(30, [16], 3, "planar", 2)


def _data():
    """125 training events (unique rows) and 40 held out; the split leaves 100 to train on, 5 steps an epoch."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(125, 30, generator=g), torch.randn(40, 30, generator=g)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def _record_steps(monkeypatch):
    """Patch the training step to record each batch and the learning rate the optimizer steps with."""
    make_step = train_module.make_step
    seen = {"batches": [], "lr": []}

    def patched(model, optimizer, grad_clip):
        step = make_step(model, optimizer, grad_clip)

        def recording(batch, beta):
            seen["batches"].append(batch.clone())
            seen["lr"].append(optimizer.param_groups[0]["lr"])
            return step(batch, beta)

        return recording

    monkeypatch.setattr(train_module, "make_step", patched)
    return seen


def _validation_losses(monkeypatch, losses: list[float]):
    """Make the validation pass return ``losses`` epoch by epoch (the test loss is evaluated as usual)."""
    evaluate = kit.evaluate_loss
    calls = iter(losses)

    def patched(model, x, seed=0, batch_size=1000):
        if seed % 10 == kit.VAL_SEED_OFFSET:  # fit's seeds below are multiples of 10
            return {"loss": next(calls), "recon": 0.0, "kl": 0.0}
        return evaluate(model, x, seed, batch_size)

    monkeypatch.setattr(kit, "evaluate_loss", patched)


class _Snapshots(Callback):
    """The model's weights after every epoch, in ``store``."""

    def __init__(self, model, store: list) -> None:
        self.model, self.store = model, store

    def on_epoch_end(self, row, history):
        self.store.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_the_validation_events_are_never_trained_on_and_are_the_same_for_every_model_seed(monkeypatch):
    full, test_x = _data()
    train_x, val_x = split_validation(full, 0.2, data_seed=7)
    assert (len(train_x), len(val_x)) == (100, 25)
    assert not _rows(train_x) & _rows(val_x) and _rows(train_x) | _rows(val_x) == _rows(full)
    seen = _record_steps(monkeypatch)
    fit(_model(), train_x, test_x, _cfg(epochs=2), seed=0, val_x=val_x)
    trained = set().union(*(_rows(batch) for batch in seen["batches"]))
    assert trained == _rows(train_x) and not trained & _rows(val_x)
    for model_seed in (1, 2):  # the split takes the data's seed only
        assert torch.equal(split_validation(full, 0.2, data_seed=7)[1], val_x), model_seed
    assert not torch.equal(split_validation(full, 0.2, data_seed=8)[1], val_x)
    assert split_validation(full, 0.0, data_seed=7) == (full, None)
    assert [len(v) for _, v in (split_validation(full[:2], f, 0) for f in (0.01, 0.99))] == [1, 1]


def test_a_run_validates_on_training_events_only_the_same_for_every_model_seed(tmp_path, monkeypatch):
    """Through the experiment: the validation events come out of the training events, never the scoring set."""
    captured = []
    real_fit = experiment.fit

    def capturing(model, train_x, test_x, cfg_train, **kwargs):
        captured.append((train_x, test_x, kwargs["val_x"]))
        return real_fit(model, train_x, test_x, cfg_train, **kwargs)

    monkeypatch.setattr(experiment, "fit", capturing)
    for seed in (0, 1):
        cfg = compose_config(*TINY, f"seed={seed}", "train.val_fraction=0.25", f"results_csv={tmp_path / 'r.csv'}")
        assert job.run(cfg, tmp_path / f"run{seed}", tmp_path) == 0
        stopping.reset()
    (train0, test0, val0), (_, _, val1) = captured
    assert len(val0) == 50 and len(train0) == 150
    assert torch.equal(val0, val1)
    assert not _rows(val0) & _rows(train0) and not _rows(val0) & _rows(test0)


def test_early_stopping_stops_patience_epochs_after_the_best_and_keeps_its_weights(tmp_path, monkeypatch, caplog):
    train_x, val_x = split_validation(_data()[0], 0.2, 0)
    _validation_losses(monkeypatch, [5.0, 4.0, 3.0, 3.5, 3.0, 3.2, 1.0, 1.0])  # epoch 3 best; 3.0 is no better
    model, snapshots = _model(), []
    with caplog.at_level(logging.INFO, logger="flowvae.training.loop"):
        outcome = fit(model, train_x, _data()[1], _cfg(epochs=8, patience=3), seed=10, val_x=val_x,
                      checkpoint=tmp_path / "checkpoint.pt", best=tmp_path / "best.pt",
                      callbacks=_Snapshots(model, snapshots))
    assert outcome.status == "ok" and outcome.best_epoch == 3 and outcome.epochs_trained == 6 == len(snapshots)
    assert [row["val_loss"] for row in outcome.history] == [5.0, 4.0, 3.0, 3.5, 3.0, 3.2]
    assert "no better validation loss for 3 epochs; best epoch 3" in caplog.text
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshots[2][name]) and torch.equal(best["model"][name], tensor), name
    assert any(not torch.equal(model.state_dict()[n], snapshots[-1][n]) for n in snapshots[-1])  # not the last

    again = _model()  # a rerun (e.g. after a stop while scoring) trains no further and ends with the same weights
    outcome = fit(again, train_x, _data()[1], _cfg(epochs=8, patience=3), seed=10, val_x=val_x,
                  checkpoint=tmp_path / "checkpoint.pt", best=tmp_path / "best.pt")
    assert outcome.epochs_run == 0 and outcome.epochs_trained == 6 and outcome.best_epoch == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_without_patience_training_runs_every_epoch_and_ends_with_the_best():
    train_x, test_x = _data()
    train_x, val_x = split_validation(train_x, 0.2, 0)
    model, snapshots = _model(), []
    outcome = fit(model, train_x, test_x, _cfg(epochs=4, lr=0.1), seed=0, val_x=val_x,
                  callbacks=_Snapshots(model, snapshots))
    losses = [row["val_loss"] for row in outcome.history]
    assert len(losses) == 4 and outcome.best_epoch == 1 + int(np.argmin(losses)) == 2  # lr 0.1: noisy
    reference = kit.evaluate_loss(model, val_x, seed=kit.VAL_SEED_OFFSET)["loss"]
    assert reference == min(losses)  # the model's own validation loss is the best epoch's


@pytest.mark.parametrize("factor", [0.0, 0.1])
def test_the_cosine_learning_rate_at_every_step_is_the_closed_form(monkeypatch, factor):
    train_x, test_x = _data()
    seen = _record_steps(monkeypatch)
    outcome = fit(_model(), train_x, test_x, _cfg(epochs=3, lr=2e-3, lr_schedule="cosine", lr_min_factor=factor,
                                                    val_fraction=0.0, batch_size=25), seed=0)
    total = 3 * 5  # 125 events, batches of 25
    low = 2e-3 * factor
    expected = low + 0.5 * (2e-3 - low) * (1 + np.cos(np.pi * np.arange(total) / total))
    np.testing.assert_allclose(seen["lr"], expected, rtol=1e-12, atol=0)
    assert seen["lr"][0] == 2e-3
    np.testing.assert_allclose([row["lr"] for row in outcome.history], expected[4::5], rtol=1e-12)
    assert learning_rate(_cfg(lr_schedule="constant"), 7, total) == 1e-3


def test_the_cosine_schedule_trains_other_weights_than_constant():
    train_x, test_x = _data()
    constant, cosine = _model(), _model()
    fit(constant, train_x, test_x, _cfg(epochs=2, val_fraction=0.0), seed=0)
    fit(cosine, train_x, test_x, _cfg(epochs=2, val_fraction=0.0, lr_schedule="cosine"), seed=0)
    pairs = zip(constant.state_dict().values(), cosine.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


ALL_ON = {"epochs": 8, "lr": 0.03, "val_fraction": 0.2, "patience": 2, "lr_schedule": "cosine", "lr_min_factor": 0.1}


def _shifted_split():
    """Training events and validation events unlike them (scaled and shifted): fitting the first makes the loss
    of the second rise after epoch 3, so early stopping stops (at epoch 5 with patience 2)."""
    train_x, test_x = _data()
    train_x, val_x = split_validation(train_x, 0.2, 0)
    return train_x, test_x, val_x * 2.0 + 1.0


def _full_run(tmp_path, name):
    train_x, test_x, val_x = _shifted_split()
    model = _model()
    outcome = fit(model, train_x, test_x, _cfg(**ALL_ON), seed=0, val_x=val_x, checkpoint=tmp_path / f"{name}.pt",
                  best=tmp_path / f"{name}_best.pt")
    return model, outcome


# inside epoch 2 (5 steps an epoch), at its end, inside epoch 3, inside epoch 4 (after the best epoch, 3)
@pytest.mark.parametrize("stop_at", [7, 10, 13, 18])
def test_resume_with_validation_cosine_and_patience_gives_the_uninterrupted_numbers(tmp_path, monkeypatch,
                                                                                      stop_at):
    reference, whole = _full_run(tmp_path, "whole")
    assert (whole.best_epoch, whole.epochs_trained) == (3, 5)
    train_x, test_x, val_x = _shifted_split()
    checkpoint, best = tmp_path / "checkpoint.pt", tmp_path / "best.pt"
    with monkeypatch.context() as patch:
        stop = stop_after_step(patch, stop_at)
        outcome = fit(_model(), train_x, test_x, _cfg(**ALL_ON), seed=0, val_x=val_x, checkpoint=checkpoint,
                      best=best, callbacks=stop)
    assert outcome.status == "interrupted"
    resumed = _model()
    torch.manual_seed(123)
    outcome = fit(resumed, train_x, test_x, _cfg(**ALL_ON), seed=0, val_x=val_x, checkpoint=checkpoint, best=best)
    assert outcome.status == "ok" and outcome.resumed_from == stop_at // 5
    assert (outcome.best_epoch, outcome.epochs_trained) == (whole.best_epoch, whole.epochs_trained)
    assert _history(outcome) == _history(whole)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def _history(outcome):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in outcome.history]


def test_a_kill_after_a_better_epoch_and_before_the_next_checkpoint_resumes_exactly(tmp_path):
    """best.pt is written at once, the checkpoint every 2 epochs: killed in between (after epoch 3, the best), best.pt
    is ahead of the checkpoint; the resumed run trains epoch 3 again and ends with the uninterrupted numbers."""
    reference, whole = _full_run(tmp_path, "whole")
    assert whole.best_epoch == 3
    train_x, test_x, val_x = _shifted_split()
    checkpoint, best = tmp_path / "checkpoint.pt", tmp_path / "best.pt"

    class Kill(Callback):
        def on_epoch_end(self, row, history):
            if len(history) == 3:  # after best.pt took epoch 3, before its checkpoint
                raise KeyboardInterrupt

    cfg = _cfg(**{**ALL_ON, "checkpoint_every": 2})
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), train_x, test_x, cfg, seed=0, val_x=val_x, checkpoint=checkpoint, best=best, callbacks=Kill())
    assert torch.load(best, weights_only=True)["epoch"] == 3 and check_checkpoint(checkpoint, {}) == 2
    resumed = _model()
    outcome = fit(resumed, train_x, test_x, cfg, seed=0, val_x=val_x, checkpoint=checkpoint, best=best)
    assert outcome.best_epoch == whole.best_epoch and _history(outcome) == _history(whole)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


# The history of the training in test_train.py's first test (3 epochs, warm-up 1) before these keys existed.
BEFORE = [(44.85912551879883, 44.06276321411133), (44.86460647583008, 43.91423416137695),
          (44.7231948852539, 43.789005279541016)]


def test_the_defaults_train_the_numbers_of_before():
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(100, 30, generator=g), torch.randn(40, 30, generator=g)
    old_keys = {"epochs": 3, "batch_size": 20, "lr": 1e-3, "warmup_epochs": 1, "grad_clip": None,
                "checkpoint_every": 1, "eval_every": 1, "progress": "log"}
    absent = _model()
    outcome = fit(absent, train_x, test_x, OmegaConf.create(old_keys), seed=0)
    losses = [(row["train_loss"], row["test_loss"]) for row in outcome.history]
    # BEFORE was recorded on another machine: float32 training whose matrix products round differently with the
    # CPU and the torch build (measured: 3.4e-8 relative on a second machine). rtol=1e-5 is 300 times that and
    # still catches a change in what the defaults train: train.lr 1% off moves these by 9e-5, no warm-up by 4e-3,
    # batch size 25 by 9e-3. Bit for bit on one machine: the state dicts below.
    np.testing.assert_allclose(losses, BEFORE, rtol=1e-5)
    assert outcome.best_epoch is None and outcome.epochs_trained == 3
    assert list(outcome.history[0]) == ["epoch", "beta", "train_loss", "train_recon", "train_kl", "test_loss",
                                        "test_recon", "test_kl", "seconds"]  # the curves' columns of before
    defaults = OmegaConf.to_container(compose_config().train)
    present = _model()
    split, val_x = split_validation(train_x, defaults["val_fraction"], 0)
    fit(present, split, test_x, OmegaConf.create({**defaults, **old_keys}), seed=0, val_x=val_x)
    for name, tensor in absent.state_dict().items():
        assert torch.equal(tensor, present.state_dict()[name]), name


@pytest.mark.parametrize(("override", "message"), [
    ("train.patience=5", "train.patience=5 is not allowed: null unless train.val_fraction > 0"),
    ("train.val_fraction=1.0", r"train.val_fraction=1.0 is not allowed: a number in \[0, 1\)"),
    ("train.val_fraction=-0.1", r"train.val_fraction=-0.1 is not allowed: a number in \[0, 1\)"),
    ("train.val_fraction=nan", "train.val_fraction=nan"),
    ("train.lr_schedule=step", "train.lr_schedule=step is not allowed: one of constant, cosine"),
    ("train.lr_min_factor=1.5", r"train.lr_min_factor=1.5 is not allowed: a number in \[0, 1\]"),
    ("train.val_fraction=0.1 train.patience=0", "train.patience=0 is not allowed: an integer >= 1"),
])
def test_bad_training_settings_are_refused_with_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*override.split()))
    validate(compose_config("train.val_fraction=0.1", "train.patience=5", "train.lr_schedule=cosine"))


def test_the_row_the_curves_and_a_rebuilt_run_use_the_best_epoch(tmp_path, monkeypatch, capsys):
    """An early-stopped run: its row says where it stopped and which epoch it scored, its curves have the
    validation loss and learning rate, and the rebuilt run (generate, evaluate) holds the best epoch's weights."""
    _validation_losses(monkeypatch, [2.0, 1.0, 1.5, 1.7, 1.1])
    cfg = compose_config(*TINY, "seed=10", "train.epochs=5", "train.val_fraction=0.2", "train.patience=2",
                         "train.lr_schedule=cosine", f"results_csv={tmp_path / 'results.csv'}")
    assert job.run(cfg, tmp_path / "run", tmp_path) == 0
    stopping.reset()
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert (row["epochs_trained"], row["best_epoch"], row["epochs_run"], row["resumed_from"]) == (4, 2, 4, 0)
    curves = pd.read_csv(RunFiles(tmp_path / "run").curves)
    assert list(curves["val_loss"]) == [2.0, 1.0, 1.5, 1.7] and curves["lr"].is_monotonic_decreasing
    files = RunFiles(tmp_path / "run")
    files.config.parent.mkdir()
    OmegaConf.save(cfg, files.config)  # what Hydra writes beside a run launched from the command line
    best = torch.load(files.best, weights_only=True)
    last = torch.load(files.checkpoint, weights_only=False)["model"]
    run = load_run(tmp_path / "run", device="cpu")  # stopped early: finished, though before train.epochs
    assert best["epoch"] == 2 and run.scored_epoch == run.best_epoch == 2 and run.epoch == 4
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, best["model"][name]), name
    assert any(not torch.equal(best["model"][n], last[n]) for n in last)
    from flowvae.commands.generate import main as generate_main

    capsys.readouterr()
    assert generate_main([str(tmp_path / "run"), "--n", "10", "--out", str(tmp_path / "gen.npy")]) == 0
    assert "epoch 2, the best validation epoch of 4" in capsys.readouterr().out  # says which weights generated

    plain = compose_config(*TINY, f"results_csv={tmp_path / 'plain.csv'}")
    assert job.run(plain, tmp_path / "plain", tmp_path) == 0
    row = pd.read_csv(tmp_path / "plain.csv").iloc[0]
    assert row["best_epoch"] == row["epochs_trained"] == 2  # no validation: the last epoch is scored
    assert not RunFiles(tmp_path / "plain").best.exists()


def test_a_run_stopped_by_sigterm_and_rerun_scores_what_an_uninterrupted_run_scores(tmp_path, monkeypatch):
    """The whole job, with validation, cosine and patience on: SIGTERM after the first epoch, then the same
    command again, gives the row of a run never stopped. The validation loss is made to rise with training (its
    sign turned: still a function of the weights), so epoch 1 is the best, written before the stop, and the
    resumed run stops after epoch 2 and scores epoch 1's weights from best.pt."""

    evaluate = kit.evaluate_loss

    def rising(model, x, seed=0, batch_size=1000):
        losses = evaluate(model, x, seed, batch_size)
        return {**losses, "loss": -losses["loss"]} if seed % 10 == kit.VAL_SEED_OFFSET else losses

    monkeypatch.setattr(kit, "evaluate_loss", rising)
    settings = [*TINY, "seed=10", "train.epochs=4", "train.val_fraction=0.25", "train.patience=1",
                "train.lr_schedule=cosine"]
    resumed, uninterrupted = stopped_and_whole_rows(monkeypatch, tmp_path, settings)
    assert resumed["resumed_from"] == 1 and uninterrupted["resumed_from"] == 0
    scored = [c for c in resumed.index
              if c.startswith(("kl_", "w1_", "final_")) or c in ("epochs_trained", "best_epoch")]
    assert (resumed[scored] == uninterrupted[scored]).all()
    assert (uninterrupted["best_epoch"], uninterrupted["epochs_trained"]) == (1, 2)  # it did stop early
    assert resumed["epochs_run"] + resumed["resumed_from"] == resumed["epochs_trained"]
