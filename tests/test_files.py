"""Files written whole or not at all, and users' paths."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from flowvae.files import Lock, LockTimeout, locked, replaced, resolve_path


def test_replaced_swaps_in_the_new_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sample.npy"
    path.write_bytes(b"old")
    with replaced(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npy" and tmp != path
        np.save(tmp, np.arange(3))  # np.save would append .npy to a name without it
        assert path.read_bytes() == b"old"  # untouched until the block ends
    assert np.load(path).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["sample.npy"]


def test_replaced_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "status.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), replaced(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_resolve_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_path("~/a.npy") == tmp_path / "home" / "a.npy"
    assert resolve_path("a.npy", tmp_path) == tmp_path / "a.npy"
    assert resolve_path("/x/a.npy", tmp_path) == Path("/x/a.npy")
    monkeypatch.chdir(tmp_path)
    assert resolve_path("a.npy") == tmp_path / "a.npy"


def _count_under_the_lock(folder: str, times: int) -> None:
    """Read, pause, write back one more: two holders at once would lose an increment."""
    import time

    counter, lock_path = Path(folder) / "counter", Path(folder) / "locks" / "counter.lock"
    for _ in range(times):
        with locked(lock_path, remove_folder=True, poll=0.001):
            value = int(counter.read_text())
            time.sleep(0.0005)
            counter.write_text(str(value + 1))


def test_a_lock_whose_file_goes_with_each_release_still_admits_one_holder_at_a_time(tmp_path):
    """Four processes take turns 150 times each on a lock whose file (and folder) each holder removes: a waiter
    that locked a removed file must not count as a holder, or increments are lost. Nothing is left after."""
    (tmp_path / "counter").write_text("0")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count_under_the_lock, args=(str(tmp_path), 150)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)  # a timeout for a hang only
        assert proc.exitcode == 0
    assert (tmp_path / "counter").read_text() == "600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter"]


def test_a_lock_won_on_a_file_its_holder_removed_is_not_held(tmp_path, monkeypatch):
    """The race of removing a lock file, step by step: a waiter opened the file, its holder removed it and let
    go, a third process made a new one and holds it; the waiter's flock on the removed file succeeds, and must
    not count: it tries the file at the path, which the third holds."""
    path = tmp_path / "x.lock"
    holder = Lock(path)
    holder.acquire(timeout=0)
    opened_before = os.open(path, os.O_RDONLY)  # the waiter's open file
    holder.release()
    third = Lock(path)
    third.acquire(timeout=0)
    opens = iter([opened_before])
    real_open = Lock._open
    monkeypatch.setattr(Lock, "_open", lambda self: next(opens, None) or real_open(self))
    with pytest.raises(LockTimeout):
        Lock(path).acquire(timeout=0)
    third.release()
    assert not path.exists()


def test_a_held_lock_times_out_waits_checking_and_is_there_only_while_held(tmp_path):
    path = tmp_path / "run.lock"
    holder = Lock(path)
    assert holder.acquire(timeout=0) is False and path.exists()
    with pytest.raises(LockTimeout):
        Lock(path).acquire(timeout=0)
    with pytest.raises(LockTimeout):
        Lock(path).acquire(timeout=0.2)
    checks = []

    def check():
        checks.append(1)
        if len(checks) == 3:
            threading.Thread(target=holder.release).start()  # let go while the other waits on the open file

    waiter = Lock(path)
    assert waiter.acquire(poll=0.01, check=check) is True and len(checks) >= 3
    assert waiter.is_locked and path.exists() and not holder.is_locked
    waiter.release()
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt), locked(path, timeout=0):  # a block that raises lets go too
        raise KeyboardInterrupt
    assert not path.exists() and Lock(path).acquire(timeout=0) is False
