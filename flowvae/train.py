"""The training loop: shuffled mini-batches by index, Adam, KL warm-up, a learning-rate schedule, validation with
early stopping, checkpoints, progress, divergence.

The whole data set lives on the device as one tensor and is batched by index, and nothing inside a step asks
the host for a value: the loss is summed on the device and read once per epoch, which is also when a
non-finite loss is noticed. A checkpoint holds everything the next epoch depends on (weights, optimizer,
both RNG states, the history, the validation's best loss and epoch), so a run resumed from it ends with the same
numbers as one never stopped.

With validation events (``train.val_fraction`` > 0, split off by :func:`split_validation`) the validation loss is
evaluated after every epoch with its own fixed noise; the weights of the epoch with the lowest one are kept (in
memory and in ``best.pt`` beside the checkpoint) and are the model that training returns, and ``train.patience``
epochs without a lower one end training early.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowvae.files import replaced
from flowvae.models import FlowVAE

__all__ = ["TrainOutcome", "fit", "evaluate_loss", "save_atomic", "check_checkpoint", "CheckpointMismatch",
           "split_validation", "learning_rate", "trained_record", "TRAINED_KEY"]

log = logging.getLogger(__name__)

# The test loss draws its noise from seed + 2 (generation uses seed + 1, training the global stream from seed).
EVAL_SEED_OFFSET = 2
# The validation loss draws its noise from seed + 3: a function of the weights, apart from the test loss's.
VAL_SEED_OFFSET = 3
# The validation split's stream: numpy's generator seeded with (data.seed, this), apart from data.seed's own draws.
VAL_SPLIT_STREAM = 1
# A checkpoint's record of a training that ended elsewhere (a stacked group of seeds, flowvae.stacked): its
# outcome, so the seed's own job scores it without training and its row says what the training did.
TRAINED_KEY = "trained"


@dataclass
class TrainOutcome:
    """How training ended: ``ok``, ``diverged`` (a non-finite loss), ``pruned`` (a search's pruner stopped it) or
    ``interrupted`` (asked to stop)."""

    status: str
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0  # epochs trained by this process (fewer than train.epochs after a resume)
    resumed_from: int = 0
    message: str = ""
    epochs_trained: int = 0  # epochs done in all, across resumes (where an early stop ended training)
    best_epoch: int | None = None  # with validation: the epoch whose weights the model holds at the end


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through a temporary file and a rename: a kill never leaves half a checkpoint."""
    with replaced(path) as tmp:
        torch.save(obj, tmp)


@torch.no_grad()
def evaluate_loss(model: FlowVAE, x: Tensor, seed: int = 0, batch_size: int = 1000) -> dict[str, float]:
    """Mean loss, reconstruction and KL term on ``x`` (beta = 1), in batches.

    The noise comes from a generator seeded afresh with ``seed`` on every call: the result is a function of the
    weights alone (epochs are compared with the same noise), and training's random stream is never touched, so
    how often the test loss is evaluated cannot change what is trained.
    """
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    sums = torch.zeros(3, device=x.device, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        terms = model.loss(batch, generator=generator)
        sums += torch.stack([terms.loss, terms.recon, terms.kl]).double() * len(batch)
    model.train()
    loss, recon, kl = (sums / len(x)).tolist()
    return {"loss": loss, "recon": recon, "kl": kl}


def split_validation(train_x: Tensor, fraction: float, data_seed: int) -> tuple[Tensor, Tensor | None]:
    """(training events, validation events or None): ``round(fraction * N)`` of the N training events (at least
    one, and one left to train on), drawn by a generator seeded from ``data_seed`` alone, so every model seed of a
    data set validates on the same events. Both keep the events' order; ``fraction`` 0 returns ``train_x`` itself.
    """
    if fraction <= 0:
        return train_x, None
    n = len(train_x)
    n_val = min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng([data_seed, VAL_SPLIT_STREAM]).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[order[:n_val]] = True
    held = torch.from_numpy(held).to(train_x.device)
    return train_x[~held], train_x[held]


def learning_rate(cfg_train, step: int, total_steps: int) -> float:
    """The learning rate of optimisation step ``step`` (from 0) of ``total_steps``: ``train.lr`` for ``constant``;
    for ``cosine``, lr_min + (lr - lr_min) (1 + cos(pi step / total_steps)) / 2 with lr_min = lr * lr_min_factor.

    Per step, not per epoch: the decay is smooth however few the epochs, and it is a function of the step alone,
    so a run resumed inside an epoch needs no scheduler state beyond the step it resumes at."""
    schedule = cfg_train.get("lr_schedule", "constant")
    if schedule == "constant":
        return cfg_train.lr
    if schedule == "cosine":
        low = cfg_train.lr * cfg_train.get("lr_min_factor", 0.0)
        return low + (cfg_train.lr - low) * (1 + math.cos(math.pi * step / total_steps)) / 2
    raise ValueError(f"unknown train.lr_schedule {schedule!r}")


@dataclass
class _Validation:
    """The best validation loss so far, its epoch and weights, and the epochs since; the checkpoint keeps all but
    the weights (which are in ``best.pt``)."""

    patience: int | None
    path: Path | None  # best.pt, or None (kept in memory only)
    extra_state: dict
    best_loss: float = math.inf
    best_epoch: int = 0
    since_best: int = 0
    stopped: bool = False  # training ended early: a resumed run trains no further
    weights: dict | None = None  # the best epoch's, when this process saw it

    def state(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "since_best": self.since_best,
                "stopped": self.stopped}

    def restore(self, state: dict) -> None:
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.since_best, self.stopped = int(state["since_best"]), bool(state["stopped"])

    def update(self, model: FlowVAE, loss: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s validation ``loss``; whether training should stop (patience run out)."""
        if loss < self.best_loss:  # a NaN loss is never better
            self.best_loss, self.best_epoch, self.since_best = loss, epoch, 0
            self.weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            if self.path is not None:
                save_atomic({"epoch": epoch, "val_loss": loss, "model": self.weights, "extra": self.extra_state},
                            self.path)
        else:
            self.since_best += 1
        self.stopped = self.patience is not None and self.since_best >= self.patience
        return self.stopped

    def best_weights(self) -> dict:
        """The best epoch's weights: this process's copy, or ``best.pt`` (written before a resume)."""
        if self.weights is not None:
            return self.weights
        state = torch.load(self.path, map_location="cpu", weights_only=True) if self.path is not None \
            and self.path.exists() else {}
        if state.get("epoch") != self.best_epoch or state.get("extra") != self.extra_state:
            raise RuntimeError(f"the best weights (epoch {self.best_epoch}) are not in {self.path}: it is missing or "
                               f"from another epoch or config; remove the run directory's checkpoint to train anew")
        return state["model"]


def _beta(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def _progress(total: int, initial: int, mode: str):
    """A tqdm bar on a terminal (or when asked for), else None and one log line per epoch."""
    if mode == "log" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="epochs", unit="epoch", dynamic_ncols=True)


def fit(model: FlowVAE, train_x: Tensor, test_x: Tensor, cfg_train, *, seed: int,
        checkpoint: Path | None = None, extra_state: dict | None = None,
        on_epoch: Callable[[list[dict]], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False, val_x: Tensor | None = None,
        best: Path | None = None, prune: Callable[[dict], str | None] | None = None) -> TrainOutcome:
    """Train ``model`` for ``cfg_train.epochs`` epochs, resuming from ``checkpoint`` when it exists.

    With ``val_x`` the validation loss is evaluated after every epoch, ``cfg_train.patience`` epochs without a
    lower one stop training (status ``ok``), and the model ends with the best epoch's weights (also written to
    ``best``); ``outcome.best_epoch`` names it. The learning rate follows ``cfg_train.lr_schedule`` per step.

    A checkpoint is written every ``checkpoint_every`` epochs and, once ``should_stop()`` turns true (checked
    after every step), at the step where training stopped (with the epoch's batch order and partial sums), so
    a resumed run continues exactly. Training that completes its last epoch returns ``ok`` whatever
    ``should_stop`` says: its checkpoint is the finished model. ``extra_state`` is stored in every checkpoint
    (the run's config hash); a checkpoint whose extra state differs raises :class:`CheckpointMismatch` rather
    than silently mixing two configs (:func:`check_checkpoint` asks before any work).

    ``prune`` gets every epoch's history row once it is complete; a message back ends training there with status
    ``pruned`` (a search's pruner: the checkpoint is written, the model keeps that epoch's weights). A checkpoint
    that records a finished training (:data:`TRAINED_KEY`, written by a stacked group of seeds) is not trained
    further: fit returns the outcome it records, with the weights it holds (the best epoch's with validation).
    """
    patience = cfg_train.get("patience")
    if patience is not None and val_x is None:
        raise ValueError("train.patience needs validation events (train.val_fraction > 0)")
    optimizer = _make_optimizer(model, cfg_train)
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    device = train_x.device
    batch_size = cfg_train.batch_size
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    warmup_steps = cfg_train.warmup_epochs * steps_per_epoch
    total_steps = cfg_train.epochs * steps_per_epoch
    scheduled = cfg_train.get("lr_schedule", "constant") != "constant"
    validation = None if val_x is None else _Validation(patience, best, extra_state or {})
    outcome = TrainOutcome(status="ok")
    start_epoch, partial = 0, None
    if checkpoint is not None and checkpoint.exists():
        start_epoch, partial, trained = _restore(checkpoint, model, optimizer, shuffle, outcome, extra_state or {},
                                                 validation)
        outcome.resumed_from = start_epoch
        if trained is not None:
            return _trained_outcome(model, outcome, trained, validation)
        where = f"epoch {start_epoch + 1}, step {partial['step']}" if partial else f"the end of epoch {start_epoch}"
        log.info("resumed from %s at %s of %d epochs", checkpoint, where, cfg_train.epochs)
    step_fn = _make_step(model, optimizer, cfg_train.grad_clip)
    bar = _progress(cfg_train.epochs, start_epoch, cfg_train.progress)
    save = (lambda epoch, part=None: _save(checkpoint, model, optimizer, shuffle, outcome, epoch,
                                           extra_state or {}, part, validation)) if checkpoint is not None else None
    model.train()
    end_epoch = start_epoch if validation is not None and validation.stopped else cfg_train.epochs
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        if partial is not None:  # resuming inside an epoch: same order, same partial sums
            order, first_step, sums = partial["order"].to(device), partial["step"], partial["sums"].to(device)
            partial = None
        else:
            order = torch.randperm(len(train_x), generator=shuffle).to(device)
            first_step, sums = 0, torch.zeros(3, device=device, dtype=torch.float64)
        for i in range(first_step, steps_per_epoch):
            batch = train_x[order[i * batch_size:(i + 1) * batch_size]]
            if scheduled:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg_train, epoch * steps_per_epoch + i, total_steps)
            sums += step_fn(batch, _beta(epoch * steps_per_epoch + i, warmup_steps)) * len(batch)
            if i + 1 < steps_per_epoch and should_stop():
                if save is not None:
                    save(epoch, {"step": i + 1, "order": order.cpu(), "sums": sums.cpu()})
                outcome.status = "interrupted"
                outcome.message = f"in epoch {epoch + 1} after step {i + 1}"  # the job says how to resume
                break
        if outcome.status == "interrupted":
            break
        train_loss, train_recon, train_kl = (sums / len(train_x)).tolist()
        row = {"epoch": epoch + 1, "beta": _beta((epoch + 1) * steps_per_epoch, warmup_steps)}
        if scheduled:  # the epoch's last step's; a constant one is train.lr, and the curves stay as they were
            row["lr"] = optimizer.param_groups[0]["lr"]
        row.update(train_loss=train_loss, train_recon=train_recon, train_kl=train_kl)
        if not math.isfinite(train_loss):
            outcome.status = "diverged"
            outcome.message = (f"non-finite training loss ({train_loss}) in epoch {epoch + 1}; try a smaller "
                               f"train.lr (now {cfg_train.lr}) or train.grad_clip")
            outcome.history.append(row)
            break
        early = False
        if validation is not None:
            val = evaluate_loss(model, val_x, seed=seed + VAL_SEED_OFFSET)
            row.update({f"val_{k}": v for k, v in val.items()})
            early = validation.update(model, val["loss"], epoch + 1)
        last = epoch + 1 == cfg_train.epochs or early
        if last or (epoch + 1) % cfg_train.eval_every == 0:
            test = evaluate_loss(model, test_x, seed=seed + EVAL_SEED_OFFSET)
        else:
            test = dict.fromkeys(("loss", "recon", "kl"), math.nan)
        row.update({f"test_{k}": v for k, v in test.items()}, seconds=time.perf_counter() - started)
        outcome.history.append(row)
        outcome.epochs_run += 1
        _report(row, cfg_train.epochs, bar, scheduled)
        if on_epoch is not None:
            on_epoch(outcome.history)
        pruned = None if last or prune is None else prune(row)
        if pruned:
            outcome.status, outcome.message = "pruned", pruned
            if save is not None:
                save(epoch + 1)
            break
        stop = not last and should_stop()
        if save is not None and (last or stop or (epoch + 1) % cfg_train.checkpoint_every == 0):
            save(epoch + 1)
        if stop:
            outcome.status = "interrupted"
            outcome.message = f"after epoch {epoch + 1}"
            break
        if early and epoch + 1 < cfg_train.epochs:
            log.info("stopped early after epoch %d: no better validation loss for %d epochs; best epoch %d "
                     "(validation loss %.4f)", epoch + 1, validation.since_best, validation.best_epoch,
                     validation.best_loss)
            break
    if bar is not None:
        bar.close()
    outcome.epochs_trained = outcome.resumed_from + outcome.epochs_run
    if validation is not None and outcome.status == "ok" and validation.best_epoch > 0:
        model.load_state_dict(validation.best_weights())
        outcome.best_epoch = validation.best_epoch
    return outcome


def _make_optimizer(model: FlowVAE, cfg_train) -> torch.optim.Optimizer:
    """Adam, fused: one kernel for every parameter instead of ~10 small ops each (a quarter of a plain CPU step)."""
    return torch.optim.Adam(model.parameters(), lr=cfg_train.lr, fused=True)


def _make_step(model: FlowVAE, optimizer: torch.optim.Optimizer, grad_clip: float | None):
    """One optimisation step; returns the batch's (loss, recon, kl) as a float64 device tensor (no sync)."""

    def step(batch: Tensor, beta: float) -> Tensor:
        terms = model.loss(batch, beta)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return torch.stack([terms.loss, terms.recon, terms.kl]).detach().double()

    return step


def _report(row: dict, epochs: int, bar, scheduled: bool = False) -> None:
    evaluated = math.isfinite(row["test_loss"])
    test = f"  test loss {row['test_loss']:.4f}  kl {row['test_kl']:.4f}" if evaluated else ""
    val = f"  val loss {row['val_loss']:.4f}" if "val_loss" in row else ""
    lr = f"  lr {row['lr']:.3g}" if scheduled else ""
    text = (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}{val}{test}{lr}  "
            f"({row['seconds']:.1f} s)")
    if bar is None:
        log.info(text)
    else:
        log.debug(text)
        postfix = {"loss": f"{row['train_loss']:.3f}"}
        if "val_loss" in row:
            postfix.update(val=f"{row['val_loss']:.3f}")
        if evaluated:
            postfix.update(test=f"{row['test_loss']:.3f}", kl=f"{row['test_kl']:.3f}")
        if scheduled:
            postfix.update(lr=f"{row['lr']:.2g}")
        bar.set_postfix(postfix)
        bar.update(1)


def _save(path: Path, model, optimizer, shuffle: torch.Generator, outcome: TrainOutcome, epoch: int,
          extra_state: dict, partial: dict | None = None, validation: _Validation | None = None,
          trained: dict | None = None) -> None:
    """``epoch`` whole epochs done, plus ``partial`` (step, order, sums) of the next one when stopped inside it;
    with validation its best loss, best epoch, epochs since, and whether it stopped training (the learning rate
    needs no state: it is a function of the step, and the optimizer's holds the last one); ``trained``, the
    :func:`trained_record` of a training that ended (a stacked group's seed), under :data:`TRAINED_KEY`."""
    save_atomic({
        "epoch": epoch,
        "partial": partial,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "shuffle_rng": shuffle.get_state(),
        "history": outcome.history,
        "extra": extra_state,
        "validation": None if validation is None else validation.state(),
        **({} if trained is None else {TRAINED_KEY: trained}),
    }, path)


class CheckpointMismatch(ValueError):
    """A checkpoint in the run directory belongs to another config: resuming from it would mix two runs."""


def _check_extra(path: Path, state: dict, extra_state: dict) -> None:
    if state.get("extra") != extra_state:
        raise CheckpointMismatch(f"the run directory holds a checkpoint ({path}) written by a different config "
                                 f"({state.get('extra')} != {extra_state}); move it away or use another run "
                                 f"directory")


def check_checkpoint(path: Path, extra_state: dict) -> int | None:
    """The epochs done in the checkpoint at ``path`` (None when there is none); raises
    :class:`CheckpointMismatch` when it was written with other ``extra_state``. Loads no weights onto a device."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    _check_extra(path, state, extra_state)
    return int(state["epoch"])


def trained_record(outcome: TrainOutcome) -> dict:
    """What a checkpoint keeps under :data:`TRAINED_KEY` of a training that ended elsewhere (a stacked group):
    ``outcome`` without its history (the checkpoint has that already)."""
    return {"status": outcome.status, "message": outcome.message, "epochs_run": outcome.epochs_run,
            "resumed_from": outcome.resumed_from, "epochs_trained": outcome.epochs_trained,
            "best_epoch": outcome.best_epoch}


def _trained_outcome(model: FlowVAE, outcome: TrainOutcome, trained: dict, validation: _Validation | None
                     ) -> TrainOutcome:
    """The outcome a finished checkpoint records, the model holding the weights it is scored with."""
    for key in ("status", "message", "epochs_run", "resumed_from", "epochs_trained", "best_epoch"):
        setattr(outcome, key, trained[key])
    if validation is not None and outcome.status == "ok" and outcome.best_epoch:
        model.load_state_dict(validation.best_weights())
    return outcome


def _restore(path: Path, model, optimizer, shuffle: torch.Generator, outcome: TrainOutcome,
             extra_state: dict, validation: _Validation | None = None) -> tuple[int, dict | None, dict | None]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    _check_extra(path, state, extra_state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.random.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    shuffle.set_state(state["shuffle_rng"])
    outcome.history = list(state["history"])
    if validation is not None and state.get("validation") is not None:
        validation.restore(state["validation"])
    return int(state["epoch"]), state.get("partial"), state.get(TRAINED_KEY)
