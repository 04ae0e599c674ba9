"""Seeds trained as one stacked model end where fit leaves each of them (to rounding): every flow family, masks,
the conditional flow, clipping, the cosine rate, validation and early stopping, divergence, interruption and
resume in both directions, and checkpoints in fit's format."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from flowvae.models import FlowVAE
from flowvae.training import loop as train_module
from flowvae.training import stacked as stacked_module
from flowvae.training.callbacks import Callback
from flowvae.training.kit import TRAINED_KEY, split_validation
from flowvae.training.loop import fit
from flowvae.training.stacked import fit_stacked

SEEDS = [0, 1, 2]
# batched against single matrix products: a few ulps a step, after a few epochs ~1e-6 of the weights' scale
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def _cfg(**overrides):
    base = {"epochs": 3, "batch_size": 20, "lr": 1e-3, "warmup_epochs": 1, "grad_clip": None, "checkpoint_every": 1,
            "eval_every": 1, "progress": "log", "patience": None, "lr_schedule": "constant", "lr_min_factor": 0.0}
    return OmegaConf.create({**base, **overrides})


MODELS = {  # name -> FlowVAE arguments; events of 3 features x 10 particles
    "none": {"flow": "none", "n_flows": 0},
    "planar": {"flow": "planar", "n_flows": 2},
    "iaf": {"flow": "iaf", "n_flows": 2, "flow_options": {"hidden": 8, "context": 4}},
    "householder": {"flow": "householder", "n_flows": 2, "flow_options": {"num_householder": 2}},
    "orthogonal": {"flow": "orthogonal", "n_flows": 2},
    "triangular": {"flow": "triangular", "n_flows": 3},
    "masked_planar": {"flow": "planar", "n_flows": 2, "n_mask": 10},
    "masked_iaf": {"flow": "iaf", "n_flows": 2, "n_mask": 10, "flow_options": {"hidden": 8}},
    "conditional_flow": {"flow": "orthogonal", "n_flows": 2, "n_mask": 10, "coupling_layers": 5, "n_features": 3,
                         "coupling_transform": "spline", "coupling_hidden": [8]},
}


def _build(seed: int, name: str = "planar") -> tuple[FlowVAE, torch.Tensor]:
    """The model as experiment.seeded_model builds it, and the noise stream it leaves."""
    torch.manual_seed(seed)
    return FlowVAE(30, [16], 3, **MODELS[name]), torch.get_rng_state()


def _data(masked: bool = False, n_train: int = 100):
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(n_train, 30, generator=g), torch.randn(40, 30, generator=g)
    if not masked:
        return train_x, test_x

    def with_mask(x: torch.Tensor) -> torch.Tensor:
        n = torch.randint(1, 11, (len(x),), generator=g)
        mask = (torch.arange(10) < n[:, None]).float()
        return torch.cat([x * mask.repeat(1, 3), mask], dim=1)

    return with_mask(train_x), with_mask(test_x)


def _fit_each(name, train_x, test_x, cfg, seeds=SEEDS, checkpoints=None, callbacks_for=None, **kwargs):
    models, outcomes = [], []
    for i, seed in enumerate(seeds):
        model, _ = _build(seed, name)
        checkpoint = None if checkpoints is None else checkpoints[i]
        callbacks = (callbacks_for or {}).get(seed)
        outcomes.append(fit(model, train_x, test_x, cfg, seed=seed, checkpoint=checkpoint, callbacks=callbacks,
                            **kwargs))
        models.append(model)
    return models, outcomes


def _stacked(name, train_x, test_x, cfg, seeds=SEEDS, checkpoints=None, **kwargs):
    built = [_build(seed, name) for seed in seeds]
    models = [model for model, _ in built]
    outcomes = fit_stacked(models, train_x, test_x, cfg, seeds=seeds, rng_states=[state for _, state in built],
                           checkpoints=checkpoints or [None] * len(seeds), extra_states=[{}] * len(seeds), **kwargs)
    return models, outcomes


def _assert_same(expected, actual, exact: bool = False) -> None:
    """Outcomes alike (status, counts, message) and histories and final weights equal to rounding."""
    (models_a, outcomes_a), (models_b, outcomes_b) = expected, actual
    assert len(outcomes_a) == len(outcomes_b)
    for a, b, model_a, model_b in zip(outcomes_a, outcomes_b, models_a, models_b, strict=True):
        for key in ("status", "epochs_run", "resumed_from", "epochs_trained", "best_epoch"):
            assert getattr(a, key) == getattr(b, key), key
        assert a.message.split(" (")[0] == b.message.split(" (")[0]
        assert [sorted(row) for row in a.history] == [sorted(row) for row in b.history]
        for row_a, row_b in zip(a.history, b.history, strict=True):
            values = [(row_a[k], row_b[k]) for k in row_a if k != "seconds"]
            ref, got = (torch.tensor(v, dtype=torch.float64) for v in zip(*values, strict=True))
            if exact:
                assert torch.equal(ref.nan_to_num(123.0), got.nan_to_num(123.0)), (row_a, row_b)
            else:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
        for (key, ref), got in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
            torch.testing.assert_close(got, ref, **({"rtol": 0, "atol": 0} if exact else TOLERANCE), equal_nan=True,
                                       msg=key)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_seed_ends_where_fit_leaves_it(name):
    """Per seed: the same order, noise, Adam and clipping as fit, under a warm-up and a cosine rate; 110 events,
    so each epoch ends with a batch of 10."""
    train_x, test_x = _data(masked="n_mask" in MODELS[name], n_train=110)
    cfg = _cfg(grad_clip=5.0, lr_schedule="cosine", lr_min_factor=0.1, lr=3e-3)
    _assert_same(_fit_each(name, train_x, test_x, cfg), _stacked(name, train_x, test_x, cfg))


def test_gradient_clipping_is_per_seed():
    """A clip far below every gradient's norm: each seed's step is its own gradient scaled to the norm (a norm over
    all seeds would scale each by another factor)."""
    train_x, test_x = _data()
    cfg = _cfg(grad_clip=1e-3, lr=1e-2, epochs=2)
    _assert_same(_fit_each("planar", train_x, test_x, cfg), _stacked("planar", train_x, test_x, cfg))


# eval_every 3: seeds 2 and 0 stop early after epochs 4 and 5, where no test loss is due for the others, so each
# takes a test pass of its own seeds' subset of the stack
@pytest.mark.parametrize("eval_every", [1, 3])
def test_validation_early_stopping_and_best_weights_per_seed(tmp_path, caplog, eval_every):
    """Seeds stop at different epochs (seed 1 runs all 8) and leave the stack; each keeps its best epoch's weights
    and best.pt, as fit; the group's one line an epoch says how many still train."""
    events, test_x = _data(n_train=125)
    train_x, val_x = split_validation(events, 0.2, 0)
    cfg = _cfg(epochs=8, lr=1e-2, warmup_epochs=0, patience=1, eval_every=eval_every)
    fits = [tmp_path / f"fit{seed}.pt" for seed in SEEDS]
    expected = _fit_each("planar", train_x, test_x, cfg, val_x=val_x, checkpoints=fits)
    assert [o.epochs_trained for o in expected[1]] == [5, 8, 4]  # the case this test is about
    bests, checkpoints = [tmp_path / f"best{seed}.pt" for seed in SEEDS], [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    with caplog.at_level(logging.INFO, logger="flowvae.training.stacked"):
        actual = _stacked("planar", train_x, test_x, cfg, val_x=val_x, bests=bests, checkpoints=checkpoints)
    _assert_same(expected, actual)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split("  ")[:2] for line in lines] == [
        [f"epoch {e}/8", f"{n} of 3 seeds training"] for e, n in enumerate([3, 3, 3, 3, 2, 1, 1, 1], 1)]
    for outcome, best, model in zip(actual[1], bests, actual[0], strict=True):
        saved = torch.load(best, weights_only=True)
        assert saved["epoch"] == outcome.best_epoch < outcome.epochs_trained
        for key, tensor in model.state_dict().items():
            assert torch.equal(saved["model"][key], tensor), key
    for fit_path, path in zip(fits, checkpoints, strict=True):  # the last epoch's weights, as fit's checkpoint
        expected_state, state = (torch.load(p, weights_only=False) for p in (fit_path, path))
        validation, expected_validation = state["validation"], expected_state["validation"]
        assert validation.pop("best_loss") == pytest.approx(expected_validation.pop("best_loss"), rel=1e-6)
        assert validation == expected_validation
        for key, tensor in expected_state["model"].items():
            torch.testing.assert_close(state["model"][key], tensor, **TOLERANCE)


def test_the_held_out_losses_are_one_vmapped_pass_for_all_seeds(monkeypatch):
    """The validation and test losses of the seeds in a stack are computed as its steps are: the model's loss
    called once a held-out batch (evaluate_loss's batches of 1,000) for all seeds at once, not once a seed (three
    times as many calls), and each seed's numbers are fit's."""
    events, _ = _data(n_train=125)
    train_x, val_x = split_validation(events, 0.2, 0)  # 25 validation events: one batch
    test_x = torch.randn(2500, 30, generator=torch.Generator().manual_seed(2))  # three batches
    cfg = _cfg(epochs=4, eval_every=2)
    expected = _fit_each("planar", train_x, test_x, cfg, val_x=val_x)
    loss, batches = FlowVAE.loss, []

    def counted(model, x, *args, **kwargs):
        if not model.training:  # a held-out pass (evaluate_loss's eval mode), not a training step
            batches.append(len(x))
        return loss(model, x, *args, **kwargs)

    monkeypatch.setattr(FlowVAE, "loss", counted)
    actual = _stacked("planar", train_x, test_x, cfg, val_x=val_x)
    _assert_same(expected, actual)
    tested = [1000, 1000, 500]  # the test loss after epochs 2 and 4
    assert batches == [25] + [25, *tested] + [25] + [25, *tested]


def test_a_diverging_seed_leaves_and_the_others_train_on(tmp_path, monkeypatch):
    """Seed 1's weights turn NaN after step 7 (inside epoch 2), in fit and in the stack alike: it is diverged in
    epoch 2 with fit's message and history, its checkpoint records it, and seeds 0 and 2 train on as fit trains them.
    """
    train_x, test_x = _data()
    cfg = _cfg(epochs=4)

    def poison(params):
        with torch.no_grad():
            for p in params:
                p.fill_(math.nan)

    make_step, steps = train_module.make_step, {"n": 0}

    def fit_step(model, optimizer, grad_clip):
        step = make_step(model, optimizer, grad_clip)

        def poisoned(batch, beta):
            out = step(batch, beta)
            steps["n"] += 1
            if steps["n"] == 7 and model.seed == 1:
                poison(model.parameters())
            return out

        return poisoned

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "make_step", fit_step)
        models, outcomes = [], []
        for seed in SEEDS:
            model, _ = _build(seed)
            model.seed, steps["n"] = seed, 0
            outcomes.append(fit(model, train_x, test_x, cfg, seed=seed))
            models.append(model)
    assert [o.status for o in outcomes] == ["ok", "diverged", "ok"]

    stack_step, calls = stacked_module._Stack.step, {"n": 0}

    def stacked_step(self, *args):
        stack_step(self, *args)
        calls["n"] += 1
        if calls["n"] == 7:
            j = [m.seed for m in self.members].index(1)
            poison(p[j] for p in self.params.values())

    checkpoints = [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    with monkeypatch.context() as patch:
        patch.setattr(stacked_module._Stack, "step", stacked_step)
        actual = _stacked("planar", train_x, test_x, cfg, checkpoints=checkpoints)
    _assert_same((models, outcomes), actual)
    assert "non-finite training loss (nan) in epoch 2" in actual[1][1].message
    state = torch.load(checkpoints[1], weights_only=False)
    assert state[TRAINED_KEY]["status"] == "diverged" and len(state["history"]) == 2
    again = fit(_build(1)[0], train_x, test_x, cfg, seed=1, checkpoint=checkpoints[1])  # the seed's own job
    assert again.status == "diverged" and again.epochs_run == 1 and again.message == actual[1][1].message


class _PruneAt(Callback):
    """Prunes the training after epoch ``epoch``; ``asked``: the epochs it was asked about."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.asked = epoch, []

    def should_prune(self, row):
        self.asked.append(row["epoch"])
        return f"pruned by the test after epoch {row['epoch']}" if row["epoch"] == self.epoch else None


def test_a_seed_its_callback_prunes_leaves_the_stack_as_fit_prunes_it(tmp_path, caplog):
    """Seed 1's callback prunes it after epoch 2 of 4: it ends with fit's outcome, history and weights (epoch 2's,
    not the best epoch's, 1) and fit's checkpoint, which records it (its job scores nothing and trains no further);
    seeds 0 and 2 train on as fit trains them without callbacks, two seeds in the stack from epoch 3. Seed 2's
    callback, which never prunes, is asked after every epoch but the last, as fit asks."""
    events, test_x = _data(n_train=125)
    train_x, val_x = split_validation(events, 0.2, 0)
    val_x = val_x * 2.0 + 1.0  # unlike the training events: seed 1's validation loss rises in epoch 2
    cfg = _cfg(epochs=4, lr=3e-2, lr_schedule="cosine")
    fit_pruner, stack_pruner, never = _PruneAt(2), _PruneAt(2), _PruneAt(0)
    fits, checkpoints = [tmp_path / f"fit{seed}.pt" for seed in SEEDS], [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    expected = _fit_each("planar", train_x, test_x, cfg, checkpoints=fits, val_x=val_x,
                         callbacks_for={1: fit_pruner})
    assert [o.status for o in expected[1]] == ["ok", "pruned", "ok"]
    assert expected[1][1].message == "pruned by the test after epoch 2" and expected[1][1].epochs_trained == 2
    with caplog.at_level(logging.INFO, logger="flowvae.training.stacked"):
        actual = _stacked("planar", train_x, test_x, cfg, val_x=val_x, checkpoints=checkpoints,
                          callbacks=[None, stack_pruner, never])
    _assert_same(expected, actual)
    assert stack_pruner.asked == fit_pruner.asked == [1, 2] and never.asked == [1, 2, 3]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split("  ")[1] for line in lines] == ["3 of 3 seeds training"] * 2 + ["2 of 3 seeds training"] * 2
    expected_state, state = (torch.load(p, weights_only=False) for p in (fits[1], checkpoints[1]))
    assert set(state) == set(expected_state) | {TRAINED_KEY}
    assert state[TRAINED_KEY]["status"] == "pruned" and state["epoch"] == expected_state["epoch"] == 2
    for key in ("partial", "extra", "cuda_rng"):
        assert state[key] == expected_state[key], key
    for key in ("torch_rng", "shuffle_rng"):
        assert torch.equal(state[key], expected_state[key]), key
    assert state["validation"].pop("best_loss") == pytest.approx(expected_state["validation"].pop("best_loss"))
    assert state["validation"] == expected_state["validation"] and state["validation"]["best_epoch"] == 1
    assert [row["epoch"] for row in state["history"]] == [row["epoch"] for row in expected_state["history"]] == [1, 2]
    for key, tensor in expected_state["model"].items():
        torch.testing.assert_close(state["model"][key], tensor, **TOLERANCE)
        assert torch.equal(state["model"][key], actual[0][1].state_dict()[key]), key  # the model keeps epoch 2's
    again = _build(1)[0]  # the seed's own job: the recorded outcome, nothing trained
    outcome = fit(again, train_x, test_x, cfg, seed=1, checkpoint=checkpoints[1], val_x=val_x)
    assert (outcome.status, outcome.message, outcome.epochs_trained) == ("pruned", actual[1][1].message, 2)
    for key, tensor in actual[0][1].state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


class _StopAt(Callback):
    """Asks to stop once ``calls["n"]`` (steps counted by a patched step) reaches ``at_step``."""

    def __init__(self, calls: dict, at_step: int) -> None:
        self.calls, self.at_step = calls, at_step

    def should_stop(self) -> bool:
        return self.calls["n"] >= self.at_step


def _stop_after(monkeypatch, at_step: int) -> _StopAt:
    """A callback asking to stop once the stack has stepped ``at_step`` times."""
    step, calls = stacked_module._Stack.step, {"n": 0}

    def counting(self, *args):
        calls["n"] += 1
        return step(self, *args)

    monkeypatch.setattr(stacked_module._Stack, "step", counting)
    return _StopAt(calls, at_step)


@pytest.mark.parametrize("stop_at", [7, 10])  # inside epoch 2 (5 steps an epoch), and at its end
def test_interrupted_stack_resumes_stacked_or_alone(tmp_path, monkeypatch, stop_at, caplog):
    """Every seed saves where the stop found it and is interrupted (no trained record), and the group says so;
    resumed as a stack it ends bit-identical to the stack never stopped, and each seed resumed by fit ends where
    fit alone leaves it."""
    train_x, test_x = _data()
    cfg = _cfg(epochs=4)
    uninterrupted = _stacked("planar", train_x, test_x, cfg)
    checkpoints = [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="flowvae.training.stacked"):
        _, outcomes = _stacked("planar", train_x, test_x, cfg, checkpoints=checkpoints,
                               callbacks=[_stop_after(patch, stop_at)] * len(SEEDS))
    where = "in epoch 2 after step 2" if stop_at == 7 else "after epoch 2"
    assert all(o.status == "interrupted" and o.message == where for o in outcomes)
    seeds = ", ".join(map(str, SEEDS))
    assert f"stop requested: seeds {seeds} saved {where}; rerun the same command to resume them" in caplog.text
    states = [torch.load(c, weights_only=False) for c in checkpoints]
    assert all(TRAINED_KEY not in s and (s["partial"] is not None) == (stop_at == 7) for s in states)
    for s in states:  # each holds its own tensors, not a view of the stack's (which would store all of it)
        for tensor in [*s["model"].values(), *(s["partial"] or {"order": torch.zeros(0)}).values()]:
            if isinstance(tensor, torch.Tensor):
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    copies = [tmp_path / f"copy{seed}.pt" for seed in SEEDS]
    for checkpoint, copy in zip(checkpoints, copies, strict=True):
        copy.write_bytes(checkpoint.read_bytes())

    torch.manual_seed(123)  # whatever torch's streams hold now, the checkpoints' win
    resumed = _stacked("planar", train_x, test_x, cfg, checkpoints=checkpoints)
    assert all(o.resumed_from == 1 + (stop_at == 10) for o in resumed[1])
    _assert_same(_with_resume(uninterrupted, resumed[1]), resumed, exact=True)

    alone = _fit_each("planar", train_x, test_x, cfg, checkpoints=copies)
    _assert_same(_with_resume(_fit_each("planar", train_x, test_x, cfg), alone[1]), alone)


def _with_resume(result, like):
    """A result whose outcomes count epochs as the resumed ones ``like`` do (the history is the whole run's)."""
    models, outcomes = result
    for outcome, other in zip(outcomes, like, strict=True):
        outcome.resumed_from, outcome.epochs_run = other.resumed_from, other.epochs_run
    return models, outcomes


def test_fit_checkpoints_at_different_points_resume_as_one_stack(tmp_path, monkeypatch):
    """Seed 0 never started, seed 1 was stopped by fit inside epoch 2, seed 2 after epoch 3 (of 4) with validation,
    seed 3 finished by an earlier stack: the group trains each from its own point and each ends as fit alone."""
    events, test_x = _data(n_train=125)
    train_x, val_x = split_validation(events, 0.2, 0)
    seeds = [0, 1, 2, 3]
    cfg = _cfg(epochs=4)
    expected = _fit_each("planar", train_x, test_x, cfg, seeds=seeds, val_x=val_x)
    checkpoints = [tmp_path / f"c{seed}.pt" for seed in seeds]
    bests = [tmp_path / f"b{seed}.pt" for seed in seeds]
    for seed, stop_at in ((1, 7), (2, 15)):
        calls = {"n": 0}
        with monkeypatch.context() as patch:
            make_step = train_module.make_step

            def counting(*args, make_step=make_step, calls=calls):
                step = make_step(*args)

                def counted(batch, beta):
                    calls["n"] += 1
                    return step(batch, beta)

                return counted

            patch.setattr(train_module, "make_step", counting)
            fit(_build(seed)[0], train_x, test_x, cfg, seed=seed, checkpoint=checkpoints[seed], val_x=val_x,
                best=bests[seed], callbacks=_StopAt(calls, stop_at))
    _stacked("planar", train_x, test_x, cfg, seeds=[3], checkpoints=[checkpoints[3]], val_x=val_x, bests=[bests[3]])
    recorded = torch.load(checkpoints[3], weights_only=False)[TRAINED_KEY]
    assert recorded["status"] == "ok" and recorded["epochs_run"] == 4

    epochs_seen = {seed: [] for seed in seeds}
    actual = _stacked("planar", train_x, test_x, cfg, seeds=seeds, checkpoints=checkpoints, val_x=val_x, bests=bests,
                      callbacks=[_Epochs(epochs_seen[seed]) for seed in seeds])
    assert [o.resumed_from for o in actual[1]] == [0, 1, 3, 0]
    assert [o.epochs_run for o in actual[1]] == [4, 3, 1, 4]  # seed 3's as its stack recorded it
    assert epochs_seen == {0: [1, 2, 3, 4], 1: [2, 3, 4], 2: [4], 3: []}
    _with_resume(expected, actual[1])
    _assert_same(expected, actual)


class _Epochs(Callback):
    """The epochs a training reports, in ``seen``."""

    def __init__(self, seen: list) -> None:
        self.seen = seen

    def on_epoch_end(self, row, history):
        assert row is history[-1]
        self.seen.append(row["epoch"])


def test_checkpoints_have_fits_format(tmp_path):
    """Same keys, weights, optimizer layout (param groups, per-parameter state and shapes), streams and history as
    fit's checkpoint of the same seed and epoch; the noise stream and batch order bit-identical."""
    train_x, test_x = _data()
    cfg = _cfg(epochs=2, lr_schedule="cosine")
    fits = [tmp_path / f"fit{seed}.pt" for seed in SEEDS]
    stacks = [tmp_path / f"stack{seed}.pt" for seed in SEEDS]
    _fit_each("iaf", train_x, test_x, cfg, checkpoints=fits)
    _stacked("iaf", train_x, test_x, cfg, checkpoints=stacks)
    for fit_path, stack_path in zip(fits, stacks, strict=True):
        expected, actual = (torch.load(p, weights_only=False) for p in (fit_path, stack_path))
        assert set(actual) == set(expected) | {TRAINED_KEY}
        for key in ("epoch", "partial", "extra", "validation", "cuda_rng"):
            assert actual[key] == expected[key], key
        for key in ("torch_rng", "shuffle_rng"):
            assert torch.equal(actual[key], expected[key]), key
        assert list(actual["model"]) == list(expected["model"])
        for key, tensor in expected["model"].items():
            assert actual["model"][key].is_contiguous()
            torch.testing.assert_close(actual["model"][key], tensor, **TOLERANCE)
        opt_a, opt_e = actual["optimizer"], expected["optimizer"]
        assert opt_a["param_groups"] == opt_e["param_groups"]
        assert list(opt_a["state"]) == list(opt_e["state"])
        for index, state in opt_e["state"].items():
            assert list(opt_a["state"][index]) == list(state)
            for key, tensor in state.items():
                got = opt_a["state"][index][key]
                assert (got.shape, got.stride(), got.dtype, got.device) == (tensor.shape, tensor.stride(),
                                                                           tensor.dtype, tensor.device)
                assert torch.equal(got, tensor) if key == "step" else torch.allclose(got, tensor, rtol=1e-3,
                                                                                     atol=1e-7)
        assert [sorted(row) for row in actual["history"]] == [sorted(row) for row in expected["history"]]
        # only the checkpoint's own tensors are stored, not the whole stack's
        assert stack_path.stat().st_size < 1.5 * fit_path.stat().st_size


def test_wrong_calls_are_refused_with_what_to_fix():
    train_x, test_x = _data()
    models = [_build(seed)[0] for seed in SEEDS]
    states = [torch.get_rng_state()] * 3
    with pytest.raises(ValueError, match=r"one entry per model \(3\); got \{'checkpoints': 2\}"):
        fit_stacked(models, train_x, test_x, _cfg(), seeds=SEEDS, rng_states=states, checkpoints=[None] * 2,
                    extra_states=[{}] * 3)
    with pytest.raises(ValueError, match="model 1 differs from model 0"):
        fit_stacked([models[0], _build(1, "iaf")[0]], train_x, test_x, _cfg(), seeds=[0, 1], rng_states=states[:2],
                    checkpoints=[None] * 2, extra_states=[{}] * 2)
    with pytest.raises(ValueError, match="train.patience needs validation events"):
        fit_stacked(models, train_x, test_x, _cfg(patience=2), seeds=SEEDS, rng_states=states,
                    checkpoints=[None] * 3, extra_states=[{}] * 3)


def test_loss_with_the_noise_passed_in_is_the_loss_drawing_it():
    """FlowVAE.loss(noise=eps), eps drawn from a generator in the global stream's state, is bit for bit the loss
    that draws eps from the global stream (what lets a stack draw each seed's noise outside vmap)."""
    model, state = _build(0, "masked_planar")
    x, _ = _data(masked=True)
    noise = torch.randn(len(x), model.latent_dim, generator=torch.Generator().manual_seed(0).set_state(state))
    with_noise = model.loss(x, 0.5, noise=noise)
    torch.set_rng_state(state)
    drawn = model.loss(x, 0.5)
    for a, b in ((with_noise.loss, drawn.loss), (with_noise.recon, drawn.recon), (with_noise.kl, drawn.kl)):
        assert torch.equal(a, b)
    assert not torch.equal(model.loss(x, 0.5, noise=torch.zeros_like(noise)).loss, drawn.loss)


def test_the_moving_average_is_each_seeds_own_as_fits(tmp_path):
    """train.ema: each seed's average (stacked beside its weights) validates, picks its best epoch, stops it early
    and is what it ends with, as fit's; its checkpoint holds the average as its model and the training weights
    beside it, as fit's."""
    events, test_x = _data(n_train=125)
    train_x, val_x = split_validation(events, 0.2, 0)
    val_x = val_x * 2.0 + 1.0  # unlike the training events: the validation loss rises, and seeds stop early
    cfg = _cfg(epochs=6, lr=3e-2, warmup_epochs=0, patience=1, ema=0.9, lr_schedule="cosine")
    fits = [tmp_path / f"fit{seed}.pt" for seed in SEEDS]
    expected = _fit_each("planar", train_x, test_x, cfg, val_x=val_x, checkpoints=fits)
    assert [o.epochs_trained for o in expected[1]] == [4, 6, 3]  # seeds leave the stack at different epochs
    checkpoints = [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    actual = _stacked("planar", train_x, test_x, cfg, val_x=val_x, checkpoints=checkpoints,
                      bests=[tmp_path / f"b{seed}.pt" for seed in SEEDS])
    _assert_same(expected, actual)
    for fit_path, path in zip(fits, checkpoints, strict=True):
        expected_state, state = (torch.load(p, weights_only=False) for p in (fit_path, path))
        assert state["ema"]["decay"] == expected_state["ema"]["decay"] == 0.9
        for key, tensor in expected_state["ema"]["training"].items():
            torch.testing.assert_close(state["ema"]["training"][key], tensor, **TOLERANCE)
            assert state["ema"]["training"][key].is_contiguous()
        for key, tensor in expected_state["model"].items():
            torch.testing.assert_close(state["model"][key], tensor, **TOLERANCE)


@pytest.mark.parametrize("stop_at", [7, 10])  # inside epoch 2 (5 steps an epoch), and at its end
def test_an_interrupted_stack_with_the_average_resumes_exactly(tmp_path, monkeypatch, stop_at):
    """With train.ema: resumed as a stack, bit-identical to the stack never stopped; each seed resumed by fit
    alone ends where fit leaves it."""
    train_x, test_x = _data()
    cfg = _cfg(epochs=4, ema=0.9)
    uninterrupted = _stacked("planar", train_x, test_x, cfg)
    checkpoints = [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    with monkeypatch.context() as patch:
        _stacked("planar", train_x, test_x, cfg, checkpoints=checkpoints,
                 callbacks=[_stop_after(patch, stop_at)] * len(SEEDS))
    copies = [tmp_path / f"copy{seed}.pt" for seed in SEEDS]
    for checkpoint, copy in zip(checkpoints, copies, strict=True):
        copy.write_bytes(checkpoint.read_bytes())
    torch.manual_seed(123)
    resumed = _stacked("planar", train_x, test_x, cfg, checkpoints=checkpoints)
    _assert_same(_with_resume(uninterrupted, resumed[1]), resumed, exact=True)
    alone = _fit_each("planar", train_x, test_x, cfg, checkpoints=copies)
    _assert_same(_with_resume(_fit_each("planar", train_x, test_x, cfg), alone[1]), alone)


def test_the_average_updates_a_seeds_slice_as_fit_updates_its_weights():
    """The stack's update of the average (kit.ema_step on stacked, transposed tensors) is fit's, element for
    element, bit for bit: given the same weights it gives the same average."""
    from flowvae.training.kit import ema_step

    g = torch.Generator().manual_seed(0)
    averages, params = torch.randn(3, 17, 33, generator=g), torch.randn(3, 17, 33, generator=g)
    stacked = averages.mT.contiguous().mT  # the stack's layout of a Linear weight: a transposed view
    ema_step([stacked], [params], 0.37)
    for j in range(3):
        own = averages[j].clone()
        ema_step([own], [params[j]], 0.37)
        assert torch.equal(stacked[j], own)


def test_select_by_picks_each_seeds_best_epoch_by_its_own_measure(tmp_path):
    """fit_stacked's selects: each seed's measure of its own model picks its best epoch and counts its patience,
    as fit's select does."""
    from flowvae.training.kit import evaluate_loss

    events, test_x = _data(n_train=125)
    train_x, val_x = split_validation(events, 0.2, 0)
    cfg = _cfg(epochs=6, lr=3e-2, warmup_epochs=0, patience=2, select_by="kl_sum")

    def measure(model):  # a stand-in for a metric of generated events: a function of the weights alone
        return lambda: -evaluate_loss(model, val_x, seed=99)["loss"]

    models, outcomes = [], []
    for seed in SEEDS:
        model, _ = _build(seed)
        outcomes.append(fit(model, train_x, test_x, cfg, seed=seed, val_x=val_x, select=measure(model)))
        models.append(model)
    assert all("val_kl_sum" in row for o in outcomes for row in o.history)
    assert [(o.epochs_trained, o.best_epoch) for o in outcomes] == [(4, 2), (3, 1), (5, 3)]  # each its own stop
    built = [_build(seed) for seed in SEEDS]
    stacked_models = [model for model, _ in built]
    actual = fit_stacked(stacked_models, train_x, test_x, cfg, seeds=SEEDS, rng_states=[s for _, s in built],
                         checkpoints=[None] * 3, extra_states=[{}] * 3, val_x=val_x,
                         selects=[measure(model) for model in stacked_models])
    _assert_same((models, outcomes), (stacked_models, actual))
    with pytest.raises(ValueError, match="train.select_by=kl_sum needs its measure"):
        fit_stacked(stacked_models, train_x, test_x, cfg, seeds=SEEDS, rng_states=[s for _, s in built],
                    checkpoints=[None] * 3, extra_states=[{}] * 3, val_x=val_x)


def test_a_seeds_job_scores_the_average_its_stack_recorded(tmp_path):
    """With train.ema and no validation: a seed's own job finds its training recorded and holds the average the
    stack ended with (the checkpoint's model), not the training weights."""
    train_x, test_x = _data()
    cfg = _cfg(epochs=2, ema=0.9)
    checkpoints = [tmp_path / f"c{seed}.pt" for seed in SEEDS]
    models, _ = _stacked("planar", train_x, test_x, cfg, checkpoints=checkpoints)
    for seed, model, checkpoint in zip(SEEDS, models, checkpoints, strict=True):
        again = _build(seed)[0]
        outcome = fit(again, train_x, test_x, cfg, seed=seed, checkpoint=checkpoint)
        assert outcome.status == "ok" and outcome.epochs_trained == 2 and outcome.best_epoch is None
        for key, tensor in model.state_dict().items():
            assert torch.equal(again.state_dict()[key], tensor), key
