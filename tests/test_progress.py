"""flowvae.progress: every long phase says what it does, and while it runs, how far it is; never silent in a log."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import numpy as np
import pytest

from flowvae import progress
from flowvae.metrics.distances import fpd, kpd

LOGGER = "flowvae.test_progress"


@pytest.fixture
def log_lines(caplog):
    """The messages logged so far, at INFO, from any thread."""
    caplog.set_level(logging.INFO)
    return lambda: [record.getMessage() for record in caplog.records]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_phase_says_what_it_does_then_that_it_is_done(log_lines, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress, "_clock", clock)
    with progress.settings(mode="log"), progress.phase("computing things", logger=logging.getLogger(LOGGER)):
        clock.now += 2.5
    assert log_lines() == ["computing things", "computing things: done in 2.5 s"]


def test_the_periodic_line_counts_the_steps_once_the_interval_has_passed(log_lines, monkeypatch):
    """With a fake clock: nothing before the interval is over, then the innermost phase's count, share and time;
    the next line only an interval after the last one."""
    clock = FakeClock()
    monkeypatch.setattr(progress, "_clock", clock)
    with progress.settings(mode="log", interval=10), progress.phase("scoring") as outer:
        reporter = progress._local.reporter
        with progress.phase("FPD: 200 batches", 200, "batches") as step:
            step.advance(30)
            clock.now += 9.9
            assert not reporter.tick()
            clock.now += 0.1
            assert reporter.tick()
            assert not reporter.tick()  # just said
            step.advance(70)
            clock.now += 10
            assert reporter.tick()
        clock.now += 5
        assert not reporter.tick()  # FPD's done line was said 5 s ago
        clock.now += 5
        assert reporter.tick()
        assert outer.done == 0
    assert log_lines() == ["scoring", "  FPD: 200 batches",
                           "  FPD: 200 batches: 30/200 batches (15%), 10 s",
                           "  FPD: 200 batches: 100/200 batches (50%), 20 s",
                           "  FPD: 200 batches: done in 20.0 s",  # longer than the interval: said
                           "scoring: still working, 30 s",
                           "scoring: done in 30.0 s"]


def test_a_single_long_step_is_never_silent_for_an_interval(log_lines):
    """The periodic lines come from a thread of their own: one step that takes 0.5 s, interval 0.05 s."""
    with progress.settings(mode="log", interval=0.05), progress.phase("one long step", 1, "steps") as step:
        time.sleep(0.5)
        step.advance()
    lines = log_lines()
    assert lines[0] == "one long step" and lines[-1].startswith("one long step: done in ")
    periodic = lines[1:-1]
    assert len(periodic) >= 3 and all(re.fullmatch(r"one long step: 0/1 steps \(0%\), \d+ s", line)
                                      for line in periodic)
    assert not any(thread.name == "flowvae-progress" for thread in threading.enumerate())  # the thread has ended


def test_nothing_at_all_in_mode_none(log_lines, capsys):
    with progress.settings(mode="none", interval=0.01), progress.phase("quiet", 3, "steps") as step:
        time.sleep(0.1)
        step.advance(3)
        assert progress._local.reporter._thread is None
    assert log_lines() == [] and capsys.readouterr().err == ""


def test_a_bar_in_mode_bar(log_lines, capsys):
    with progress.settings(mode="bar"), progress.phase("counting", 4, "steps") as step:
        step.advance(4)
    assert "counting: 100%" in capsys.readouterr().err and log_lines()[0] == "counting"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_log_lines_elsewhere(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress._resolved("auto") == "log"
    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress._resolved("auto") == "bar" and progress._resolved("log") == "log"


def test_a_failed_phase_says_no_done_line_and_the_next_phase_starts_afresh(log_lines):
    with progress.settings(mode="log"):
        with pytest.raises(ValueError), progress.phase("outer"), progress.phase("inner"):
            raise ValueError("bad input")
        assert getattr(progress._local, "reporter", None) is None
        with progress.phase("again"):
            pass
    lines = log_lines()
    assert lines[:3] == ["outer", "  inner", "again"] and len(lines) == 4 and lines[3].startswith("again: done in ")


def test_settings_are_checked_and_restored():
    with pytest.raises(ValueError, match="one of auto, bar, log, none"), progress.settings(mode="loud"):
        pass
    with pytest.raises(ValueError, match="seconds > 0"), progress.settings(interval=0):
        pass
    with progress.settings(mode="none", interval=3):
        assert (progress._current.mode, progress._current.interval) == ("none", 3)
    assert (progress._current.mode, progress._current.interval) == ("auto", progress.INTERVAL)


def test_console_prints_flowvaes_lines_with_the_time_and_then_goes_away():
    stream = io.StringIO()
    logger = logging.getLogger("flowvae")
    level, handlers = logger.level, list(logger.handlers)
    with progress.console(stream), progress.settings(mode="log"), progress.phase("writing", logger=logging
                                                                                  .getLogger("flowvae.x")):
        logging.getLogger("flowvae.x").warning("a warning too")
    lines = stream.getvalue().splitlines()
    assert [re.sub(r"^\[\d\d:\d\d:\d\d\] ", "", line) for line in lines][:2] == ["writing", "a warning too"]
    assert len(lines) == 3 and re.fullmatch(r"\[\d\d:\d\d:\d\d\] writing: done in \d+\.\d s", lines[2])
    assert logger.level == level and logger.handlers == handlers


def test_progress_changes_no_number(log_lines):
    """FPD and KPD with a line every millisecond (a thread that keeps reading their counters) equal FPD and KPD
    with no progress at all, bit for bit."""
    rng = np.random.default_rng(0)
    real, gen = rng.normal(size=(300, 5)), rng.normal(0.1, 1.0, size=(300, 5))
    options = {"min_samples": 100, "max_samples": 300, "num_batches": 5, "seed": 3}
    with progress.settings(mode="none"):
        quiet = fpd(real, gen, **options), kpd(real, gen, batch_size=100, seed=3)
    with progress.settings(mode="log", interval=0.001):
        spoken = fpd(real, gen, **options), kpd(real, gen, batch_size=100, seed=3)
    assert spoken == quiet
    assert "FPD: 10 batch sizes from 100 to 300, 5 batches each" in log_lines()
    assert "KPD: 10 batches of 100" in log_lines()
