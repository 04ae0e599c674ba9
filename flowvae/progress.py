"""What a long phase is doing while it does it: one mechanism for every command after training.

A phase (:func:`phase`) says what it does when it starts (one log line), then, while it runs, how far it is: on a
terminal a tqdm bar (phases that count steps), elsewhere (a log file, a pipe, cron) a log line at least every
:data:`INTERVAL` seconds saying which phase is running, its count and its time so far; the outermost phase, and
any phase that took longer than the interval, ends with a line saying how long it took. Phases nest (scoring ›
the truth row › FPD): the lines of inner phases are indented, and the periodic line names the innermost phase
running. The periodic lines come from one background thread per outermost phase, so a single long step (one
block of EFPs, one KPD batch) cannot keep a log silent; the thread only reads counters and logs, so progress
never changes what is computed, in which order, or any random stream.

How: :func:`settings` (``mode``: ``auto``, a bar when stderr is a terminal and log lines otherwise; ``bar``;
``log``; ``none``, nothing at all; ``interval``: seconds between periodic lines), set by each command — a
training run's ``train.progress``, ``flowvae score --progress``, ``flowvae generate --progress``. Lines go to the
logger the phase names (its module's), at INFO; commands that run outside Hydra print them on stderr with
:func:`console`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["phase", "Phase", "settings", "console", "MODES", "INTERVAL"]

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "none")
INTERVAL = 10.0  # seconds: the longest a running phase stays silent in a log
_MIN_WAIT = 0.01  # the background thread's shortest sleep
_clock = time.monotonic  # what phases time themselves with (a test may replace it)


class _Settings:
    mode: str = "auto"
    interval: float = INTERVAL


_current = _Settings()
_local = threading.local()  # .reporter: the reporter of this thread's outermost running phase


@contextmanager
def settings(mode: str | None = None, interval: float | None = None) -> Iterator[None]:
    """Within the block, phases that start report in ``mode`` (one of :data:`MODES`) every ``interval`` seconds;
    None keeps the current value. Restored on exit."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: one of {', '.join(MODES)}")
    if interval is not None and not interval > 0:
        raise ValueError(f"progress interval {interval!r}: seconds > 0")
    saved = _current.mode, _current.interval
    _current.mode = saved[0] if mode is None else mode
    _current.interval = saved[1] if interval is None else float(interval)
    try:
        yield
    finally:
        _current.mode, _current.interval = saved


def _resolved(mode: str) -> str:
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return mode


class Phase:
    """One running phase: ``advance(n)`` counts ``n`` more of its ``total`` steps (events, jets, batches)."""

    def __init__(self, what: str, total: int | None, unit: str, logger: logging.Logger, depth: int):
        self.what, self.total, self.unit, self.logger, self.depth = what, total, unit, logger, depth
        self.done = 0
        self.started = _clock()
        self.bar = None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def status(self, now: float) -> str:
        """The periodic line: what, how far, how long so far."""
        seconds = f"{now - self.started:.0f} s"
        if self.total:
            unit = f" {self.unit}" if self.unit else ""
            return f"{self.what}: {self.done}/{self.total}{unit} ({100 * self.done / self.total:.0f}%), {seconds}"
        return f"{self.what}: still working, {seconds}"


class _Reporter:
    """The phases running in one thread, outermost first, and the thread that speaks when they are silent."""

    def __init__(self, mode: str, interval: float):
        self.mode, self.interval = mode, interval
        self.phases: list[Phase] = []
        self.last = _clock()  # when the last line was said (or the bar refreshed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def say(self, logger: logging.Logger, depth: int, text: str) -> None:
        logger.info("%s%s", "  " * depth, text)
        self.last = _clock()

    def tick(self) -> bool:
        """Say how far the innermost phase is when nothing was said for ``interval`` seconds (a bar: redraw
        it, its clock moving on); whether it did."""
        now = _clock()
        phases = list(self.phases)
        if not phases or now - self.last < self.interval:
            return False
        current = phases[-1]
        if current.bar is not None:
            current.bar.refresh()
        else:
            current.logger.info("%s%s", "  " * current.depth, current.status(now))
        self.last = now
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flowvae-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(max(self.last + self.interval - _clock(), _MIN_WAIT)):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - reporting progress must never end a run
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _bar(item: Phase, leave: bool):
    from tqdm.auto import tqdm

    return tqdm(total=item.total, desc=item.what, unit=f" {item.unit}" if item.unit else "it",
                unit_scale=item.total >= 10_000, dynamic_ncols=True, leave=leave)


@contextmanager
def phase(what: str, total: int | None = None, unit: str = "", *,
          logger: logging.Logger | None = None) -> Iterator[Phase]:
    """Run the block as a phase that says ``what`` it does (e.g. "generating 50000 events"), counting ``total``
    steps of ``unit`` when it has them (``advance`` the phase it yields), on ``logger`` (default: this module's).
    See the module's docstring for what is said when."""
    logger = logger or log
    reporter: _Reporter | None = getattr(_local, "reporter", None)
    outermost = reporter is None
    if reporter is None:
        reporter = _Reporter(_resolved(_current.mode), _current.interval)
    depth = len(reporter.phases)
    item = Phase(what, total, unit, logger, depth)
    speaks = reporter.mode != "none"
    if speaks:
        reporter.say(logger, depth, what)
        if reporter.mode == "bar" and total:
            item.bar = _bar(item, leave=outermost)
    reporter.phases.append(item)
    if outermost:
        _local.reporter = reporter
        if reporter.mode == "bar" or (speaks and logger.isEnabledFor(logging.INFO)):
            reporter.start()
    finished = False
    try:
        yield item
        finished = True
    finally:
        reporter.phases.pop()
        if item.bar is not None:
            item.bar.close()
        if outermost:
            reporter.close()
            _local.reporter = None
        seconds = _clock() - item.started
        if finished and speaks and (outermost or seconds >= reporter.interval):
            reporter.say(logger, depth, f"{what}: done in {seconds:.1f} s")


@contextmanager
def console(stream=None) -> Iterator[None]:
    """For a command that runs outside Hydra (score, generate, evaluate): flowvae's log lines at INFO and above
    (its phases, its warnings) on ``stream`` (default: stderr, which keeps stdout for the command's result) as
    ``[HH:MM:SS] message``, while the block runs."""
    logger = logging.getLogger("flowvae")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
