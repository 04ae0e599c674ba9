"""Runs that differ only in their seed, trained as one stacked model: every parameter, gradient and Adam moment
gets a leading seed axis, and one step under ``torch.func.vmap`` trains all the seeds at once.

Why: on a few CPU cores a step at batch 100 spends much of its time outside its matrix products, in per-operation
overhead that does not shrink with the work; S stacked seeds run one step's operations, each S times larger.

What stays each seed's own, so that a seed ends with :func:`flowvae.training.loop.fit`'s numbers up to rounding
(batched against single matrix products): its batch order (a generator seeded with the seed), its posterior noise
(drawn outside vmap from the stream its model was built from, and passed in), its validation and test losses
(:func:`~flowvae.training.kit.evaluate_loss`'s batches and noise; all seeds in one vmapped pass a batch, as their
steps), gradient clipping (a global norm per seed), Adam (stacked elementwise, the same arithmetic), the moving
average of its weights (``train.ema``: stacked beside the weights, the same elementwise arithmetic,
:func:`~flowvae.training.kit.ema_step`), divergence, early stopping and the best epoch (by its validation loss, or
by its own ``select`` measure with ``train.select_by``), its callbacks (pruning included), ``best.pt`` and its
checkpoint. Each seed is a :class:`~flowvae.training.kit.Trainee` as fit's model is, and its
epoch ends as fit's does (:meth:`~flowvae.training.kit.Trainee.end_epoch`). The checkpoint is fit's, written by
fit's own code with the seed's streams, so fit resumes a stacked seed and the other way round; a seed whose
training ended (finished, stopped early, diverged, pruned) records its outcome there
(:data:`~flowvae.training.kit.TRAINED_KEY`), and its own job scores it without training.

Seeds that leave (stopped early, diverged, pruned) leave the stack, which is rebuilt from the rest; seeds resumed
from different points wait until the group reaches theirs and join it there.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from flowvae.models import FlowVAE
from flowvae.training.callbacks import Callback
from flowvae.training.kit import (
    EVAL_BATCH_SIZE,
    EVAL_SEED_OFFSET,
    LOSS_TERMS,
    VAL_SEED_OFFSET,
    EpochEnd,
    Plan,
    Trainee,
    TrainOutcome,
    check_patience,
    check_selection,
    ema_step,
    progress_bar,
    trained_record,
)

__all__ = ["fit_stacked"]

log = logging.getLogger(__name__)


class _Seed(Trainee):
    """One seed of the group: fit's :class:`~flowvae.training.kit.Trainee`, with the stream its posterior noise
    comes from (drawn outside vmap) and, on another device than the CPU, torch's CPU stream as fit leaves it; the
    batch order and sums are owned by a stack while the seed is in one."""

    def __init__(self, model: FlowVAE, seed: int, plan: Plan, rng_state: Tensor, test_x: Tensor | None = None,
                 **options) -> None:
        super().__init__(model, seed, plan, test_x, **options)
        self.noise = torch.Generator(device=plan.device)  # the posterior noise: the stream fit draws from
        if plan.device.type == "cpu":
            self.noise.set_state(rng_state)
        else:  # fit draws the noise from the device's stream, which torch.manual_seed(seed) seeded and building left
            self.noise.manual_seed(seed)
        self.cpu_rng = rng_state  # on another device, torch's CPU stream (on the CPU, the noise is that stream)

    def restore(self) -> bool:
        """fit's resume, with the seed's streams from the checkpoint and torch's own left as they were."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        with torch.random.fork_rng(devices=_cuda_devices()):
            super().restore()
            self.cpu_rng = torch.random.get_rng_state()
            if self.plan.device.type == "cpu":
                self.noise.set_state(self.cpu_rng)
            elif torch.cuda.is_available():
                self.noise.set_state(torch.cuda.get_rng_state(self.plan.device))
        return True

    def save(self, epoch: int, partial: dict | None = None, trained: dict | None = None) -> None:
        """fit's checkpoint, by fit's code, with torch's streams set to this seed's while it writes them."""
        if self.checkpoint is None:
            return
        with torch.random.fork_rng(devices=_cuda_devices()):
            if self.noise.device.type == "cpu":
                torch.random.set_rng_state(self.noise.get_state())
            else:
                torch.random.set_rng_state(self.cpu_rng)
                torch.cuda.set_rng_state(self.noise.get_state(), self.noise.device)
            super().save(epoch, partial, trained)

    def leave(self, epoch: int) -> None:
        """Its training ended with epoch ``epoch`` (finished, stopped early, diverged, pruned): the outcome, the
        checkpoint recording it (its job scores it without training), then the best epoch's weights as fit."""
        self.end()
        self.save(epoch + 1, trained=trained_record(self.outcome))
        self.load_best()


def fit_stacked(models: list[FlowVAE], train_x: Tensor, test_x: Tensor, cfg_train, *, seeds: list[int],
                rng_states: list[Tensor], checkpoints: list[Path | None], extra_states: list[dict],
                callbacks: list[Callback | Iterable[Callback | None] | None] | None = None,
                val_x: Tensor | None = None, bests: list[Path | None] | None = None,
                selects: list[Callable[[], float] | None] | None = None) -> list[TrainOutcome]:
    """Train ``models`` (one per seed, of one architecture) as :func:`flowvae.training.loop.fit` trains each, together.

    ``models[i]`` was built by :func:`flowvae.run.experiment.seeded_model` with ``seeds[i]``, and ``rng_states[i]`` is
    ``torch.get_rng_state()`` right after: seed i's training noise stream. ``checkpoints[i]``, ``extra_states[i]``,
    ``callbacks[i]`` and ``bests[i]`` are fit's ``checkpoint``, ``extra_state``, ``callbacks`` and ``best`` for seed
    i; ``selects[i]``, fit's ``select`` (with ``train.select_by`` a metric: seed i's measure of its own model). A
    prune message from a seed's callbacks ends that seed's training alone, as fit's (``pruned``, the model
    keeping that epoch's weights), and it leaves the stack; a stop request from the callbacks of any seed in
    training (asked as fit asks) stops the group: every seed in training writes its checkpoint and returns
    ``interrupted``. A checkpoint that records a finished training is returned as recorded. Returns the seeds'
    outcomes, in order; each model ends with the weights fit leaves (the best epoch's with validation).
    """
    n = len(models)
    callbacks = callbacks if callbacks is not None else [None] * n
    bests = bests if bests is not None else [None] * n
    selects = selects if selects is not None else [None] * n
    given = {"seeds": seeds, "rng_states": rng_states, "checkpoints": checkpoints, "extra_states": extra_states,
             "callbacks": callbacks, "bests": bests, "selects": selects}
    wrong = {name: len(values) for name, values in given.items() if len(values) != n}
    if wrong:
        raise ValueError(f"fit_stacked needs one entry per model ({n}); got {wrong}")
    check_patience(cfg_train, val_x)
    for select in selects:
        check_selection(cfg_train, val_x, select)
    _check_same_architecture(models)
    plan = Plan(cfg_train, train_x)
    group = [_Seed(models[i], seeds[i], plan, rng_states[i], test_x, val_x=val_x, checkpoint=checkpoints[i],
                   extra_state=extra_states[i], best=bests[i], callbacks=callbacks[i], select=selects[i])
             for i in range(n)]
    for member in group:
        _resume(member)
    waiting = [member for member in group if not member.done]
    if waiting:
        _Group(waiting, train_x, plan).run()
    return [member.outcome for member in group]


def _resume(member: _Seed) -> None:
    """The member resumed from its checkpoint when there is one (by fit's code): a training it records as ended
    is its outcome, and it does not train; nor does one that fit's checkpoint says has ended."""
    if not member.restore():
        return
    if member.trained is not None:
        member.recorded()
    elif not member.epochs_left():
        member.end()  # fit's checkpoint of a training it ended: nothing left to train
        member.load_best()
    else:
        log.info("seed %d resumed from %s at %s of %d epochs", member.seed, member.checkpoint, member.where(),
                 member.plan.cfg.epochs)


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _check_same_architecture(models: list[FlowVAE]) -> None:
    """One parameter list for all (names, shapes, dtypes), and a state that is the parameters alone."""
    if not models:
        raise ValueError("fit_stacked needs at least one model")

    def layout(model: FlowVAE) -> list[tuple]:
        return [(name, tuple(p.shape), p.dtype, p.device) for name, p in model.named_parameters()]

    first = layout(models[0])
    for i, model in enumerate(models[1:], 1):
        if layout(model) != first:
            raise ValueError(f"fit_stacked stacks models of one architecture; model {i} differs from model 0 "
                             f"(build every seed's model from one config)")
    extra = sorted(set(models[0].state_dict()) - {name for name, *_ in first})
    if extra:
        raise ValueError(f"fit_stacked stacks parameters only; the model also has state {extra}")


class _Loss(nn.Module):
    """The loss of one seed's model as a tensor (loss, recon, kl), for functional_call under vmap."""

    def __init__(self, model: FlowVAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, noise: Tensor, beta: float) -> Tensor:
        return self.model.loss(x, beta, noise=noise).stacked()


class _Stack:
    """The training members' parameters, Adam state, moving averages (``train.ema``), batch orders and loss sums
    stacked on a leading seed axis, the step that trains them all, and the pass that evaluates them all on held-out
    events (``evaluator``: the model in eval mode, as :func:`~flowvae.training.kit.evaluate_loss` runs it).
    :meth:`write_back` hands each member its slice (weights into its model, moments into its own Adam, the average
    into its own) whenever a member's own copy is read: at an epoch's end and before a rebuild.

    A Linear layer's (out, in) weight is stacked as its transpose, (S, in, out), and the model sees it transposed
    back (a view): the layout in which the batched products read it, and write its gradient, without a copy
    (stacked as it is, every weight and its gradient were copied once a step). Adam does not care.
    """

    def __init__(self, members: list[_Seed], template: _Loss, evaluator: _Loss, cfg_train) -> None:
        self.members, self.grad_clip, self.evaluator = members, cfg_train.grad_clip, evaluator
        own = [dict(member.model.named_parameters()) for member in members]
        self.names = list(own[0])
        self.matrices = {f"{name}.weight" for name, module in members[0].model.named_modules()
                         if type(module) is nn.Linear}  # the weights F.linear reads (not IAF's masked ones)
        with torch.no_grad():
            self.params = {name: self._stack([params[name] for params in own], name).requires_grad_()
                           for name in self.names}
        first = members[0].optimizer
        self.optimizer = type(first)(list(self.params.values()), **first.defaults)
        self.optimizer.param_groups[0]["lr"] = first.param_groups[0]["lr"]
        for name, stacked in self.params.items():
            states = [member.optimizer.state.get(params[name]) for member, params in zip(members, own, strict=True)]
            if any(states):
                self.optimizer.state[stacked] = self._stack_state(states, name)
        self.averages = None  # each parameter's moving average, stacked as the parameter is
        if members[0].ema is not None:
            self.averages = {name: self._stack([member.ema.average[name] for member in members], name)
                             for name in self.names}
        self.orders = torch.stack([member.order for member in members])
        self.sums = torch.stack([member.sums for member in members])
        self.keys = {name: f"model.{name}" for name in self.names}

        self.loss = _over_seeds(template, len(members))
        self.latent_dim, self.dtype = members[0].model.latent_dim, self.params[self.names[0]].dtype

    def new_epoch(self) -> None:
        """Every member's next batch order (from its own generator) and zero sums."""
        for member in self.members:
            member.draw_order()
        self.orders = torch.stack([member.order for member in self.members])
        self.sums.zero_()

    def step(self, train_x: Tensor, start: int, stop: int, beta: float, lr: float | None,
             ema: float | None = None) -> None:
        """One optimisation step of every member on its own batch ``order[start:stop]``; then, with ``ema`` (the
        step's :meth:`~flowvae.training.kit.Plan.ema_weight`), every member's moving average."""
        x = train_x[self.orders[:, start:stop]]  # (S, B, n_in)
        noise = self._noise([member.noise for member in self.members], x.shape[1], x.device)
        if lr is not None:
            self.optimizer.param_groups[0]["lr"] = lr
        params = {self.keys[name]: self._seeds_view(name, p) for name, p in self.params.items()}
        terms = self.loss(params, x, noise, beta)  # (S, 3)
        self.optimizer.zero_grad(set_to_none=True)
        terms[:, 0].sum().backward()
        if self.grad_clip is not None:
            _clip_per_seed([p.grad for p in self.params.values() if p.grad is not None], self.grad_clip)
        self.optimizer.step()
        if ema is not None:
            ema_step([self.averages[name] for name in self.names], [self.params[name] for name in self.names], ema)
        self.sums += terms.detach().double() * x.shape[1]

    @torch.no_grad()
    def held_out(self, x: Tensor, offset: int, members: list[_Seed]) -> dict[_Seed, dict[str, float]]:
        """:func:`~flowvae.training.kit.evaluate_loss` of each of ``members`` (some of the stack's) on ``x``, with
        the weights that are scored (the moving averages with ``train.ema``) and each seed's noise from a generator
        seeded with its seed + ``offset``: one vmapped pass a batch for all of them, the batches and draws fit's."""
        where = [self.members.index(member) for member in members]
        source = self.averages if self.averages is not None else self.params
        params = {self.keys[name]: self._seeds_view(name, stacked if where == list(range(len(self.members)))
                                                    else stacked[where]) for name, stacked in source.items()}
        loss = _over_seeds(self.evaluator, len(members))
        generators = [torch.Generator(device=x.device).manual_seed(member.seed + offset) for member in members]
        sums = torch.zeros(len(members), len(LOSS_TERMS), device=x.device, dtype=torch.float64)
        for start in range(0, len(x), EVAL_BATCH_SIZE):
            batch = x[start:start + EVAL_BATCH_SIZE]
            noise = self._noise(generators, len(batch), x.device)
            sums += loss(params, batch.expand(len(members), *batch.shape), noise, 1.0).double() * len(batch)
        return {member: dict(zip(LOSS_TERMS, values, strict=True))
                for member, values in zip(members, (sums / len(x)).tolist(), strict=True)}

    def _noise(self, generators: list[torch.Generator], n: int, device: torch.device) -> Tensor:
        """(S, n, latent_dim) standard normal posterior noise, seed i's drawn from ``generators[i]`` as its own
        model's loss would draw it: what keeps every seed on its lone run's stream, in steps and held-out passes."""
        return torch.stack([torch.randn((n, self.latent_dim), generator=generator, device=device, dtype=self.dtype)
                            for generator in generators])

    def _stack(self, tensors: list[Tensor], name: str) -> Tensor:
        """The seeds' tensors of parameter ``name`` (or of its Adam state) as the stack holds them."""
        return torch.stack([t.mT if name in self.matrices else t for t in tensors])

    def _seeds_view(self, name: str, stacked: Tensor) -> Tensor:
        """A stacked tensor of parameter ``name`` as (S, the seed's shape): a view."""
        return stacked.mT if name in self.matrices else stacked

    def _stack_state(self, states: list[dict | None], name: str) -> dict:
        """One Adam state for the stacked parameter from the members' own (one step count: they train in step)."""
        if not all(states):
            raise RuntimeError(f"the seeds' optimizers disagree on parameter {name}: some have Adam state, some not")
        steps = {float(state["step"]) for state in states}
        if len(steps) > 1:
            raise RuntimeError(f"the seeds' optimizers have taken different numbers of steps ({sorted(steps)}) on "
                               f"{name}")
        return {key: states[0][key].clone() if key == "step" else self._stack([state[key] for state in states], name)
                for key in states[0]}

    @torch.no_grad()
    def write_back(self) -> None:
        """Each member's slice into its own model, Adam, batch order and sums."""
        group = self.optimizer.param_groups[0]
        for j, member in enumerate(self.members):
            own = dict(member.model.named_parameters())
            for name, stacked in self.params.items():
                own[name].copy_(self._seeds_view(name, stacked)[j])
                state = self.optimizer.state.get(stacked)
                if state:
                    member.optimizer.state[own[name]] = {
                        key: value.clone() if key == "step" else self._seeds_view(name, value)[j].clone(
                            memory_format=torch.contiguous_format) for key, value in state.items()}
            if self.averages is not None:
                for name, stacked in self.averages.items():
                    member.ema.average[name].copy_(self._seeds_view(name, stacked)[j])
            member.optimizer.param_groups[0]["lr"] = group["lr"]
            member.order, member.sums = self.orders[j].clone(), self.sums[j].clone()


def _over_seeds(template: _Loss, count: int) -> Callable[[dict[str, Tensor], Tensor, Tensor, float], Tensor]:
    """The loss of ``count`` seeds at once: (stacked parameters, x, noise, beta) to (S, 3), vmapped over the seeds'
    axis of the parameters, events and noise."""

    def loss(params: dict[str, Tensor], x: Tensor, noise: Tensor, beta: float) -> Tensor:
        return functional_call(template, params, (x, noise, beta))

    if count > 1:
        return vmap(loss, in_dims=(0, 0, 0, None))
    # a stack of one (the others have left): no vmap, whose overhead would buy nothing; squeezed, not indexed, so
    # that the gradient flows back as a view (an index's backward fills a zero stack first)
    return lambda params, x, noise, beta: loss({k: v.squeeze(0) for k, v in params.items()}, x.squeeze(0),
                                               noise.squeeze(0), beta).unsqueeze(0)


def _log_saved(members: list[_Seed], where: str) -> None:
    """The group's word on a stop request: where its training seeds were saved (each job then says it stopped
    before its own run started, which on its own reads as if nothing had been kept)."""
    seeds = ", ".join(str(member.seed) for member in members)
    log.warning("stop requested: seeds %s saved %s; rerun the same command to resume them", seeds, where)


def _clip_per_seed(grads: list[Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each seed apart: the global 2-norm of the seed's gradients, scaled to at
    most ``max_norm``."""
    norms = torch.stack([torch.linalg.vector_norm(grad.flatten(1), dim=1) for grad in grads], dim=1)  # (S, P)
    total = torch.linalg.vector_norm(norms, dim=1)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.view(-1, *[1] * (grad.dim() - 1)))


class _Group:
    """The epoch loop over the members still training: steps in one stack, each member's epoch end as fit's."""

    def __init__(self, members: list[_Seed], train_x: Tensor, plan: Plan) -> None:
        self.waiting = sorted(members, key=lambda member: member.start)
        self.members = members
        self.active: list[_Seed] = []
        self.stack: _Stack | None = None
        self.train_x, self.plan = train_x, plan
        self.template = _Loss(copy.deepcopy(members[0].model).train())
        self.evaluator = _Loss(copy.deepcopy(members[0].model).eval())  # the held-out passes, as evaluate_loss's
        self.val_x, self.test_x = members[0].val_x, members[0].test_x

    def run(self) -> None:
        plan, size = self.plan, self.plan.cfg.batch_size
        first_epoch = self.waiting[0].start[0]
        bar = progress_bar(plan.cfg.epochs, first_epoch, plan.cfg.progress)
        try:
            for epoch in range(first_epoch, plan.cfg.epochs):
                if not self.active and not self.waiting:
                    break
                started = time.perf_counter()
                if self.stack is not None:
                    self.stack.new_epoch()
                for i in range(plan.steps_per_epoch):
                    self._join(epoch, i)
                    if self.stack is None:
                        continue  # no member trains before a later one's starting point
                    step = epoch * plan.steps_per_epoch + i
                    self.stack.step(self.train_x, i * size, (i + 1) * size, plan.beta(step), plan.lr(step),
                                    plan.ema_weight(step))
                    if i + 1 < plan.steps_per_epoch and self._stop_requested(self.active):
                        self._interrupt(epoch, i + 1)
                        return
                if self.stack is not None and self._end_epoch(epoch, started, bar):
                    return
        finally:
            if bar is not None:
                bar.close()

    def _stop_requested(self, members: list[_Seed]) -> bool:
        """Whether the callbacks of any of ``members`` ask to stop: a stop request stops the whole group."""
        return any(member.callbacks.should_stop() for member in members)

    def _join(self, epoch: int, step: int) -> None:
        """Members whose starting point this is join the stack (rebuilt with them)."""
        joining = [member for member in self.waiting if member.start == (epoch, step)]
        if not joining:
            return
        for member in joining:
            if member.order is None:  # a fresh epoch: its own order (a partial one kept the checkpoint's)
                member.draw_order()
            member.model.train()
        self.waiting = [member for member in self.waiting if member not in joining]
        self._restack(self.active + joining)

    def _restack(self, members: list[_Seed]) -> None:
        if self.stack is not None:
            self.stack.write_back()
        self.active = members
        self.stack = _Stack(members, self.template, self.evaluator, self.plan.cfg) if members else None

    def _interrupt(self, epoch: int, step: int) -> None:
        """A stop request inside an epoch: every training member saves where it is (fit's partial checkpoint),
        and it and every waiting one are interrupted."""
        self.stack.write_back()
        for member in self.active:
            member.interrupt(epoch, step)
        self._interrupt_waiting()
        _log_saved(self.active, f"in epoch {epoch + 1} after step {step}")

    def _interrupt_waiting(self) -> None:
        """Members stopped before the group reached their starting point: their checkpoints are as they were."""
        for member in self.waiting:
            epoch, step = member.start
            member.interrupted(f"in epoch {epoch + 1} after step {step}" if step else f"after epoch {epoch}")

    def _end_epoch(self, epoch: int, started: float, bar) -> bool:
        """Each training member's epoch end, as fit's (:meth:`~flowvae.training.kit.Trainee.end_epoch`, then its
        callbacks' prune message, a stop request, the checkpoint when due); members whose training ends leave the
        stack. True when a stop request ended the training."""
        self.stack.write_back()
        ends = self._epoch_ends(epoch, started)
        self._report(epoch, [end.row for end in ends.values()], started, bar)
        going_on = []
        for member, end in ends.items():
            if member.pruned(end):
                member.leave(epoch)
                log.info("seed %d %s", member.seed, member.outcome.message)
            elif not end.last:
                going_on.append(member)
        stop = bool(going_on) and self._stop_requested(going_on)
        for member, end in ends.items():
            if end.last:
                member.leave(epoch)
                if end.early:
                    log.info("seed %d %s", member.seed, member.validation.why_stopped(epoch + 1))
            elif member in going_on and (stop or self.plan.checkpoint_due(epoch + 1)):
                member.save(epoch + 1)
        if stop:
            for member in going_on:
                member.interrupted(f"after epoch {epoch + 1}")
            self._interrupt_waiting()
            _log_saved(going_on, f"after epoch {epoch + 1}")
            return True
        if len(going_on) < len(self.active):
            self.stack = None  # already written back: the rest restack without the leavers
            self._restack(going_on)
        return False

    def _epoch_ends(self, epoch: int, started: float) -> dict[_Seed, EpochEnd]:
        """Each training member's :meth:`~flowvae.training.kit.Trainee.end_epoch`, step by step, its validation and
        test losses from one pass over all the members that need them (:meth:`_Stack.held_out`) rather than one
        pass a seed; a member that diverged leaves. The ends of those that did not."""
        rows = {}
        for member in self.active:
            row = member.trained_epoch(epoch)
            if row is None:
                member.leave(epoch)
                log.info("seed %d diverged in epoch %d: %s", member.seed, epoch + 1, member.outcome.message)
            else:
                rows[member] = row
        vals = self._held_out(self.val_x, VAL_SEED_OFFSET, list(rows))
        ends = {}
        for member, row in rows.items():
            with member.averaged():
                ends[member] = member.validated(epoch, row, vals.get(member))
        tests = self._held_out(self.test_x, EVAL_SEED_OFFSET, [m for m, end in ends.items() if m.test_due(epoch, end)])
        seconds = time.perf_counter() - started  # the group's epoch, the same for every seed in it
        for member, end in ends.items():
            with member.averaged():
                member.close_epoch(end, tests.get(member), seconds)
        return ends

    def _held_out(self, x: Tensor | None, offset: int, members: list[_Seed]) -> dict[_Seed, dict[str, float]]:
        """The members' losses on ``x`` (none without events or members)."""
        return self.stack.held_out(x, offset, members) if x is not None and members else {}

    def _report(self, epoch: int, rows: list[dict], started: float, bar) -> None:
        """One line per epoch for the group: how many seeds trained it, and the range of their losses."""
        text = f"epoch {epoch + 1}/{self.plan.cfg.epochs}  {len(rows)} of {len(self.members)} seeds training"
        for key in ("train_loss", "val_loss", "test_loss"):
            values = [row[key] for row in rows if key in row and math.isfinite(row[key])]
            if values:
                text += f"  {key.replace('_', ' ')} {min(values):.4f}..{max(values):.4f}"
        text += f"  ({time.perf_counter() - started:.1f} s)"
        if bar is None:
            log.info(text)
        else:
            log.debug(text)
            bar.set_postfix({"seeds": len(rows)})
            bar.update(1)
