"""`flowvae score`: any two event files, either layout, with or without a mask; its row is a training row's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowvae.data import file_array, load_events
from flowvae.score import main, score_row
from tests.conftest import compose_config, run_flowvae

DATA = Path(__file__).parent / "data"
JETNET = ["--key", "particle_features", "--layout", "particles_first", "--mask-feature", "3", "--jet-kinematics",
          "0,1,2"]


@pytest.fixture
def score(capsys):
    def call(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def _halves(tmp_path, layout):
    raw = np.load(DATA / "gluon_150p_slice.npz")["particle_features"]  # (N, P, F), mask at 3
    if layout == "features_first":
        raw = raw.transpose(0, 2, 1)
    first, second = tmp_path / f"a_{layout}.npz", tmp_path / f"b_{layout}.npz"
    np.savez(first, particle_features=raw[:100])
    np.savez(second, particle_features=raw[100:])
    return first, second


@pytest.mark.parametrize("layout", ["features_first", "particles_first"])
def test_two_files_of_each_layout_with_and_without_a_mask(tmp_path, score, layout):
    first, second = _halves(tmp_path, layout)
    code, out, err = score(first, second, "--key", "particle_features", "--layout", layout, "--mask-feature", "3",
                           "--jet-kinematics", "0,1,2", "--features", "eta,phi,pt,mask", "--bins", "30",
                           "--csv", tmp_path / "scores.csv")
    assert code == 0, err
    assert "features eta, phi, pt" in out and "w1m " in out and "w1_mult " in out and "fpd_floor" in out
    row = pd.read_csv(tmp_path / "scores.csv").iloc[0]
    raw = np.load(first)["particle_features"]
    events = raw.transpose(0, 2, 1) if layout == "particles_first" else raw
    mask = events[:, 3] == 1
    assert row["input_mean_2"] != row["gen_mean_2"]
    assert row["gen_mean_2"] == pytest.approx(events[:, 2][mask].mean(), rel=1e-6)  # padded slots left out
    # without a mask, every slot is a particle: the zeros of padded slots now count
    code, out, _ = score(first, second, "--key", "particle_features", "--layout", layout, "--bins", "30",
                         "--csv", tmp_path / "scores.csv")
    assert code == 0 and "w1_mult" not in out and "w1m" not in out
    unmasked = pd.read_csv(tmp_path / "scores.csv").iloc[1]
    assert unmasked["gen_mean_2"] == pytest.approx(events[:, 2].mean(), rel=1e-6)
    assert unmasked["gen_mean_2"] < row["gen_mean_2"]


def test_the_row_equals_what_the_training_run_computed(tmp_path):
    out = run_flowvae(["train", "data=jetnet", f"data.path={DATA / 'gluon_30p_slice.npz'}", "model.hidden=[32]",
                       "model.latent_dim=4", "train.epochs=2", "train.batch_size=50", "eval.n_samples=300",
                       "eval.bins=20", "train.threads=1", "flow=planar", "n_flows=1", "hydra.run.dir=run",
                       "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    trained = pd.read_csv(tmp_path / "results.csv").iloc[0]
    events = load_events(compose_config("data=jetnet", f"data.path={DATA / 'gluon_30p_slice.npz'}").data)
    np.save(tmp_path / "held_out.npy", file_array(events.test, events.test_mask.astype(np.float32), 3,
                                                  "particles_first"))
    out = run_flowvae(["score", "run/generated_sample.npy", "held_out.npy", *JETNET, "--bins", "20",
                       "--csv", "scores.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    scored = pd.read_csv(tmp_path / "scores.csv").iloc[0]
    columns = [c for c in scored.index if c.startswith(("kl_", "w1", "js_", "gen_", "input_", "noise", "fpd", "kpd"))]
    assert len(columns) > 30
    for column in columns:
        assert scored[column] == pytest.approx(trained[column], rel=1e-9, abs=1e-12), column


def test_score_row_of_a_set_against_itself_is_zero_for_the_per_feature_metrics():
    rng = np.random.default_rng(0)
    events = rng.normal(size=(200, 2, 7))
    row = score_row(events, None, events, None, bins=20)
    assert row["kl_sum"] == 0 and row["w1_sum"] == 0 and row["js_sum"] == 0
    # the floors: the same metrics between two random halves of the reference, which are not zero
    halves = np.random.default_rng(0).permutation(200)
    from flowvae.metrics import feature_w1

    assert row["w1_sum_floor"] == pytest.approx(feature_w1(events[halves[:100]], events[halves[100:]]).sum())
    assert row["js_sum_floor"] > 0 and row["noise_floor"] > 0
    assert all(row[f"w1_{i}_err"] > 0 for i in range(2))  # the spread of W1 over resampled batches
    assert row["fpd"] == pytest.approx(0, abs=3 * row["fpd_err"] + 1e-6)


@pytest.mark.parametrize("args, message", [
    (["missing.npy", "b"], "does not exist"),
    (["a", "b", "--mask-feature", "9"], "--mask-feature 9"),
    (["a", "b", "--jet-kinematics", "0,1"], "--jet-kinematics"),
    (["a", "b", "--jet-kinematics", "x"], "--jet-kinematics"),
    (["a", "b", "--features", "x,y"], "--features"),
    (["a", "b", "--bins", "0"], "--bins"),
    (["a", "other"], "number of features"),
    (["a", "b", "--csv", "/proc/r.csv"], "lock file"),
    (["a", "nan"], "non-finite"),
])
def test_a_bad_file_or_flag_is_one_line_and_exit_2(tmp_path, score, args, message):
    first, second = _halves(tmp_path, "particles_first")
    np.save(tmp_path / "other.npy", np.zeros((5, 2, 3)))
    np.save(tmp_path / "nan.npy", np.full((5, 150, 4), np.nan))
    files = {"a": first, "b": second, "other": tmp_path / "other.npy", "nan": tmp_path / "nan.npy",
             "missing.npy": tmp_path / "missing.npy"}
    argv = [files.get(a, a) for a in args]
    if "--layout" not in args:
        argv += ["--key", "particle_features"]
    code, _, err = score(*argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
