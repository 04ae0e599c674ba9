"""Files written whole or not at all, and users' paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowvae.files import replaced, resolve_path


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
