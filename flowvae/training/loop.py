"""The training loop: shuffled mini-batches by index, Adam, KL warm-up, a learning-rate schedule, a moving average
of the weights, validation with early stopping, checkpoints, progress, divergence.

The whole data set lives on the device as one tensor and is batched by index, and nothing inside a step asks
the host for a value: the loss is summed on the device and read once per epoch, which is also when a
non-finite loss is noticed. A checkpoint holds everything the next epoch depends on (weights, optimizer,
both RNG states, the history, the validation's best loss and epoch), so a run resumed from it ends with the same
numbers as one never stopped.

With validation events (``train.val_fraction`` > 0, split off by :func:`split_validation`) the validation loss is
evaluated after every epoch with its own fixed noise; the weights of the epoch with the lowest one are kept (in
memory and in ``best.pt`` beside the checkpoint) and are the model that training returns, and ``train.patience``
epochs without a lower one end training early. With ``train.select_by`` a metric (``kl_sum``, ...) the caller's
``select`` measures the model after every epoch (events generated from it against the validation events), and the
lowest value picks the best epoch instead.

With ``train.ema`` > 0 a moving average of the weights is updated after every step
(:class:`~flowvae.training.kit.Ema`); it is what validates, is measured, tested and returned, and what ``best.pt``
and the checkpoint's ``model`` hold (the checkpoint keeps the training weights beside it).

What goes on around the training (the curves file, the tracker, a search's pruner, stop requests) is told and asked
through callbacks (:mod:`flowvae.training.callbacks`), the same as each seed of a stacked group's; the epoch's end is
the kit's (:class:`~flowvae.training.kit.Trainee`), the same as theirs too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from torch import Tensor

from flowvae.models import FlowVAE
from flowvae.training.callbacks import Callback, Callbacks
from flowvae.training.kit import Plan, Progress, Trainee, TrainOutcome, make_step

__all__ = ["fit"]

log = logging.getLogger(__name__)


def fit(model: FlowVAE, train_x: Tensor, test_x: Tensor, cfg_train, *, seed: int, checkpoint: Path | None = None,
        extra_state: dict | None = None, val_x: Tensor | None = None, best: Path | None = None,
        callbacks: Callback | Iterable[Callback | None] | None = (), select: Callable[[], float] | None = None
        ) -> TrainOutcome:
    """Train ``model`` for ``cfg_train.epochs`` epochs, resuming from ``checkpoint`` when it exists.

    With ``val_x`` the validation loss is evaluated after every epoch, ``cfg_train.patience`` epochs without a
    lower one stop training (status ``ok``), and the model ends with the best epoch's weights (also written to
    ``best``); ``outcome.best_epoch`` names it. With ``cfg_train.select_by`` other than ``val_loss``, ``select()``
    (the metric of the model as it is) picks the best epoch and counts the patience instead of the validation loss.
    The learning rate follows ``cfg_train.lr_schedule`` per step. With ``cfg_train.ema`` > 0 the moving average of
    the weights is what validates, is selected and is returned.

    A checkpoint is written every ``checkpoint_every`` epochs, after the last, and where ``callbacks`` end the
    training: at the step where one asked to stop (``interrupted``; a training that completes its last epoch is
    ``ok`` whatever they ask), or after the epoch one pruned (``pruned``, the model keeping that epoch's weights).
    ``extra_state`` is stored in every checkpoint (the run's config hash); a checkpoint with another raises
    :class:`~flowvae.training.kit.CheckpointMismatch`. A checkpoint that records a finished training
    (:data:`~flowvae.training.kit.TRAINED_KEY`, a stacked group's seed) is not trained further: fit returns the
    outcome it records, with the weights it holds (the best epoch's with validation).
    """
    run = Trainee(model, seed, Plan(cfg_train, train_x), test_x, val_x=val_x, checkpoint=checkpoint,
                  extra_state=extra_state, best=best, callbacks=callbacks, select=select)
    if run.restore():
        if run.trained is not None:
            return run.recorded()
        log.info("resumed from %s at %s of %d epochs", checkpoint, run.where(), cfg_train.epochs)
    step_fn = make_step(model, run.optimizer, cfg_train.grad_clip)
    progress = Progress(cfg_train, run.start[0], run.plan.scheduled)
    run.callbacks = Callbacks([progress, run.callbacks])  # each epoch's line first, then what the caller does
    model.train()
    for epoch in run.epochs_left():
        started = time.perf_counter()
        if not _train_epoch(run, step_fn, train_x, epoch):
            break  # asked to stop inside the epoch: interrupted, the checkpoint written
        end = run.end_epoch(epoch, started)
        if end is None:
            break  # diverged
        if run.pruned(end):
            run.save(epoch + 1)
            break
        stop = not end.last and run.callbacks.should_stop()
        if end.last or stop or run.plan.checkpoint_due(epoch + 1):
            run.save(epoch + 1)
        if stop:
            run.interrupted(f"after epoch {epoch + 1}")
            break
        if end.early:
            log.info("%s", run.validation.why_stopped(epoch + 1))
            break
    progress.close()
    run.end()
    run.load_best()
    return run.outcome


def _train_epoch(run: Trainee, step_fn, train_x: Tensor, epoch: int) -> bool:
    """Epoch ``epoch``'s steps, from where a resume left it (the same order and partial sums); False when a stop
    request ended it inside (the checkpoint written, the outcome ``interrupted``)."""
    plan, size = run.plan, run.plan.cfg.batch_size
    first = run.start[1] if epoch == run.start[0] else 0
    if first == 0:
        run.draw_order()
    for i in range(first, plan.steps_per_epoch):
        batch = train_x[run.order[i * size:(i + 1) * size]]
        step = epoch * plan.steps_per_epoch + i
        if plan.scheduled:
            for group in run.optimizer.param_groups:
                group["lr"] = plan.lr(step)
        run.sums += step_fn(batch, plan.beta(step)) * len(batch)
        run.after_step(step)
        if i + 1 < plan.steps_per_epoch and run.callbacks.should_stop():
            run.interrupt(epoch, i + 1)
            return False
    return True
