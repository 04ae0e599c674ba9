"""What a training tells the code around it, and what it asks that code: one protocol for
:func:`flowvae.training.loop.fit` and for each seed of :func:`flowvae.training.stacked.fit_stacked`.

A :class:`Callback` overrides the hooks it needs; the others do nothing:

- ``on_epoch_end(row, history)`` after every epoch trained: the run's curves file, its experiment tracker, fit's
  progress line;
- ``should_prune(row)`` after every epoch that has another after it: a message ends the training there with status
  ``pruned`` (a search's pruner, :mod:`flowvae.run.trial`);
- ``should_stop()`` after every step but an epoch's last and after every epoch that has another after it: True ends
  the training with status ``interrupted`` and a checkpoint to resume from (:class:`StopRequests`).

:class:`Callbacks` makes several one. Neither loop hands a callback anything to train with, nor draws a random
number for one: a callback that leaves the model's weights alone cannot change what is trained.
"""

from __future__ import annotations

from collections.abc import Iterable

from flowvae import stopping

__all__ = ["Callback", "Callbacks", "StopRequests"]


class Callback:
    """Hooks that a training calls; each does nothing unless a subclass overrides it."""

    def on_epoch_end(self, row: dict, history: list[dict]) -> None:
        """After every epoch trained, ``row`` (its losses) the last of ``history`` (the training's, resumed ones
        included). Not after an epoch whose loss is not finite: that training ends ``diverged``."""

    def should_prune(self, row: dict) -> str | None:
        """After every epoch that has another after it (not after the last, nor after an early stop), once
        :meth:`on_epoch_end` has run: a message ends the training there, with status ``pruned`` and that message
        (the checkpoint is written, the model keeps that epoch's weights)."""
        return None

    def should_stop(self) -> bool:
        """After every step but an epoch's last, and after every epoch that has another after it: True ends the
        training with status ``interrupted``, its checkpoint written where it stopped (inside an epoch too), so a
        resumed training ends with the numbers of one never stopped."""
        return False


class Callbacks(Callback):
    """Several callbacks as one, in order: each hook calls every one of them; a prune message is the first that
    any gives (every one is asked: each reports its epoch), and a stop any one's. ``None`` entries are left out (a
    callback that does not apply here: no search, no tracker)."""

    def __init__(self, callbacks: Callback | Iterable[Callback | None] | None = ()) -> None:
        if callbacks is None or isinstance(callbacks, Callback):
            callbacks = [callbacks]
        self.callbacks = [callback for callback in callbacks if callback is not None]

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def on_epoch_end(self, row: dict, history: list[dict]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(row, history)

    def should_prune(self, row: dict) -> str | None:
        messages = [callback.should_prune(row) for callback in self.callbacks]
        return next((message for message in messages if message), None)

    def should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)


class StopRequests(Callback):
    """The process's stop requests (SIGINT, SIGTERM: :mod:`flowvae.stopping`) end the training at the next step."""

    def should_stop(self) -> bool:
        return stopping.requested()
