"""The results table: locked appends from many processes, run identity, skip lookups."""

from __future__ import annotations

import csv
import multiprocessing as mp

from omegaconf import OmegaConf

from flowvae.results import append_row, config_hash, has_ok_row, read_rows, write_row_file


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
        p.join(60)
        assert p.exitcode == 0
    with path.open(newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["worker", "i", "status", "text", "config_hash"]
    rows = lines[1:]
    assert len(rows) == 160 and all(len(r) == 5 and r[3] == "x" * 500 for r in rows)
    assert sorted((int(r[0]), int(r[1])) for r in rows) == [(w, i) for w in range(8) for i in range(20)]


def test_existing_header_is_kept(tmp_path):
    path = tmp_path / "r.csv"
    append_row(path, {"a": 1, "b": 2})
    append_row(path, {"b": 3, "a": 4, "c": 5})
    assert read_rows(path) == [{"a": "1", "b": "2"}, {"a": "4", "b": "3"}]


def test_config_hash_ignores_where_a_run_writes_but_not_what_it_computes():
    cfg = OmegaConf.create({"n_flows": 2, "seed": 0, "results_csv": "a.csv", "skip_existing": False,
                            "train": {"threads": 1, "lr": 0.001, "progress": "auto", "checkpoint_every": 1}})
    same = OmegaConf.merge(cfg, {"results_csv": "b.csv", "skip_existing": True,
                                 "train": {"threads": 4, "eval_every": 5}})
    other = OmegaConf.merge(cfg, {"train": {"lr": 0.01}})
    assert config_hash(cfg) == config_hash(same)
    assert config_hash(cfg) != config_hash(other)
    assert len(config_hash(cfg)) == 12


def test_zero_flows_of_any_type_is_one_run():
    plain = OmegaConf.create({"n_flows": 0, "flow": {"name": "none"}})
    iaf = OmegaConf.create({"n_flows": 0, "flow": {"name": "iaf", "hidden": 64}})
    assert config_hash(plain) == config_hash(iaf)
    assert config_hash(OmegaConf.merge(iaf, {"n_flows": 1})) != config_hash(OmegaConf.merge(plain, {"n_flows": 1}))


def test_has_ok_row_and_row_file(tmp_path):
    path = tmp_path / "r.csv"
    assert not has_ok_row(path, "abc")
    append_row(path, {"config_hash": "abc", "status": "failed"})
    assert not has_ok_row(path, "abc")
    append_row(path, {"config_hash": "abc", "status": "ok"})
    assert has_ok_row(path, "abc")
    write_row_file(tmp_path / "one.csv", {"x": 1.5, "y": "z"})
    assert read_rows(tmp_path / "one.csv") == [{"x": "1.5", "y": "z"}]
