"""train.ema: the moving average of the weights is the bias-corrected average over every step's weights, it is what
validates, is tested, returned, checkpointed (``model``) and kept as the best epoch's, it changes no training weight,
and a run resumed after a stop, inside an epoch too, ends with the uninterrupted numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from flowvae import stopping
from flowvae.files import RunFiles
from flowvae.models import FlowVAE
from flowvae.run import job
from flowvae.run.rebuild import load_run
from flowvae.training import kit
from flowvae.training import loop as train_module
from flowvae.training.callbacks import Callback
from flowvae.training.kit import CheckpointMismatch, Plan, split_validation
from flowvae.training.loop import fit
from tests.conftest import TINY, compose_config, stop_after_step

DECAY = 0.9


def _cfg(**overrides):
    base = {"epochs": 3, "batch_size": 20, "lr": 1e-2, "warmup_epochs": 1, "grad_clip": None, "checkpoint_every": 1,
            "eval_every": 1, "progress": "log", "val_fraction": 0.0, "patience": None, "lr_schedule": "constant",
            "lr_min_factor": 0.0, "ema": DECAY, "select_by": "val_loss"}
    return OmegaConf.create({**base, **overrides})


def _model():
    torch.manual_seed(0)
    return FlowVAE(30, [16], 3, "planar", 2)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(100, 30, generator=g), torch.randn(40, 30, generator=g)


def _split(shifted: bool = False):
    """(training, validation, held-out) events: 100 to train on (5 steps an epoch), 25 to validate; ``shifted``:
    validation events unlike the training ones, whose loss rises once training fits the first (an early stop)."""
    g = torch.Generator().manual_seed(1)
    train_x, val_x = split_validation(torch.randn(125, 30, generator=g), 0.2, 0)
    return train_x, val_x * 2.0 + 1.0 if shifted else val_x, torch.randn(40, 30, generator=g)


def _weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _record_weights(monkeypatch) -> list[dict]:
    """Patch fit's step to record the model's (training) weights after every optimizer step."""
    make_step, seen = train_module.make_step, []

    def patched(model, optimizer, grad_clip):
        step = make_step(model, optimizer, grad_clip)

        def recording(batch, beta):
            out = step(batch, beta)
            seen.append(_weights(model))
            return out

        return recording

    monkeypatch.setattr(train_module, "make_step", patched)
    return seen


class _Snapshots(Callback):
    """The model's weights as each epoch's end shows them to the callbacks, in ``store``."""

    def __init__(self, model, store: list) -> None:
        self.model, self.store = model, store

    def on_epoch_end(self, row, history):
        self.store.append({k: v.clone() for k, v in self.model.state_dict().items()})


def test_the_average_is_the_hand_computed_one_over_every_step(tmp_path, monkeypatch):
    """2 epochs of 5 steps: the model ends with a_t = (1 - w_t) a_(t-1) + w_t p_t, w_t = (1 - d) / (1 - d^t), over
    the weights p_t after each step (the same float32 operations: bit for bit), which is the closed form
    sum_t (1 - d) d^(T-t) p_t / (1 - d^T) (float64: to float32's rounding); the training weights are those of a
    training without the average, bit for bit, and they are what the checkpoint trains on from."""
    train_x, test_x = _data()
    seen = _record_weights(monkeypatch)
    model, checkpoint = _model(), tmp_path / "checkpoint.pt"
    outcome = fit(model, train_x, test_x, _cfg(epochs=2), seed=0, checkpoint=checkpoint)
    assert outcome.status == "ok" and len(seen) == 10
    d, total = DECAY, len(seen)
    by_hand = {}
    for t, weights in enumerate(seen, 1):
        w = (1 - d) / (1 - d ** t)
        by_hand = {name: p.clone() if t == 1 else by_hand[name] * (1 - w) + p * w for name, p in weights.items()}
    closed = {name: sum((1 - d) * d ** (total - t) * weights[name].double() for t, weights in enumerate(seen, 1))
              / (1 - d ** total) for name in by_hand}
    for name, p in model.named_parameters():
        assert torch.equal(p, by_hand[name]), name
        torch.testing.assert_close(p.double(), closed[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, seen[-1][name]), name  # the average, not the last step's weights
    state = torch.load(checkpoint, weights_only=True)  # loadable as a rebuilt run loads it
    assert state["ema"]["decay"] == DECAY
    for name, p in model.named_parameters():
        assert torch.equal(state["model"][name], p), name  # what generates: the average
        assert torch.equal(state["ema"]["training"][name], seen[-1][name]), name  # what trains on

    plain = _model()
    fit(plain, train_x, test_x, _cfg(epochs=2, ema=0.0), seed=0)
    for name, p in plain.named_parameters():
        assert torch.equal(p, seen[-1][name]), name  # the average changes no training weight


def test_the_weight_of_a_step_is_the_bias_corrected_one():
    plan = Plan(_cfg(), torch.zeros(100, 30))
    assert plan.ema_weight(0) == 1.0  # a_1 = p_1: the initial weights never count
    assert plan.ema_weight(1) == pytest.approx(0.1 / 0.19)
    assert plan.ema_weight(10_000) == pytest.approx(1 - DECAY)
    assert Plan(_cfg(ema=0.0), torch.zeros(100, 30)).ema_weight(3) is None


def test_the_average_validates_is_tested_and_is_the_best_epochs(tmp_path, monkeypatch):
    """With validation: every epoch's validation and test losses are those of the average (the callbacks see it in
    the model), best.pt holds the best epoch's average, and the model ends with it."""
    train_x, val_x, test_x = _split()
    losses = iter([3.0, 1.0, 2.0])  # epoch 2 is the best
    evaluate = kit.evaluate_loss

    def patched(model, x, seed=0, batch_size=1000):
        if seed == kit.VAL_SEED_OFFSET:
            real = evaluate(model, x, seed, batch_size)
            patched.real.append(real["loss"])
            return {**real, "loss": next(losses)}
        return evaluate(model, x, seed, batch_size)

    patched.real = []
    monkeypatch.setattr(kit, "evaluate_loss", patched)
    model, snapshots = _model(), []
    outcome = fit(model, train_x, test_x, _cfg(val_fraction=0.2), seed=0, val_x=val_x, best=tmp_path / "best.pt",
                  checkpoint=tmp_path / "c.pt", callbacks=_Snapshots(model, snapshots))
    assert outcome.best_epoch == 2
    monkeypatch.setattr(kit, "evaluate_loss", evaluate)
    for row, weights, real in zip(outcome.history, snapshots, patched.real, strict=True):
        scratch = _model()
        scratch.load_state_dict(weights)
        assert evaluate(scratch, test_x, seed=kit.EVAL_SEED_OFFSET)["loss"] == row["test_loss"]
        assert evaluate(scratch, val_x, seed=kit.VAL_SEED_OFFSET)["loss"] == real
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshots[1][name]) and torch.equal(best["model"][name], tensor), name
    last = torch.load(tmp_path / "c.pt", weights_only=False)["model"]
    for name, tensor in snapshots[2].items():
        assert torch.equal(last[name], tensor), name  # the checkpoint's model: the last epoch's average


# inside epoch 2 (5 steps an epoch; the best), at its end, inside epochs 3 and 4 (the last: patience 2)
@pytest.mark.parametrize("stop_at", [7, 10, 13, 18])
def test_resume_after_a_stop_gives_the_uninterrupted_numbers(tmp_path, monkeypatch, stop_at):
    """With the average, validation, patience and a cosine rate: a stop anywhere, then the same call again, ends
    with the uninterrupted run's history, best epoch and weights, bit for bit."""
    train_x, val_x, test_x = _split(shifted=True)
    cfg = _cfg(epochs=5, lr=3e-2, val_fraction=0.2, patience=2, lr_schedule="cosine", lr_min_factor=0.1)
    reference = _model()
    whole = fit(reference, train_x, test_x, cfg, seed=0, val_x=val_x, checkpoint=tmp_path / "whole.pt",
                best=tmp_path / "whole_best.pt")
    assert (whole.best_epoch, whole.epochs_trained) == (2, 4)  # it does stop early, the best before the last
    checkpoint, best = tmp_path / "checkpoint.pt", tmp_path / "best.pt"
    with monkeypatch.context() as patch:
        stop = stop_after_step(patch, stop_at)
        outcome = fit(_model(), train_x, test_x, cfg, seed=0, val_x=val_x, checkpoint=checkpoint, best=best,
                      callbacks=stop)
    assert outcome.status == "interrupted"
    resumed = _model()
    torch.manual_seed(123)  # whatever the global stream holds, the checkpoint's wins
    outcome = fit(resumed, train_x, test_x, cfg, seed=0, val_x=val_x, checkpoint=checkpoint, best=best)
    assert outcome.status == "ok" and outcome.resumed_from == stop_at // 5
    assert (outcome.best_epoch, outcome.epochs_trained) == (whole.best_epoch, whole.epochs_trained)
    assert _history(outcome) == _history(whole)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    a, b = (torch.load(p, weights_only=False) for p in (tmp_path / "whole.pt", checkpoint))
    for name, tensor in a["ema"]["training"].items():
        assert torch.equal(tensor, b["ema"]["training"][name]), name


def _history(outcome):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in outcome.history]


def test_a_checkpoint_with_or_without_the_average_is_not_resumed_by_the_other(tmp_path):
    train_x, test_x = _data()
    fit(_model(), train_x, test_x, _cfg(epochs=1, ema=0.0), seed=0, checkpoint=tmp_path / "plain.pt")
    assert "ema" not in torch.load(tmp_path / "plain.pt", weights_only=False)  # the format of before
    with pytest.raises(CheckpointMismatch, match="written without a moving average"):
        fit(_model(), train_x, test_x, _cfg(epochs=2), seed=0, checkpoint=tmp_path / "plain.pt")
    fit(_model(), train_x, test_x, _cfg(epochs=1), seed=0, checkpoint=tmp_path / "ema.pt")
    with pytest.raises(CheckpointMismatch, match="written with a moving average"):
        fit(_model(), train_x, test_x, _cfg(epochs=2, ema=0.0), seed=0, checkpoint=tmp_path / "ema.pt")


def test_a_run_scores_and_rebuilds_the_average(tmp_path):
    """Through the job: the run's checkpoint holds the average as its model, and the rebuilt run (generate,
    evaluate) holds those weights, not the training weights."""
    cfg = compose_config(*TINY, "train.ema=0.9", f"results_csv={tmp_path / 'results.csv'}")
    assert job.run(cfg, tmp_path / "run", tmp_path) == 0
    stopping.reset()
    files = RunFiles(tmp_path / "run")
    files.config.parent.mkdir()
    OmegaConf.save(cfg, files.config)
    state = torch.load(files.checkpoint, weights_only=False)
    run = load_run(tmp_path / "run", device="cpu")
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    assert any(not torch.equal(state["model"][n], t) for n, t in state["ema"]["training"].items())


def test_a_pruner_judges_the_average(monkeypatch):
    """A search's pruner asks after an epoch with the average in the model, as the validation saw it."""
    train_x, test_x = _data()
    model, shown, asked = _model(), [], []

    class Pruner(Callback):
        def on_epoch_end(self, row, history):
            shown.append(_weights(model))

        def should_prune(self, row):
            asked.append(_weights(model))

    fit(model, train_x, test_x, _cfg(epochs=3), seed=0, callbacks=Pruner())
    assert len(asked) == 2
    for before, after in zip(shown, asked, strict=False):
        for name, tensor in before.items():
            assert torch.equal(after[name], tensor), name
