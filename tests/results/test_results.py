"""The results table: locked appends from many processes, widening, checks before work, skip lookups."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os

import pytest

from flowvae.results.store import (
    ResultsError,
    RunIndex,
    append_row,
    check_writable,
    has_ok_row,
    read_rows,
    write_row_file,
)


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_row(path, {"worker": worker, "i": i, "status": "ok", "text": "x" * 500, "config_hash": f"{worker}"})


def test_concurrent_appends_keep_every_row_whole(tmp_path):
    path = tmp_path / "results.csv"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 20)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)  # 8 spawned interpreters on a busy machine: a timeout for a hang only
        assert p.exitcode == 0
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["worker", "i", "status", "text", "config_hash"]
    rows = lines[1:]
    assert len(rows) == 160 and all(len(r) == 5 and r[3] == "x" * 500 for r in rows)
    assert sorted((int(r[0]), int(r[1])) for r in rows) == [(w, i) for w in range(8) for i in range(20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no lock file left beside it


def test_a_row_with_new_columns_widens_the_table_and_keeps_every_value(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, {"a": 1, "b": 2})
    append_row(path, {"b": 3, "a": 4, "c": 5})
    append_row(path, {"a": 6, "b": 7})
    assert read_rows(path) == [{"a": "1", "b": "2", "c": ""}, {"a": "4", "b": "3", "c": "5"},
                               {"a": "6", "b": "7", "c": ""}]
    assert path.read_text().splitlines()[0] == "a,b,c"


def test_check_writable_refuses_what_cannot_take_a_row(tmp_path):
    check_writable(tmp_path / "new" / "results.csv")  # a folder that can be made
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResultsError, match="cannot make the folder"):
        check_writable(tmp_path / "file" / "results.csv")
    with pytest.raises(ResultsError, match="is a directory"):
        check_writable(tmp_path)
    with pytest.raises(ResultsError, match="cannot create the lock file"):
        check_writable("/proc/forbidden.csv")
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(ResultsError, match="not a flowvae results table"):
        check_writable(other)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(ResultsError):
        check_writable(folder / "results.csv")


def test_a_held_lock_times_out_with_a_message_instead_of_hanging(tmp_path):
    from filelock import FileLock

    path = tmp_path / "r.csv"
    ctx = mp.get_context("spawn")
    with FileLock(str(path) + ".lock"):  # held by this process; another process must give up
        proc = ctx.Process(target=_append_with_timeout, args=(str(path),))
        proc.start()
        proc.join(300)
    assert proc.exitcode == 7
    assert not path.exists()


def _append_with_timeout(path: str) -> None:
    try:
        append_row(path, {"a": 1}, timeout=0.2)
    except ResultsError as err:
        assert "could not take the lock" in str(err)
        raise SystemExit(7) from None


def test_has_ok_row_and_row_file(tmp_path):
    path = tmp_path / "r.csv"
    assert not has_ok_row(path, "abc")
    append_row(path, {"config_hash": "abc", "status": "failed"})
    assert not has_ok_row(path, "abc")
    append_row(path, {"config_hash": "abc", "status": "ok"})
    assert has_ok_row(path, "abc")
    write_row_file(tmp_path / "one.csv", {"x": 1.5, "y": "z"})
    assert read_rows(tmp_path / "one.csv") == [{"x": "1.5", "y": "z"}]


def test_check_writable_creates_nothing(tmp_path):
    """A run refused later (a bad data path) must not leave a folder or a lock file behind the check."""
    check_writable(tmp_path / "new" / "deeper" / "results.csv")
    append_row(tmp_path / "table.csv", {"flow": "planar", "n_flows": 1, "status": "ok", "config_hash": "abc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # the append's lock went with it
    check_writable(tmp_path / "table.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_file_that_is_not_a_table_is_refused_by_name_and_nothing_is_put_beside_it(tmp_path):
    import numpy as np

    data = tmp_path / "wrongkey.npz"
    np.savez(data, particle_features=np.random.default_rng(0).normal(size=(10, 3, 5)))
    before = data.read_bytes()
    with pytest.raises(ResultsError) as refused:
        check_writable(data)
    message = str(refused.value)
    assert str(data) in message and "not a flowvae results table" in message and "another file name" in message
    assert "codec" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrongkey.npz"] and data.read_bytes() == before


def test_a_second_claim_of_one_config_waits_for_the_first(tmp_path):
    """Two runs of one config never work at once: the second claim waits (checking for a stop request) until the
    first is released; another config's claim does not wait."""
    import threading

    index = RunIndex(tmp_path / "results.csv")
    held, release = threading.Event(), threading.Event()

    def first():
        with index.claim("abc"):
            held.set()
            release.wait(300)  # released by the second claim's checks; the timeout only ends a hung test

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(300)
    with index.claim("other") as waited:
        assert not waited
    checks = []

    def check():
        checks.append(1)
        if len(checks) == 2:
            release.set()

    with index.claim("abc", check, poll=0.1) as waited:
        assert waited and release.is_set() and len(checks) >= 2  # it went on only once the first let go
    thread.join(300)
    with pytest.raises(KeyboardInterrupt), index.claim("abc"):  # a claim is released when its block raises
        raise KeyboardInterrupt
    with index.claim("abc") as waited:
        assert not waited


def test_the_index_names_an_unfinished_run_until_its_row_is_in(tmp_path):
    index = RunIndex(tmp_path / "results.csv")
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    assert index.unfinished("abc") is None
    with index.claim("abc"):
        index.started("abc", run_dir)
    assert index.unfinished("abc") == run_dir and index.unfinished("other") is None
    index.finished("abc")
    assert index.unfinished("abc") is None
    index.started("abc", run_dir)
    run_dir.rmdir()  # a directory the user removed is no run to resume
    assert index.unfinished("abc") is None


def test_the_index_leaves_nothing_once_every_run_of_it_has_its_row(tmp_path):
    """A claim's lock file goes when the claim ends, the folder with its last file; an unfinished run's entry
    stays (a rerun resumes from it) until its row is in."""
    index = RunIndex(tmp_path / "results.csv")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with index.claim("abc"):
        assert (tmp_path / "results.csv.runs" / "abc.lock").exists()
        index.started("abc", run_dir)
    assert sorted(p.name for p in (tmp_path / "results.csv.runs").iterdir()) == ["abc.json"]  # interrupted
    with index.claim("abc"), index.claim("other"):
        index.finished("abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with index.claim("abc"):  # the folder is made again
        assert index.unfinished("abc") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
