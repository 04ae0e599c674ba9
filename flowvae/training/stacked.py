"""Runs that differ only in their seed, trained as one stacked model: every parameter, gradient and Adam moment
gets a leading seed axis, and one step under ``torch.func.vmap`` trains all the seeds at once.

Why: on a few CPU cores a step at batch 100 spends much of its time outside its matrix products, in per-operation
overhead that does not shrink with the work; S stacked seeds run one step's operations, each S times larger.

What stays each seed's own, so that a seed ends with :func:`flowvae.training.loop.fit`'s numbers up to rounding (batched
against single matrix products): its batch order (a generator seeded with the seed), its posterior noise (drawn
outside vmap from the stream its model was built from, and passed in), its validation and test losses
(:func:`~flowvae.training.kit.evaluate_loss` on its own model), gradient clipping (a global norm per seed), Adam
(stacked
elementwise, the same arithmetic), divergence, early stopping, ``best.pt`` and its checkpoint. The checkpoint is
fit's, written by fit's own code with the seed's streams, so fit resumes a stacked seed and the other way round; a
seed whose training ended (finished, stopped early, diverged) records its outcome there (:data:`TRAINED_KEY`),
and its own job scores it without training.

Seeds that leave (stopped early, diverged) leave the stack, which is rebuilt from the rest; seeds resumed from
different points wait until the group reaches theirs and join it there.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

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
    progress_bar,
    restore_checkpoint,
    save_checkpoint,
    trained_outcome,
    trained_record,
)

__all__ = ["fit_stacked"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seed:
    """One seed of the group: its model, its own Adam (the state between stacks, and the checkpoint's format), its
    streams, where it starts, and how its training goes."""

    model: FlowVAE
    seed: int
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator  # the batch order (CPU, as fit's)
    noise: torch.Generator  # the posterior noise, on the model's device: the stream fit draws from
    cpu_rng: Tensor  # on another device, torch's CPU stream as fit leaves it (on the CPU, the noise is that stream)
    checkpoint: Path | None
    extra_state: dict
    on_epoch: Callable[[list[dict]], None] | None
    validation: Validation | None
    outcome: TrainOutcome = field(default_factory=lambda: TrainOutcome(status="ok"))
    start: tuple[int, int] = (0, 0)  # (epoch, step) it trains from
    order: Tensor | None = None  # the current epoch's batch order (device); with sums, owned by a stack while in one
    sums: Tensor | None = None  # the current epoch's summed (loss, recon, kl), float64 (device)
    done: bool = False

    def draw_order(self, n: int, device: torch.device) -> None:
        """A new epoch: its batch order from the seed's shuffle generator, its sums zero (as fit)."""
        self.order = torch.randperm(n, generator=self.shuffle).to(device)
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)

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
            save_checkpoint(self.checkpoint, self.model, self.optimizer, self.shuffle, self.outcome, epoch,
                            self.extra_state, partial, self.validation, trained)


def fit_stacked(models: list[FlowVAE], train_x: Tensor, test_x: Tensor, cfg_train, *, seeds: list[int],
                rng_states: list[Tensor], checkpoints: list[Path | None], extra_states: list[dict],
                on_epoch: list[Callable[[list[dict]], None] | None] | None = None,
                should_stop: Callable[[], bool] = lambda: False, val_x: Tensor | None = None,
                bests: list[Path | None] | None = None) -> list[TrainOutcome]:
    """Train ``models`` (one per seed, of one architecture) as :func:`flowvae.training.loop.fit` trains each, together.

    ``models[i]`` was built by :func:`flowvae.run.experiment.seeded_model` with ``seeds[i]``, and ``rng_states[i]`` is
    ``torch.get_rng_state()`` right after: seed i's training noise stream. ``checkpoints[i]``, ``extra_states[i]``,
    ``on_epoch[i]`` and ``bests[i]`` are fit's ``checkpoint``, ``extra_state``, ``on_epoch`` and ``best`` for seed
    i; ``should_stop`` is checked after every step, and once true every seed in training writes its checkpoint and
    returns ``interrupted``. A checkpoint that records a finished training is returned as recorded. Returns the
    seeds' outcomes, in order; each model ends with the weights fit leaves (the best epoch's with validation).
    """
    n = len(models)
    on_epoch = on_epoch if on_epoch is not None else [None] * n
    bests = bests if bests is not None else [None] * n
    extra_states = [extra or {} for extra in extra_states]
    given = {"seeds": seeds, "rng_states": rng_states, "checkpoints": checkpoints, "extra_states": extra_states,
             "on_epoch": on_epoch, "bests": bests}
    wrong = {name: len(values) for name, values in given.items() if len(values) != n}
    if wrong:
        raise ValueError(f"fit_stacked needs one entry per model ({n}); got {wrong}")
    patience = cfg_train.get("patience")
    if patience is not None and val_x is None:
        raise ValueError("train.patience needs validation events (train.val_fraction > 0)")
    _check_same_architecture(models)
    group = [_seed(models[i], seeds[i], rng_states[i], checkpoints[i], extra_states[i], on_epoch[i],
                   None if val_x is None else Validation(patience, bests[i], extra_states[i]), cfg_train,
                   train_x.device) for i in range(n)]
    waiting = [member for member in group if not member.done]
    if waiting:
        _Group(waiting, train_x, test_x, val_x, cfg_train, should_stop).run()
    return [member.outcome for member in group]


def _seed(model: FlowVAE, seed: int, rng_state: Tensor, checkpoint: Path | None, extra_state: dict, on_epoch,
          validation: Validation | None, cfg_train, device: torch.device) -> _Seed:
    """Seed ``seed``'s member, resumed from its checkpoint when there is one (by fit's code; torch's own streams
    are left as they were): a training it records as ended is its outcome, and it does not train."""
    noise = torch.Generator(device=device)
    if device.type == "cpu":
        noise.set_state(rng_state)
    else:  # fit draws the noise from the device's stream, which torch.manual_seed(seed) seeded and building left
        noise.manual_seed(seed)
    member = _Seed(model, seed, make_optimizer(model, cfg_train), torch.Generator(device="cpu").manual_seed(seed),
                   noise, rng_state, checkpoint, extra_state, on_epoch, validation)
    if checkpoint is None or not checkpoint.exists():
        return member
    with torch.random.fork_rng(devices=_cuda_devices()):
        epoch, partial, trained = restore_checkpoint(checkpoint, model, member.optimizer, member.shuffle,
                                                     member.outcome, member.extra_state, validation)
        member.cpu_rng = torch.random.get_rng_state()
        if device.type == "cpu":
            noise.set_state(member.cpu_rng)
        elif torch.cuda.is_available():
            noise.set_state(torch.cuda.get_rng_state(device))
    member.outcome.resumed_from = epoch
    if trained is not None:
        trained_outcome(model, member.outcome, trained, validation)
        member.done = True
    elif epoch >= cfg_train.epochs or (validation is not None and validation.stopped):
        _finish(member)  # fit's checkpoint of a training it ended: nothing left to train
        _load_best(member)
    elif partial is not None:
        member.start = (epoch, int(partial["step"]))
        member.order, member.sums = partial["order"].to(device), partial["sums"].to(device)
    else:
        member.start = (epoch, 0)
    if not member.done:
        where = f"epoch {epoch + 1}, step {member.start[1]}" if partial else f"the end of epoch {epoch}"
        log.info("seed %d resumed from %s at %s of %d epochs", seed, checkpoint, where, cfg_train.epochs)
    return member


def _finish(member: _Seed) -> None:
    """The outcome of a training that ended, as fit counts it: the epochs, and with validation the best one."""
    outcome, validation = member.outcome, member.validation
    outcome.epochs_trained = outcome.resumed_from + outcome.epochs_run
    if validation is not None and outcome.status == "ok" and validation.best_epoch > 0:
        outcome.best_epoch = validation.best_epoch
    member.done = True


def _load_best(member: _Seed) -> None:
    """The best epoch's weights into the model, as fit leaves it (after its last checkpoint, which has the last)."""
    if member.outcome.best_epoch is not None:
        member.model.load_state_dict(member.validation.best_weights())


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
        terms = self.model.loss(x, beta, noise=noise)
        return torch.stack([terms.loss, terms.recon, terms.kl])


class _Stack:
    """The training members' parameters, Adam state, batch orders and loss sums stacked on a leading seed axis,
    and the step that trains them all. :meth:`write_back` hands each member its slice (weights into its model,
    moments into its own Adam) whenever a member's own copy is read: at an epoch's end and before a rebuild.

    A Linear layer's (out, in) weight is stacked as its transpose, (S, in, out), and the model sees it transposed
    back (a view): the layout in which the batched products read it, and write its gradient, without a copy
    (stacked as it is, every weight and its gradient were copied once a step). Adam does not care.
    """

    def __init__(self, members: list[_Seed], template: _Loss, cfg_train) -> None:
        self.members, self.grad_clip = members, cfg_train.grad_clip
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
        self.orders = torch.stack([member.order for member in members])
        self.sums = torch.stack([member.sums for member in members])
        self.keys = {name: f"model.{name}" for name in self.names}

        def loss(params: dict[str, Tensor], x: Tensor, noise: Tensor, beta: float) -> Tensor:
            return functional_call(template, params, (x, noise, beta))

        if len(members) > 1:
            self.loss = vmap(loss, in_dims=(0, 0, 0, None))
        else:  # a stack of one (the others have left): no vmap, whose overhead would buy nothing; squeezed, not
            # indexed, so that the gradient flows back as a view (an index's backward fills a zero stack first)
            self.loss = lambda params, x, noise, beta: loss({k: v.squeeze(0) for k, v in params.items()},
                                                            x.squeeze(0), noise.squeeze(0), beta).unsqueeze(0)
        self.latent_dim = members[0].model.latent_dim

    def new_epoch(self, n: int) -> None:
        """Every member's next batch order (from its own generator) and zero sums."""
        for member in self.members:
            member.draw_order(n, self.orders.device)
        self.orders = torch.stack([member.order for member in self.members])
        self.sums.zero_()

    def step(self, train_x: Tensor, start: int, stop: int, beta: float, lr: float | None) -> None:
        """One optimisation step of every member on its own batch ``order[start:stop]``."""
        x = train_x[self.orders[:, start:stop]]  # (S, B, n_in)
        dtype = self.params[self.names[0]].dtype
        noise = torch.stack([torch.randn((x.shape[1], self.latent_dim), generator=member.noise,
                                         device=x.device, dtype=dtype) for member in self.members])
        if lr is not None:
            self.optimizer.param_groups[0]["lr"] = lr
        params = {self.keys[name]: self._seeds_view(name, p) for name, p in self.params.items()}
        terms = self.loss(params, x, noise, beta)  # (S, 3)
        self.optimizer.zero_grad(set_to_none=True)
        terms[:, 0].sum().backward()
        if self.grad_clip is not None:
            _clip_per_seed([p.grad for p in self.params.values() if p.grad is not None], self.grad_clip)
        self.optimizer.step()
        self.sums += terms.detach().double() * x.shape[1]

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
            member.optimizer.param_groups[0]["lr"] = group["lr"]
            member.order, member.sums = self.orders[j].clone(), self.sums[j].clone()


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

    def __init__(self, members: list[_Seed], train_x: Tensor, test_x: Tensor, val_x: Tensor | None, cfg_train,
                 should_stop: Callable[[], bool]) -> None:
        self.waiting = sorted(members, key=lambda member: member.start)
        self.members = members
        self.active: list[_Seed] = []
        self.stack: _Stack | None = None
        self.train_x, self.test_x, self.val_x, self.cfg = train_x, test_x, val_x, cfg_train
        self.should_stop = should_stop
        template = copy.deepcopy(members[0].model)
        template.train()
        self.template = _Loss(template)
        self.steps_per_epoch = math.ceil(len(train_x) / cfg_train.batch_size)
        self.warmup_steps = cfg_train.warmup_epochs * self.steps_per_epoch
        self.total_steps = cfg_train.epochs * self.steps_per_epoch
        self.scheduled = cfg_train.get("lr_schedule", "constant") != "constant"

    def run(self) -> None:
        cfg, n = self.cfg, len(self.train_x)
        first_epoch = self.waiting[0].start[0]
        bar = progress_bar(cfg.epochs, first_epoch, cfg.progress)
        try:
            for epoch in range(first_epoch, cfg.epochs):
                if not self.active and not self.waiting:
                    break
                started = time.perf_counter()
                if self.stack is not None:
                    self.stack.new_epoch(n)
                for i in range(self.steps_per_epoch):
                    self._join(epoch, i)
                    if self.stack is None:
                        continue  # no member trains before a later one's starting point
                    step = epoch * self.steps_per_epoch + i
                    lr = learning_rate(cfg, step, self.total_steps) if self.scheduled else None
                    size = cfg.batch_size
                    self.stack.step(self.train_x, i * size, (i + 1) * size, kl_beta(step, self.warmup_steps), lr)
                    if i + 1 < self.steps_per_epoch and self.should_stop():
                        self._interrupt(epoch, i + 1)
                        return
                if self.stack is not None and self._end_epoch(epoch, started, bar):
                    return
        finally:
            if bar is not None:
                bar.close()

    def _join(self, epoch: int, step: int) -> None:
        """Members whose starting point this is join the stack (rebuilt with them)."""
        joining = [member for member in self.waiting if member.start == (epoch, step)]
        if not joining:
            return
        for member in joining:
            if member.order is None:  # a fresh epoch: its own order (a partial one kept the checkpoint's)
                member.draw_order(len(self.train_x), self.train_x.device)
            member.model.train()
        self.waiting = [member for member in self.waiting if member not in joining]
        self._restack(self.active + joining)

    def _restack(self, members: list[_Seed]) -> None:
        if self.stack is not None:
            self.stack.write_back()
        self.active = members
        self.stack = _Stack(members, self.template, self.cfg) if members else None

    def _interrupt(self, epoch: int, step: int) -> None:
        """A stop request inside an epoch: every training member saves where it is (fit's partial checkpoint),
        and it and every waiting one are interrupted."""
        self.stack.write_back()
        for member in self.active:
            member.save(epoch, {"step": step, "order": member.order.cpu(), "sums": member.sums.cpu()})
            _interrupted(member, f"in epoch {epoch + 1} after step {step}")
        for member in self.waiting:
            _interrupted_waiting(member)

    def _end_epoch(self, epoch: int, started: float, bar) -> bool:
        """Each training member's epoch end, as fit's: its row, divergence, validation, test loss, checkpoint,
        early stop; members that end leave the stack. True when a stop request ended the training."""
        cfg = self.cfg
        self.stack.write_back()
        leaving, last_for, rows = [], {}, []
        for member in self.active:
            row = self._row(member, epoch)
            if row is None:
                leaving.append(member)
                continue
            early = False
            if member.validation is not None:
                val = evaluate_loss(member.model, self.val_x, seed=member.seed + VAL_SEED_OFFSET)
                row.update({f"val_{k}": v for k, v in val.items()})
                early = member.validation.update(member.model, val["loss"], epoch + 1)
            last = epoch + 1 == cfg.epochs or early
            if last or (epoch + 1) % cfg.eval_every == 0:
                test = evaluate_loss(member.model, self.test_x, seed=member.seed + EVAL_SEED_OFFSET)
            else:
                test = dict.fromkeys(("loss", "recon", "kl"), math.nan)
            row.update({f"test_{k}": v for k, v in test.items()}, seconds=time.perf_counter() - started)
            member.outcome.history.append(row)
            rows.append(row)
            member.outcome.epochs_run += 1
            if member.on_epoch is not None:
                member.on_epoch(member.outcome.history)
            last_for[member] = (last, early)
        self._report(epoch, rows, started, bar)
        going_on = [member for member in self.active if member in last_for and not last_for[member][0]]
        stop = bool(going_on) and self.should_stop()
        for member, (last, early) in last_for.items():
            if last:
                _finish(member)
                member.save(epoch + 1, trained=trained_record(member.outcome))
                _load_best(member)
                if early and epoch + 1 < cfg.epochs:
                    log.info("seed %d stopped early after epoch %d: no better validation loss for %d epochs; best "
                             "epoch %d (validation loss %.4f)", member.seed, epoch + 1,
                             member.validation.since_best, member.validation.best_epoch, member.validation.best_loss)
                leaving.append(member)
            elif stop or (epoch + 1) % cfg.checkpoint_every == 0:
                member.save(epoch + 1)
        if stop:
            for member in going_on:
                _interrupted(member, f"after epoch {epoch + 1}")
            for member in self.waiting:
                _interrupted_waiting(member)
            return True
        if leaving:
            self.stack = None  # already written back: the rest restack without the leavers
            self._restack([member for member in self.active if member not in leaving])
        return False

    def _row(self, member: _Seed, epoch: int) -> dict | None:
        """The epoch's training losses as fit's history row; None (the member diverged, its outcome and
        checkpoint say so) when the loss is not finite."""
        cfg, steps = self.cfg, self.steps_per_epoch
        train_loss, train_recon, train_kl = (member.sums / len(self.train_x)).tolist()
        row = {"epoch": epoch + 1, "beta": kl_beta((epoch + 1) * steps, self.warmup_steps)}
        if self.scheduled:
            row["lr"] = member.optimizer.param_groups[0]["lr"]
        row.update(train_loss=train_loss, train_recon=train_recon, train_kl=train_kl)
        if math.isfinite(train_loss):
            return row
        outcome = member.outcome
        outcome.status = "diverged"
        outcome.message = (f"non-finite training loss ({train_loss}) in epoch {epoch + 1}; try a smaller "
                           f"train.lr (now {cfg.lr}) or train.grad_clip")
        outcome.history.append(row)
        _finish(member)
        member.save(epoch + 1, trained=trained_record(outcome))
        log.info("seed %d diverged in epoch %d: %s", member.seed, epoch + 1, outcome.message)
        return None

    def _report(self, epoch: int, rows: list[dict], started: float, bar) -> None:
        """One line per epoch for the group: how many seeds trained it, and the range of their losses."""
        text = f"epoch {epoch + 1}/{self.cfg.epochs}  {len(rows)} of {len(self.members)} seeds training"
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


def _interrupted(member: _Seed, message: str) -> None:
    outcome = member.outcome
    outcome.status, outcome.message = "interrupted", message
    outcome.epochs_trained = outcome.resumed_from + outcome.epochs_run
    member.done = True


def _interrupted_waiting(member: _Seed) -> None:
    """A member stopped before the group reached its starting point: its checkpoint is as it was."""
    epoch, step = member.start
    _interrupted(member, f"in epoch {epoch + 1} after step {step}" if step else f"after epoch {epoch}")
