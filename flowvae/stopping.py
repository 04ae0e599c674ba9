"""Stop requests for the whole process: SIGTERM and Ctrl-C become a flag that long work checks at safe points.

SIGTERM is what SLURM, ``timeout`` and ``kill`` send; a first Ctrl-C (SIGINT) means the same. Neither kills the
process: :func:`requested` turns true, training stops at the next step boundary with a checkpoint, the other
phases of a run stop at their next :func:`check`, and the run ends with exit code 3 and a ``status.json`` that
says so. A second Ctrl-C raises KeyboardInterrupt at once (the last checkpoint stays). A process that gets
SIGTERM passes it on to its child processes (a joblib sweep's workers), so a sweep signalled in its parent
leaves no orphans behind. The flag outlives a run: a sweep's later jobs in the same process do not start.

On a SLURM cluster, submitit (Hydra's submitit launcher) warns a job before its time limit with a signal
(SIGUSR2, or ``$SUBMITIT_PREEMPT_SIGNAL``) on which it requeues the job and exits. Where such a handler is
installed, it is wrapped: the signal becomes a stop request like SIGTERM, the run saves its checkpoint at the
next step and records its status, and only then :func:`requeue` hands over to submitit, which requeues the job
(``hydra.launcher.max_num_timeout`` times at most); the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

__all__ = ["Interrupted", "install", "requested", "received", "check", "reset", "requeue", "request", "on_request"]

log = logging.getLogger(__name__)

_received: str | None = None
_installed = False
# submitit's handler of its preemption signal, wrapped while a run saves its checkpoint; called by requeue()
_requeue_handler: Callable | None = None
_requeue_signal: int | None = None
_requeue_pending = False
# called with the signal's name when the first stop request arrives (a launcher tells its worker processes)
_listeners: list[Callable[[str], None]] = []


class Interrupted(Exception):
    """Raised by :func:`check` once a stop was requested: the run ends as ``interrupted`` (exit code 3)."""


def received() -> str | None:
    """The name of the first stop signal this process got (``SIGTERM``, ``SIGINT``), or None."""
    return _received


def requested() -> bool:
    """Whether this process was asked to stop."""
    return _received is not None


def check(where: str) -> None:
    """Raise :class:`Interrupted` if a stop was requested; ``where`` names the phase for the message."""
    if _received is not None:
        raise Interrupted(f"stopped by {_received} {where}")


def request(name: str) -> None:
    """A stop asked for from outside this process (a launcher's parent that was signalled): as if ``name`` had
    arrived here, without passing it on."""
    global _received
    if _received is None:
        _received = name


def on_request(listener: Callable[[str], None]) -> None:
    """Call ``listener(signal name)`` once, when this process's first stop request arrives (until :func:`reset`)."""
    _listeners.append(listener)


def _tell_listeners(name: str) -> None:
    for listener in _listeners:
        try:
            listener(name)
        except Exception:  # noqa: BLE001 - a listener never stops the stop
            log.warning("a stop listener failed", exc_info=True)


def _children_terminate() -> None:
    """SIGTERM to this process's descendants (a launcher's worker processes)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - a process table we cannot read: nothing to pass on
        return
    for child in children:
        try:
            child.send_signal(signal.SIGTERM)
        except Exception:  # noqa: BLE001 - gone already
            pass


def _handle(signum, frame) -> None:
    global _received
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and _received == "SIGINT":
        raise KeyboardInterrupt  # the second Ctrl-C: stop now
    if _received is None:
        _received = name
        log.warning("%s received: stopping at the next safe point (Ctrl-C again to stop at once)", name)
        _tell_listeners(name)
    if signum == signal.SIGTERM:
        _children_terminate()
    elif _received != "SIGINT":
        _received = "SIGINT"  # a Ctrl-C after a SIGTERM: the next one stops at once


def _handle_preemption(signum, frame) -> None:
    """The cluster's warning before a time limit: stop like SIGTERM, and requeue once the run has stopped."""
    global _requeue_pending, _received
    _requeue_pending = True
    if _received is None:
        _received = signal.Signals(signum).name
        log.warning("%s received (the cluster's time limit is near): stopping at the next safe point, then "
                    "requeueing", _received)
        _tell_listeners(_received)


def _preemption_signal() -> int | None:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name.upper().removeprefix('SIG')}", None)


def install() -> None:
    """Catch SIGTERM and SIGINT in this process from now on (idempotent; a no-op outside the main thread), and
    wrap a handler that a launcher (submitit) installed for its preemption signal."""
    global _installed, _requeue_handler, _requeue_signal
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    preemption = _preemption_signal()
    if preemption is not None:
        previous = signal.getsignal(preemption)
        if callable(previous):  # someone (submitit) means to requeue on it
            _requeue_handler, _requeue_signal = previous, preemption
            signal.signal(preemption, _handle_preemption)
    _installed = True


def requeue() -> None:
    """If the stop came from the cluster's preemption signal, hand over to the launcher's handler now (it
    requeues the job and exits the process); otherwise do nothing."""
    global _requeue_pending
    if _requeue_pending and _requeue_handler is not None:
        _requeue_pending = False
        log.warning("requeueing the job: it resumes from its checkpoint")
        _requeue_handler(_requeue_signal, None)


def reset() -> None:
    """Forget a received stop and restore the default handlers (tests, and a process that starts over)."""
    global _received, _installed, _requeue_handler, _requeue_signal, _requeue_pending
    _received = None
    _listeners.clear()
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if _requeue_signal is not None:
            signal.signal(_requeue_signal, _requeue_handler)
    _installed, _requeue_handler, _requeue_signal, _requeue_pending = False, None, None, False
