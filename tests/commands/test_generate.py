"""`flowvae generate`: a trained run's model writes N events in the data's units and layout, block by block."""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from flowvae import stopping
from flowvae.commands.generate import NPZ_MASK, main, write_events
from flowvae.commands.score import main as score_main
from flowvae.data.events import file_array, split_mask
from flowvae.data.transforms import FRACTION_MARGIN
from flowvae.data.units import data_units, model_input
from flowvae.metrics import feature_moments
from flowvae.models import sampling
from flowvae.models.sampling import generate_events
from flowvae.run.rebuild import load_run
from tests.conftest import TINY, run_flowvae

DATA = Path(__file__).resolve().parents[1] / "data"
GLUON30 = DATA / "gluon_30p_slice.npz"
JETNET = ["--key", "particle_features", "--layout", "particles_first", "--mask-feature", "3", "--jet-kinematics",
          "0,1,2"]
JET_NAMES = ["etarel", "phirel", "ptrel", "mask"]  # data=jetnet's data.feature_names, the file's features
# The toy in other units than the model's: standardized, with very different means and spreads per feature.
GAUSS = [*TINY, "data.mu=[50,-3,0.2]", "data.sigma=[10,0.1,1]", "data.standardize=true", "flow=planar",
         "n_flows=2"]
# 320 training, 80 held-out jets of 30 particles; posterior source, so generation cycles the held-out jets.
JETS = ["data=jetnet", "model.hidden=[32]", "model.latent_dim=4", "train.epochs=2", "train.batch_size=50",
        "eval.n_samples=300", "eval.bins=20", "eval.source=posterior", "train.threads=1", "train.progress=log",
        "flow=planar", "n_flows=1"]


@pytest.fixture(autouse=True, scope="module")
def _torch_state():
    """generate sets torch's threads and deterministic mode for this process: restore them for other tests."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.set_flush_denormal(False)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_stop_request():
    yield
    stopping.reset()


def _train(cwd: Path, run_dir: str, *overrides: str) -> Path:
    out = run_flowvae(["train", *overrides, f"hydra.run.dir={run_dir}", "results_csv=results.csv"], cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three tiny trained runs: the standardized toy (prior), and the same jets in JetNet's particles-first file
    and, with a relative data path, in a features-first copy (posterior)."""
    root = tmp_path_factory.mktemp("runs")
    features_first = np.load(GLUON30)["particle_features"].transpose(0, 2, 1)
    np.savez(root / "jets_ff.npz", particle_features=features_first)
    return {
        "gauss": _train(root, "gauss", *GAUSS),
        "jets_pf": _train(root, "jets_pf", *JETS, f"data.path={GLUON30}"),
        "jets_ff": _train(root, "jets_ff", *JETS, "data.path=jets_ff.npz", "data.layout=features_first"),
    }


@pytest.fixture
def generate(capsys):
    def call(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def _ok(generate, *args) -> str:
    code, out, err = generate(*args, "--threads", "1")
    assert code == 0, err
    return out


def _row(run: Path) -> pd.Series:
    return pd.read_csv(run / "result.csv").iloc[0]


# --- the run's own events, shapes, layout, units -------------------------------------------------------------


@pytest.mark.parametrize("name, n", [("gauss", 200), ("jets_pf", 300), ("jets_ff", 300)])
def test_the_runs_own_settings_reproduce_its_generated_sample_bit_for_bit(runs, generate, tmp_path, name, n):
    out = tmp_path / "gen.npy"
    line = _ok(generate, runs[name], "--n", n, "--out", out)
    assert f"{n} events" in line and str(out) in line and len(line.strip().splitlines()) == 1
    sample = np.load(runs[name] / "generated_sample.npy")
    generated = np.load(out)
    assert generated.dtype == np.float32 and generated.shape[0] == n
    assert np.array_equal(generated[:len(sample)], sample)
    # the moments of all N events are the run's own gen_mean / gen_std columns
    events = generated.transpose(0, 2, 1) if name == "jets_pf" else generated
    events, mask = split_mask(events.astype(np.float64), 3 if name.startswith("jets") else None)
    mean, std = feature_moments(events, mask)
    row = _row(runs[name])
    for i in range(len(mean)):
        assert mean[i] == pytest.approx(row[f"gen_mean_{i}"], rel=1e-9, abs=1e-12)
        assert std[i] == pytest.approx(row[f"gen_std_{i}"], rel=1e-9, abs=1e-12)


def test_a_npy_is_what_numpy_save_writes(runs, generate, tmp_path):
    _ok(generate, runs["jets_pf"], "--n", 70, "--out", tmp_path / "gen.npy")
    np.save(tmp_path / "saved.npy", np.load(tmp_path / "gen.npy"))
    assert filecmp.cmp(tmp_path / "gen.npy", tmp_path / "saved.npy", shallow=False)


def test_the_toy_comes_back_in_its_own_units(runs, generate, tmp_path):
    _ok(generate, runs["gauss"], "--n", 3000, "--out", tmp_path / "gen.npy", "--seed", 5)
    generated = np.load(tmp_path / "gen.npy")
    assert generated.shape == (3000, 3, 10)  # (N, F, P): the toy's layout
    mean, std = feature_moments(generated)
    # data.mu=[50,-3,0.2], data.sigma=[10,0.1,1]: the model learns in standardized units, the file is in the data's
    sigma = np.array([10, 0.1, 1])
    assert (np.abs(mean - [50, -3, 0.2]) < 0.5 * sigma).all(), mean
    assert (np.abs(std / sigma - 1) < 0.5).all(), std


def test_jets_in_both_layouts_with_the_mask_at_index_3_and_ptrel_in_its_domain(runs, generate, tmp_path):
    n = 2500  # more than one block of GENERATE_BATCH
    _ok(generate, runs["jets_pf"], "--n", n, "--out", tmp_path / "pf.npz")
    _ok(generate, runs["jets_ff"], "--n", n, "--out", tmp_path / "ff.npz")
    with np.load(tmp_path / "pf.npz") as pf, np.load(tmp_path / "ff.npz") as ff:
        # the data's array name, and its feature names (data.feature_names of data=jetnet) JetNet-style beside it
        assert sorted(pf.files) == sorted(ff.files) == [NPZ_MASK, "particle_feature_names", "particle_features"]
        assert list(pf["particle_feature_names"]) == list(ff["particle_feature_names"]) == JET_NAMES
        events, mask = pf["particle_features"], pf[NPZ_MASK]
        assert events.shape == (n, 30, 4) and events.dtype == np.float32  # JetNet's (N, P, F)
        assert ff["particle_features"].shape == (n, 4, 30)
        # the same data in the other layout trains the same model: the same events, transposed
        assert np.array_equal(ff["particle_features"], events.transpose(0, 2, 1))
        assert np.array_equal(ff[NPZ_MASK], mask)
    assert mask.shape == (n, 30) and mask.dtype == bool
    assert np.array_equal(events[:, :, 3], mask.astype(np.float32))  # the mask feature, 0/1, at index 3
    assert not np.diff(mask.astype(np.int8), axis=1).clip(min=0).any()  # real particles first, padding last
    assert (events[~mask] == 0).all()  # padded slots hold zeros
    assert mask.sum(axis=1).mean() > 1  # multiplicities drawn from the run's categorical, 0 to 30
    ptrel = events[:, :, 2][mask]  # logit-transformed: in (0, 1) by construction
    assert ptrel.min() > 0 and ptrel.max() < 1


def test_a_fraction_runs_jets_have_positive_shares_adding_up_below_the_training_jets_largest_sum(generate, tmp_path):
    run = _train(tmp_path, "frac", *JETS, f"data.path={GLUON30}", "data.transforms=[none,none,fraction,none]",
                 "eval.source=prior")
    _ok(generate, run, "--n", 2500, "--out", tmp_path / "frac.npz")
    with np.load(tmp_path / "frac.npz") as generated, np.load(GLUON30) as data:
        events, mask = generated["particle_features"], generated[NPZ_MASK]
        real = data["particle_features"]
    sums = np.where(mask, events[:, :, 2], 0).sum(axis=1)
    largest = np.where(real[:, :, 3] > 0, real[:, :, 2], 0).sum(axis=1).max()  # over every jet of the file
    assert (events[:, :, 2][mask] > 0).all()
    assert sums.max() <= largest * (1 + FRACTION_MARGIN) * (1 + 1e-6)


def test_a_training_run_logs_what_it_does_after_its_last_epoch(runs):
    """Generating, scoring (each of its phases) and writing each say what they do in the run's log."""
    lines = [line.split(" - ", 1)[1] for line in (runs["jets_pf"] / "train.log").read_text().splitlines()]
    after = lines[next(i for i, line in enumerate(lines) if line.startswith("epoch 2/2")) + 1:]
    said = [line for line in after if not line.startswith("posterior generation")]
    expected = ["generating 300 events (posterior, sample)",
                "scoring 300 generated against 80 reference events (protocol scaled)",
                "  per-feature KL, W1, JS and moments",
                "  W1 per particle feature: 5 batches of 10000 jets",
                "  noise floors of kl_sum, w1_sum and js_sum: two halves of the reference",
                "  jet-level metrics (scaled): generated against the reference",
                "    W1 of jet mass and multiplicity: 5 batches of 50000 jets",
                "    EFPs of 300 generated jets (up to 30 particles)",
                "    EFPs of 80 reference jets (up to 30 particles)",
                "    FPD: 10 batch sizes from 32 to 80, 20 batches each",
                "    KPD: 10 batches of 40",
                "  jet-level floors (scaled): two halves of the reference"]
    started = [line for line in said if ": done in " not in line]
    assert started[:len(expected)] == expected
    assert "writing histograms.png and generated_sample.npy" in started
    done = [line.split(": done in ")[0] for line in said if ": done in " in line]
    assert done[0] == expected[0] and expected[1] in done and "writing histograms.png and generated_sample.npy" in done


def test_an_npz_carries_the_runs_feature_names_and_score_prints_them(runs, generate, tmp_path, capsys):
    """Two generated .npz files scored against each other name their features by the run's data.feature_names
    (data=jetnet: etarel, phirel, ptrel, mask), with or without --key: the events are the one array beside the
    mask and the names."""
    for seed, name in ((0, "a.npz"), (1, "b.npz")):
        _ok(generate, runs["jets_pf"], "--n", 300, "--seed", seed, "--out", tmp_path / name)
    flags = ["--layout", "particles_first", "--mask-feature", "3", "--jet-kinematics", "0,1,2", "--bins", "20",
             "--progress", "none"]
    for key in ([], ["--key", "particle_features"]):
        assert score_main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), *key, *flags]) == 0
        out = capsys.readouterr().out
        assert "300 vs 300 events, features etarel, phirel, ptrel\n" in out
    # a run whose features have no names stores none (no "feature 0", which would clash with a file's names)
    _ok(generate, runs["gauss"], "--n", 50, "--out", tmp_path / "toy.npz")
    with np.load(tmp_path / "toy.npz") as toy:
        assert toy.files == ["events"]


def test_names_beside_events_without_an_array_name_are_feature_names(tmp_path, capsys):
    events = np.arange(240, dtype=np.float32).reshape(40, 2, 3) % 7
    blocks = iter([(events[:20], None), (events[20:], None)])
    write_events(tmp_path / "x.npz", blocks, (40, 2, 3), names=["pt", "eta"])
    with np.load(tmp_path / "x.npz") as stored:
        assert sorted(stored.files) == ["events", "feature_names"]
        assert np.array_equal(stored["events"], events) and list(stored["feature_names"]) == ["pt", "eta"]
    assert score_main([str(tmp_path / "x.npz")] * 2 + ["--bins", "5", "--progress", "none"]) == 0
    assert "features pt, eta\n" in capsys.readouterr().out


def test_score_reads_the_files(runs, generate, tmp_path, capsys):
    _ok(generate, runs["jets_pf"], "--n", 500, "--out", tmp_path / "gen.npz")
    assert score_main([str(tmp_path / "gen.npz"), str(GLUON30), *JETNET, "--bins", "20"]) == 0
    assert "w1m" in capsys.readouterr().out
    _ok(generate, runs["jets_ff"], "--n", 500, "--out", tmp_path / "gen.npy")
    assert score_main([str(tmp_path / "gen.npy"), str(runs["jets_ff"].parent / "jets_ff.npz"), "--key",
                       "particle_features", "--mask-feature", "3", "--jet-kinematics", "0,1,2", "--bins", "20"]) == 0
    _ok(generate, runs["gauss"], "--n", 300, "--out", tmp_path / "toy.npy")
    assert score_main([str(tmp_path / "toy.npy"), str(runs["gauss"] / "generated_sample.npy"), "--bins", "20"]) == 0


# --- the held-out events: the reference a run was scored against --------------------------------------------


def test_the_held_out_events_are_the_files_own_and_score_the_run_to_its_row(runs, generate, tmp_path):
    run = runs["jets_pf"]
    _ok(generate, run, "--n", 300, "--out", tmp_path / "gen.npz")  # the run's own generated events (eval.n_samples)
    line = _ok(generate, run, "--source", "heldout", "--out", tmp_path / "held_out.npz")
    assert "80 of the run's 80 held-out events (80x30x4, particles_first, the mask at feature 3" in line
    original = np.load(GLUON30)["particle_features"]
    with np.load(tmp_path / "held_out.npz") as held_out:
        assert sorted(held_out.files) == [NPZ_MASK, "particle_feature_names", "particle_features"]
        assert list(held_out["particle_feature_names"]) == JET_NAMES
        events, mask = held_out["particle_features"], held_out[NPZ_MASK]
    # 20% of the file's 400 jets, each one of the file's own jets, in its units and layout, mask at index 3
    assert events.shape == (80, 30, 4) and events.dtype == np.float32 and mask.shape == (80, 30)
    file_jets = {jet.astype(np.float32).tobytes() for jet in original}
    assert len(original) == 400 and len({jet.tobytes() for jet in events}) == 80
    assert all(jet.tobytes() in file_jets for jet in events)
    assert np.array_equal(events[:, :, 3], mask.astype(np.float32))
    # scored with the data's flags, the run's generated events against them give the run's row
    assert score_main([str(tmp_path / "gen.npz"), str(tmp_path / "held_out.npz"), *JETNET, "--bins", "20", "--csv",
                       str(tmp_path / "scores.csv")]) == 0
    scored, trained = pd.read_csv(tmp_path / "scores.csv").iloc[0], _row(run)
    columns = [c for c in scored.index if c.startswith(("kl_", "w1", "js_", "gen_", "input_", "noise", "fpd", "kpd"))]
    assert len(columns) > 30
    for column in columns:
        assert scored[column] == pytest.approx(trained[column], rel=1e-9, abs=1e-12), column


def test_the_toys_held_out_events_without_a_checkpoint_all_or_the_first_n(runs, generate, tmp_path):
    run = _copy(runs["gauss"], tmp_path, checkpoint=False)  # the data needs no model
    _ok(generate, run, "--source", "heldout", "--out", tmp_path / "all.npy")
    _ok(generate, run, "--source", "heldout", "--out", tmp_path / "first.npy", "--n", 50)
    events = np.load(tmp_path / "all.npy")
    assert events.shape == (200, 3, 10) and np.array_equal(np.load(tmp_path / "first.npy"), events[:50])
    row = _row(runs["gauss"])  # the row's input moments are the held-out events'
    for i in range(3):
        assert events[:, i].astype(np.float64).mean() == pytest.approx(row[f"input_mean_{i}"], rel=1e-9)
    code, _, err = generate(run, "--source", "heldout", "--out", tmp_path / "more.npy", "--n", 201)
    assert code == 2 and "--n 201: the run held out 200 events" in err
    code, _, err = generate(run, "--source", "heldout", "--out", tmp_path / "seeded.npy", "--seed", 3)
    assert code == 2 and "--seed 3: --source heldout writes the run's own held-out events" in err
    assert not (tmp_path / "more.npy").exists() and not (tmp_path / "seeded.npy").exists()


def test_posterior_events_beyond_the_held_out_ones_are_said_to_reuse_them(runs, generate, tmp_path, caplog):
    assert "300 events from 80 held-out events, each encoded about 3.75 times" in (
        runs["jets_pf"] / "train.log").read_text()  # the training run's own scoring (eval.n_samples=300)
    caplog.clear()
    _ok(generate, runs["jets_pf"], "--n", 80, "--out", tmp_path / "gen.npy", "--source", "posterior")
    assert "posterior generation" not in caplog.text  # one event per held-out jet: nothing to say
    _ok(generate, runs["jets_pf"], "--n", 200, "--out", tmp_path / "gen.npy", "--source", "posterior")
    assert ("posterior generation: 200 events from 80 held-out events, each encoded about 2.5 times (event i from "
            "held-out event i mod 80): they are draws from 80 posteriors, not 200 independent events") in caplog.text


# --- determinism and blocks ----------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_events(runs, generate, tmp_path):
    run = runs["jets_pf"]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        _ok(generate, run, "--n", 400, "--out", tmp_path / f"{name}.npz", "--seed", seed, "--source", "prior")
    assert filecmp.cmp(tmp_path / "a.npz", tmp_path / "b.npz", shallow=False)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "c.npz") as c:
        assert not np.array_equal(a["particle_features"], c["particle_features"])
    _ok(generate, run, "--n", 400, "--out", tmp_path / "mean.npz", "--seed", 3, "--source", "prior",
        "--decode", "mean")
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "mean.npz") as mean:
        assert not np.array_equal(a["particle_features"], mean["particle_features"])


@pytest.mark.parametrize("name, source, decode", [("gauss", "prior", "sample"), ("gauss", "posterior", "mean"),
                                                  ("jets_pf", "posterior", "sample"), ("jets_pf", "prior", "mean")])
def test_many_blocks_give_the_events_of_one_in_memory_pass(runs, generate, tmp_path, monkeypatch, name, source,
                                                           decode):
    monkeypatch.setattr(sampling, "GENERATE_BATCH", 64)
    n = 300  # four full blocks and a partial one; the posterior cycles the 80 (jets) or 200 (toy) held-out events
    _ok(generate, runs[name], "--n", n, "--out", tmp_path / "gen.npy", "--source", source, "--decode", decode,
        "--seed", 7)
    # the reference: the run's own all-at-once generation, mapped back and laid out as a run does it
    run = load_run(runs[name], "cpu")
    events = run.events
    test_x = model_input(run.feature_map.forward(events.test, events.test_mask), "cpu", events.test_mask)
    cfg_eval = SimpleNamespace(n_samples=n, source=source, decode=decode)
    values, mask = generate_events(run.model, cfg_eval, test_x, 7, events.test.shape[1:])
    values = data_units(run.feature_map, values, mask, events.kinematics)
    expected = file_array(values, None if mask is None else mask.astype(values.dtype), run.cfg.data.mask_feature,
                          run.layout)
    assert np.array_equal(np.load(tmp_path / "gen.npy"), expected)
    # whole blocks of a larger N are the events of a smaller N
    _ok(generate, runs[name], "--n", 128, "--out", tmp_path / "two_blocks.npy", "--source", source, "--decode",
        decode, "--seed", 7)
    assert np.array_equal(np.load(tmp_path / "two_blocks.npy"), expected[:128])


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_blocks_are_written_as_they_come_never_held(tmp_path, suffix):
    written: list[int] = []
    produced = 0

    def blocks():
        nonlocal produced
        for i in range(20):
            assert len(written) == produced  # the previous block is in the file before the next is made
            produced += 1
            events = np.full((7, 2, 3), i, dtype=np.float32)
            yield events, np.arange(3)[None, :].repeat(7, 0) < i % 4

    out = tmp_path / f"out{suffix}"
    write_events(out, blocks(), (140, 2, 3), (140, 3), on_block=written.append)
    assert written == [7] * 20
    loaded = np.load(out)
    events = loaded if suffix == ".npy" else loaded["events"]
    assert events.shape == (140, 2, 3) and (events[::7, 0, 0] == np.arange(20)).all()
    if suffix == ".npz":
        assert loaded["mask"].shape == (140, 3) and loaded["mask"][7 * 3].tolist() == [True, True, True]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary or spool left behind


# --- the command ---------------------------------------------------------------------------------------------


def test_progress_bar_only_when_asked_or_on_a_terminal_else_log_lines(runs, generate, tmp_path):
    code, out, err = generate(runs["gauss"], "--n", 50, "--out", tmp_path / "a.npy", "--threads", "1")
    # stderr is not a terminal here: log lines, no bar; stdout keeps the one summary line
    lines = [line.split("] ", 1)[1] for line in err.splitlines()]
    assert code == 0 and lines == ["generating 50 events (prior, sample, seed 0) into a.npy",
                                   lines[1]] and lines[1].startswith("generating 50 events (prior, sample, seed 0) "
                                                                     "into a.npy: done in ")
    assert "%|" not in err and out.count("\n") == 1
    code, out, err = generate(runs["gauss"], "--n", 50, "--out", tmp_path / "b.npy", "--threads", "1",
                              "--progress", "bar")
    assert code == 0 and "generating" in err and "100%" in err
    code, out, err = generate(runs["gauss"], "--n", 50, "--out", tmp_path / "c.npy", "--threads", "1",
                              "--progress", "none")
    assert code == 0 and err == ""  # asked for nothing
    code, out, err = generate(runs["gauss"], "--source", "heldout", "--n", 50, "--out", tmp_path / "d.npy")
    assert code == 0 and "writing 50 held-out events into d.npy" in err


def test_a_long_generation_says_how_far_it_is_at_least_every_interval(runs, generate, tmp_path, monkeypatch):
    """Log lines while the events are written, never only at the end: with a 0.05 s interval and blocks that
    take 0.1 s each, the periodic lines count the blocks done."""
    from flowvae import progress
    from flowvae.commands import generate as generate_module

    blocks = generate_module.held_out_blocks

    def slow_blocks(cfg, events, n):  # four blocks of 50 of the run's 200 held-out events, 0.1 s each
        for block in blocks(cfg, events, n, block=50):
            time.sleep(0.1)
            yield block

    monkeypatch.setattr(generate_module, "held_out_blocks", slow_blocks)
    monkeypatch.setattr(progress._current, "interval", 0.05)
    code, out, err = generate(runs["gauss"], "--source", "heldout", "--out", tmp_path / "h.npy")
    assert code == 0, err
    periodic = re.findall(r"writing 200 held-out events into h\.npy: (\d+)/200 events \(\d+%\), \d+ s", err)
    assert len(periodic) >= 3 and sorted(map(int, periodic)) == list(map(int, periodic))  # counts that grow
    assert {"50", "100", "150"} & set(periodic)  # what was done so far, said while the rest was still coming
    assert err.splitlines()[-1].split("] ", 1)[1].startswith("writing 200 held-out events into h.npy: done in ")


def test_the_console_command_writes_the_file_from_anywhere(runs, tmp_path):
    """A relative data path (the features-first run's) is found from where the run was launched."""
    out = subprocess.run([sys.executable, "-m", "flowvae.commands.generate", str(runs["jets_ff"]), "--n", "1e3",
                          "--out", "gen.npz"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # stderr (not a terminal): what it does, and the word that 1000 posterior events come from 80 held-out jets
    lines = [line.split("] ", 1)[1] for line in out.stderr.splitlines()]
    assert lines[:2] == ["generating 1000 events (posterior, sample, seed 0) into gen.npz",
                         "posterior generation: 1000 events from 80 held-out events, each encoded about 12.5 times "
                         "(event i from held-out event i mod 80): they are draws from 80 posteriors, not 1000 "
                         "independent events"]
    assert len(lines) == 3 and lines[2].startswith("generating 1000 events (posterior, sample, seed 0) into gen.npz: "
                                                   "done in ")
    assert "1000 events (1000x4x30, features_first, the mask at feature 3" in out.stdout
    assert np.load(tmp_path / "gen.npz")["particle_features"].shape == (1000, 4, 30)


def test_an_interrupted_command_leaves_no_file(runs, generate, tmp_path, monkeypatch):
    monkeypatch.setattr(stopping, "_received", "SIGTERM")
    code, out, err = generate(runs["gauss"], "--n", 5000, "--out", tmp_path / "gen.npz", "--threads", "1")
    assert code == 3 and "SIGTERM" in err and "no file was written" in err
    assert list(tmp_path.iterdir()) == []


def _copy(run: Path, where: Path, *, checkpoint=True) -> Path:
    copy = where / run.name
    shutil.copytree(run, copy, ignore=None if checkpoint else shutil.ignore_patterns("checkpoint.pt"))
    return copy


def test_an_unfinished_run_is_refused_unless_allowed(runs, generate, tmp_path):
    copy = _copy(runs["gauss"], tmp_path)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["epoch"] = 1  # of train.epochs=2
    torch.save(state, copy / "checkpoint.pt")
    code, _, err = generate(copy, "--n", 10, "--out", tmp_path / "gen.npy")
    assert code == 2 and "after epoch 1 of 2" in err and "--allow-unfinished" in err
    assert len(err.strip().splitlines()) == 1
    _ok(generate, copy, "--n", 10, "--out", tmp_path / "gen.npy", "--allow-unfinished")
    assert "epoch 1)" in _ok(generate, copy, "--n", 10, "--out", tmp_path / "gen.npy", "--allow-unfinished")


def _bad_cases(runs: dict[str, Path], tmp_path: Path) -> dict[str, tuple[list, str]]:
    run = runs["gauss"]
    no_checkpoint = _copy(runs["gauss"], tmp_path / "nockpt", checkpoint=False)
    edited = _copy(runs["gauss"], tmp_path / "edited")
    config = yaml.safe_load((edited / ".hydra" / "config.yaml").read_text())
    config["seed"] = 1
    (edited / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    moved = _copy(runs["jets_ff"], tmp_path / "moved")  # its relative data path, launched from an empty directory
    hydra = yaml.safe_load((moved / ".hydra" / "hydra.yaml").read_text())
    hydra["hydra"]["runtime"]["cwd"] = str(tmp_path)
    (moved / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (tmp_path / "empty").mkdir()
    out = ["--out", tmp_path / "gen.npy"]
    return {
        "no such run": ([tmp_path / "nothing", "--n", 5, *out], "no such run directory"),
        "not a run": ([tmp_path / "empty", "--n", 5, *out], "no .hydra/config.yaml"),
        "a sweep": ([run.parent, "--n", 5, *out], "sweep directory"),
        "no checkpoint": ([no_checkpoint, "--n", 5, *out], "no checkpoint.pt"),
        "edited config": ([edited, "--n", 5, *out], "another config"),
        "data gone": ([moved, "--n", 5, *out], "the run's data cannot be loaded again"),
        "n zero": ([run, "--n", 0, *out], "at least 1 event"),
        "n text": ([run, "--n", "many", *out], "invalid count"),
        "n fraction": ([run, "--n", "2.5", *out], "whole number"),
        "no n": ([run, *out], "--n"),
        "source": ([run, "--n", 5, "--source", "data", *out], "--source"),
        "decode": ([run, "--n", 5, "--decode", "median", *out], "--decode"),
        "suffix": ([run, "--n", 5, "--out", tmp_path / "gen.csv"], "a .npy or .npz file name"),
        "no out dir": ([run, "--n", 5, "--out", tmp_path / "no" / "gen.npy"], "does not exist"),
        "out is a dir": ([run, "--n", 5, "--out", tmp_path / "empty.npy"], "is a directory"),
        "unwritable": ([run, "--n", 5, "--out", "/proc/gen.npy"], "cannot write in /proc"),
        "threads": ([run, "--n", 5, "--threads", "-1", *out], "thread count"),
        "cuda": ([run, "--n", 5, "--device", "cuda", *out], "--device cuda"),
    }


CASES = ["no such run", "not a run", "a sweep", "no checkpoint", "edited config", "data gone", "n zero", "n text",
         "n fraction", "no n", "source", "decode", "suffix", "no out dir", "out is a dir", "unwritable", "threads",
         "cuda"]


@pytest.fixture(scope="module")
def bad_cases(runs, tmp_path_factory):
    where = tmp_path_factory.mktemp("bad")
    (where / "empty.npy").mkdir()
    return _bad_cases(runs, where)


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_and_exit_2(bad_cases, generate, case):
    args, message = bad_cases[case]
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    code, out, err = generate(*args)
    assert code == 2, (out, err)
    assert message in err and err.startswith("flowvae generate: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (Path(bad_cases["no such run"][0][-1])).exists()  # nothing written
