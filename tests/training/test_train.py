"""The training loop: resume is exact (also from inside an epoch), divergence is caught, warm-up works."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from flowvae.models import FlowVAE
from flowvae.training.callbacks import Callback
from flowvae.training.kit import CheckpointMismatch, check_checkpoint, evaluate_loss
from flowvae.training.loop import fit
from tests.conftest import stop_after_step


def _cfg(**overrides):
    base = {"epochs": 3, "batch_size": 20, "lr": 1e-3, "warmup_epochs": 1, "grad_clip": None, "checkpoint_every": 1,
            "eval_every": 1, "progress": "log"}
    return OmegaConf.create({**base, **overrides})


def _model(flow="planar", n_flows=2):
    torch.manual_seed(0)
    return FlowVAE(30, [16], 3, flow, n_flows)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(100, 30, generator=g), torch.randn(40, 30, generator=g)


@pytest.mark.parametrize("stop_at", [7, 10])  # inside epoch 2 (5 steps an epoch), and at its end
def test_resume_after_a_stop_gives_the_uninterrupted_numbers(tmp_path, monkeypatch, stop_at):
    train_x, test_x = _data()
    reference = _model()
    fit(reference, train_x, test_x, _cfg(), seed=0)

    model, checkpoint = _model(), tmp_path / "checkpoint.pt"
    with monkeypatch.context() as patch:
        stop = stop_after_step(patch, stop_at)
        outcome = fit(model, train_x, test_x, _cfg(), seed=0, checkpoint=checkpoint, callbacks=stop)
    assert outcome.status == "interrupted" and f"epoch {stop_at // 5 + (stop_at % 5 > 0)}" in outcome.message
    assert check_checkpoint(checkpoint, {}) == stop_at // 5

    resumed = _model()
    torch.manual_seed(123)  # whatever the global RNG holds now, the checkpoint's state wins
    outcome = fit(resumed, train_x, test_x, _cfg(), seed=0, checkpoint=checkpoint)
    assert outcome.status == "ok" and outcome.resumed_from == stop_at // 5
    assert outcome.epochs_run == 3 - stop_at // 5
    assert [row["epoch"] for row in outcome.history] == [1, 2, 3]
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_checkpoint_of_another_config_is_refused(tmp_path):
    train_x, test_x = _data()
    checkpoint = tmp_path / "checkpoint.pt"
    fit(_model(), train_x, test_x, _cfg(epochs=1), seed=0, checkpoint=checkpoint, extra_state={"config_hash": "a"})
    with pytest.raises(CheckpointMismatch, match="different config"):
        fit(_model(), train_x, test_x, _cfg(epochs=2), seed=0, checkpoint=checkpoint, extra_state={"config_hash": "b"})
    with pytest.raises(CheckpointMismatch, match="different config"):
        check_checkpoint(checkpoint, {"config_hash": "b"})
    assert check_checkpoint(checkpoint, {"config_hash": "a"}) == 1
    assert check_checkpoint(tmp_path / "none.pt", {"config_hash": "a"}) is None


class _StopAlways(Callback):
    def should_stop(self) -> bool:
        return True


def test_a_stop_in_the_last_epoch_finishes_training(tmp_path):
    """The last epoch's end is the finished model: training reports ok and the caller decides what stops."""
    train_x, test_x = _data()
    outcome = fit(_model(), train_x, test_x, _cfg(epochs=1), seed=0, checkpoint=tmp_path / "c.pt",
                  callbacks=[_StopAlways()])
    assert outcome.status == "interrupted"  # stopped after its first step: 5 steps an epoch
    outcome = fit(_model(), train_x, test_x, _cfg(epochs=1, batch_size=100), seed=0, checkpoint=tmp_path / "d.pt",
                  callbacks=[_StopAlways()])
    assert outcome.status == "ok" and check_checkpoint(tmp_path / "d.pt", {}) == 1


def test_huge_learning_rate_diverges_with_the_epoch_named():
    train_x, test_x = _data()
    outcome = fit(_model("iaf", 2), train_x * 1e4, test_x, _cfg(lr=1e8, warmup_epochs=0), seed=0)
    assert outcome.status == "diverged"
    assert "non-finite training loss" in outcome.message and "epoch" in outcome.message


def test_warmup_raises_beta_linearly_to_one():
    train_x, test_x = _data()
    outcome = fit(_model(), train_x, test_x, _cfg(warmup_epochs=2), seed=0)
    assert [row["beta"] for row in outcome.history] == [0.5, 1.0, 1.0]


def test_how_often_the_test_loss_is_evaluated_changes_no_weight():
    train_x, test_x = _data()
    every = _model()  # seeds torch's global stream, which training then draws from
    fit(every, train_x, test_x, _cfg(epochs=4), seed=3)
    sparse = _model()
    outcome = fit(sparse, train_x, test_x, _cfg(epochs=4, eval_every=3), seed=3)
    for a, b in zip(every.state_dict().values(), sparse.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    evaluated = [not math.isnan(row["test_loss"]) for row in outcome.history]
    assert evaluated == [False, False, True, True]  # every 3rd epoch, and always the last


def test_test_loss_is_a_function_of_the_weights():
    model = _model()
    _, test_x = _data()
    state = torch.get_rng_state()
    first, second = evaluate_loss(model, test_x, seed=5), evaluate_loss(model, test_x, seed=5)
    assert first == second
    assert torch.equal(torch.get_rng_state(), state)  # training's stream is untouched
    assert evaluate_loss(model, test_x, seed=6)["loss"] != first["loss"]
