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
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from flowvae.models import FlowVAE
from flowvae.training.kit import (
    EVAL_SEED_OFFSET,
    VAL_SEED_OFFSET,
    TrainOutcome,
    Validation,
    evaluate_loss,
    kl_beta,
    learning_rate,
    make_optimizer,
    make_step,
    progress_bar,
    report_epoch,
    restore_checkpoint,
    save_checkpoint,
    trained_outcome,
)

__all__ = ["fit"]

log = logging.getLogger(__name__)


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
    optimizer = make_optimizer(model, cfg_train)
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    device = train_x.device
    batch_size = cfg_train.batch_size
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    warmup_steps = cfg_train.warmup_epochs * steps_per_epoch
    total_steps = cfg_train.epochs * steps_per_epoch
    scheduled = cfg_train.get("lr_schedule", "constant") != "constant"
    validation = None if val_x is None else Validation(patience, best, extra_state or {})
    outcome = TrainOutcome(status="ok")
    start_epoch, partial = 0, None
    if checkpoint is not None and checkpoint.exists():
        start_epoch, partial, trained = restore_checkpoint(checkpoint, model, optimizer, shuffle, outcome,
                                                           extra_state or {}, validation)
        outcome.resumed_from = start_epoch
        if trained is not None:
            return trained_outcome(model, outcome, trained, validation)
        where = f"epoch {start_epoch + 1}, step {partial['step']}" if partial else f"the end of epoch {start_epoch}"
        log.info("resumed from %s at %s of %d epochs", checkpoint, where, cfg_train.epochs)
    step_fn = make_step(model, optimizer, cfg_train.grad_clip)
    bar = progress_bar(cfg_train.epochs, start_epoch, cfg_train.progress)
    save = (lambda epoch, part=None: save_checkpoint(checkpoint, model, optimizer, shuffle, outcome, epoch,
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
            sums += step_fn(batch, kl_beta(epoch * steps_per_epoch + i, warmup_steps)) * len(batch)
            if i + 1 < steps_per_epoch and should_stop():
                if save is not None:
                    save(epoch, {"step": i + 1, "order": order.cpu(), "sums": sums.cpu()})
                outcome.status = "interrupted"
                outcome.message = f"in epoch {epoch + 1} after step {i + 1}"  # the job says how to resume
                break
        if outcome.status == "interrupted":
            break
        train_loss, train_recon, train_kl = (sums / len(train_x)).tolist()
        row = {"epoch": epoch + 1, "beta": kl_beta((epoch + 1) * steps_per_epoch, warmup_steps)}
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
        report_epoch(row, cfg_train.epochs, bar, scheduled)
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


