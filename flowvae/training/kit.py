"""The training kit that :func:`flowvae.training.loop.fit` and :func:`flowvae.training.stacked.fit_stacked` share:
the outcome record, checkpoints (atomic writes, the format, restoring, refusing another config's), the loss passes
on held-out events, the validation split and its best-epoch tracker, the KL warm-up and learning-rate schedules,
the optimizer and its step, and the per-epoch report."""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowvae.files import replaced
from flowvae.models import FlowVAE

__all__ = ["EVAL_SEED_OFFSET", "VAL_SEED_OFFSET", "VAL_SPLIT_STREAM", "TRAINED_KEY", "TrainOutcome", "save_atomic",
           "evaluate_loss", "split_validation", "learning_rate", "CheckpointMismatch", "check_checkpoint",
           "trained_record"]


log = logging.getLogger(__name__)


# The test loss draws its noise from seed + 2 (generation uses seed + 1, training the global stream from seed).
EVAL_SEED_OFFSET = 2


# The validation loss draws its noise from seed + 3: a function of the weights, apart from the test loss's.
VAL_SEED_OFFSET = 3


# The validation split's stream: numpy's generator seeded with (data.seed, this), apart from data.seed's own draws.
VAL_SPLIT_STREAM = 1


# A checkpoint's record of a training that ended elsewhere (a stacked group of seeds, flowvae.training.stacked): its
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
class Validation:
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


def kl_beta(step: int, warmup_steps: int) -> float:
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def progress_bar(total: int, initial: int, mode: str):
    """A tqdm bar on a terminal (or when asked for), else None and one log line per epoch."""
    if mode == "log" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="epochs", unit="epoch", dynamic_ncols=True)


def make_optimizer(model: FlowVAE, cfg_train) -> torch.optim.Optimizer:
    """Adam, fused: one kernel for every parameter instead of ~10 small ops each (a quarter of a plain CPU step)."""
    return torch.optim.Adam(model.parameters(), lr=cfg_train.lr, fused=True)


def make_step(model: FlowVAE, optimizer: torch.optim.Optimizer, grad_clip: float | None):
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


def report_epoch(row: dict, epochs: int, bar, scheduled: bool = False) -> None:
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


def save_checkpoint(path: Path, model, optimizer, shuffle: torch.Generator, outcome: TrainOutcome, epoch: int,
          extra_state: dict, partial: dict | None = None, validation: Validation | None = None,
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


def trained_outcome(model: FlowVAE, outcome: TrainOutcome, trained: dict, validation: Validation | None
                     ) -> TrainOutcome:
    """The outcome a finished checkpoint records, the model holding the weights it is scored with."""
    for key in ("status", "message", "epochs_run", "resumed_from", "epochs_trained", "best_epoch"):
        setattr(outcome, key, trained[key])
    if validation is not None and outcome.status == "ok" and outcome.best_epoch:
        model.load_state_dict(validation.best_weights())
    return outcome


def restore_checkpoint(path: Path, model, optimizer, shuffle: torch.Generator, outcome: TrainOutcome,
             extra_state: dict, validation: Validation | None = None) -> tuple[int, dict | None, dict | None]:
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
