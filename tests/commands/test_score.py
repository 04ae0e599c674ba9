"""`flowvae score`: any two event files, either layout, with or without a mask; its row is a training row's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import sqrtm

from flowvae.commands.score import main
from flowvae.data.events import file_array, load_events
from flowvae.metrics.row import row_columns, score_row
from tests.conftest import compose_config, run_flowvae

DATA = Path(__file__).resolve().parents[1] / "data"
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
    (["a", "other"], "have 150 and 2 features"),
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


# ---------------------------------------------------------------- floors that show their size


def test_every_jet_floor_has_its_error_and_fpds_floor_its_distance_before_extrapolation():
    """fpd_floor is an intercept fitted with FPD >= 0, mostly exactly 0: the row also carries its fit error and the
    Fréchet distance between the two halves it extrapolates from, which is > 0 (checked against scipy's sqrtm)."""
    rng = np.random.default_rng(3)
    reference, generated = rng.normal(size=(400, 2, 7)), rng.normal(size=(300, 2, 7))
    row = score_row(generated, None, reference, None, bins=20, seed=4)
    assert list(row) == row_columns(2)
    for metric in ("fpd", "kpd"):
        assert f"{metric}_floor_err" in row and row[f"{metric}_floor_err"] > 0
    # without kinematics an event's features are each feature's mean and std (ddof 0) over its particles
    features = np.concatenate([reference.mean(axis=2), reference.std(axis=2)], axis=1)
    order = np.random.default_rng(4).permutation(400)
    first, second = features[order[:200]], features[order[200:]]
    scale = np.abs(second).max(axis=0)  # FPD's normalisation: the reference side's largest |value|
    first, second = first / scale, second / scale
    cov1, cov2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    expected = np.sum((first.mean(0) - second.mean(0)) ** 2) + np.trace(cov1 + cov2 - 2 * sqrtm(cov1 @ cov2).real)
    assert row["fpd_floor_fd"] == pytest.approx(expected, rel=1e-8)
    assert row["fpd_floor_fd"] > 0 and row["fpd_floor"] < row["fpd_floor_fd"]


def test_jet_row_is_the_jet_part_of_the_full_row():
    events, mask = _gluons()
    generated, reference = (events[:100], mask[:100]), (events[100:300], mask[100:300])
    full = score_row(*generated, *reference, (0, 1, 2), bins=20)
    jets = score_row(*generated, *reference, (0, 1, 2), bins=20, jet_level_only=True)
    assert list(jets) == row_columns(3, True, True, jet_level_only=True)
    assert jets == {key: full[key] for key in jets} and "kl_sum" not in jets and "fpd_floor_err" in jets


def _gluons(slots: int = 30):
    """The test slice's jets as (N, 3, P) events and an (N, P) mask."""
    raw = np.load(DATA / f"gluon_{slots}p_slice.npz")["particle_features"].transpose(0, 2, 1).astype(np.float64)
    return raw[:, :3], raw[:, 3]


# ---------------------------------------------------------------- what cannot be compared is refused, in words


def _arrays(tmp_path):
    rng = np.random.default_rng(0)
    files = {"f3p20": rng.normal(size=(50, 3, 20)), "f3p100": rng.normal(size=(50, 3, 100)),
             "p20f3": rng.normal(size=(50, 20, 3)), "f4p20": rng.normal(size=(50, 4, 20))}
    for slots in (30, 150):
        files[f"jets{slots}"] = np.load(DATA / f"gluon_{slots}p_slice.npz")["particle_features"]
    for name, values in files.items():
        np.save(tmp_path / f"{name}.npy", values)
    return {name: tmp_path / f"{name}.npy" for name in files}


@pytest.mark.parametrize("gen, ref, flags, says", [
    ("f3p20", "f3p100", [], ["20 and 100 particle slots", "--jet-level-only"]),
    ("f3p20", "p20f3", [], ["opposite orders", "(50, 3, 20) and (50, 20, 3)", "transpose(0, 2, 1)"]),
    ("f3p20", "f4p20", [], ["3 and 4 features"]),
    ("jets30", "jets150", [], ["30 and 150 features", "use --layout particles_first", "--jet-level-only"]),
    ("jets30", "jets150", ["--layout", "particles_first"], ["30 and 150 particle slots", "--jet-level-only"]),
])
def test_files_that_differ_are_refused_with_what_differs_and_the_fix(tmp_path, score, gen, ref, flags, says):
    files = _arrays(tmp_path)
    code, out, err = score(files[gen], files[ref], *flags)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for text in says:
        assert text in err


def test_different_slots_give_the_jet_level_metrics_alone(tmp_path, score):
    files = _arrays(tmp_path)
    code, out, err = score(files["jets30"], files["jets150"], "--layout", "particles_first", "--mask-feature", "3",
                           "--jet-kinematics", "0,1,2", "--jet-level-only", "--csv", tmp_path / "scores.csv")
    assert code == 0, err
    assert "400 vs 200 events of 30 vs 150 particle slots" in out
    assert "the per-feature KL, W1, JS and moments are left out" in out
    row = pd.read_csv(tmp_path / "scores.csv").iloc[0]
    assert "kl_sum" not in row and row["score.jet_level_only"]
    # the multiplicity is capped at 30 on one side only: far above its floor
    assert row["w1_mult"] > 5 * row["w1_mult_floor"]
    code, _, err = score(files["f3p20"], files["f3p100"], "--jet-level-only")
    assert code == 0, err


def test_feature_names_stored_in_the_npz_name_the_features_and_the_layout(tmp_path, score):
    stored = np.load(DATA / "gluon_30p_slice.npz")
    assert list(stored["particle_feature_names"]) == ["etarel", "phirel", "ptrel", "mask"]  # the JetNet-style key
    jets, names = tmp_path / "jets.npz", stored["particle_feature_names"]
    np.savez(jets, particle_features=stored["particle_features"][:60], particle_feature_names=names)
    flags = ["--key", "particle_features", "--layout", "particles_first", "--bins", "20"]
    code, out, err = score(jets, jets, *flags, "--mask-feature", "3")
    assert code == 0, err
    assert "features etarel, phirel, ptrel\n" in out
    # the names count the file's last axis: read features-first, the layout is wrong, and the refusal says so
    code, _, err = score(jets, jets, "--key", "particle_features")
    assert code == 2 and "4 feature names (etarel, phirel, ptrel, mask)" in err
    assert "use --layout particles_first" in err
    # two files that name their features differently are refused, unless --features names them
    other_names = np.array(["eta", "phi", "pt", "m"])
    np.savez(tmp_path / "renamed.npz", particle_features=stored["particle_features"][:60],
             particle_feature_names=other_names)
    code, _, err = score(jets, tmp_path / "renamed.npz", *flags)
    assert code == 2 and "etarel, phirel, ptrel, mask; reference eta, phi, pt, m" in err
    code, out, err = score(jets, tmp_path / "renamed.npz", *flags, "--features", "a,b,c,d")
    assert code == 0 and "features a, b, c, d\n" in out
    # names that do not count the features name nothing
    np.savez(tmp_path / "three.npz", particle_features=stored["particle_features"][:60],
             particle_feature_names=other_names[:3])
    code, out, err = score(tmp_path / "three.npz", tmp_path / "three.npz", *flags)
    assert code == 0 and "features feature 0, feature 1, feature 2, feature 3\n" in out


def test_each_phase_is_said_on_stderr_and_changes_no_number(tmp_path, score):
    """Not a terminal: a log line per phase on stderr (--progress log, the default here), nothing with
    --progress none; the row is the same to the last bit with a progress line every 20 ms."""
    from flowvae import progress

    raw = np.load(DATA / "gluon_30p_slice.npz")["particle_features"]  # (N, P, F), mask at 3
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(first, particle_features=raw[:100])
    np.savez(second, particle_features=raw[100:200])
    flags = ["--key", "particle_features", "--layout", "particles_first", "--mask-feature", "3", "--jet-kinematics",
             "0,1,2", "--bins", "30", "--csv", tmp_path / "rows.csv"]
    code, quiet, err = score(first, second, *flags, "--progress", "none")
    assert code == 0 and err == ""
    with progress.settings(interval=0.02):
        code, out, err = score(first, second, *flags)
    assert code == 0 and out.replace("appended to", "") == quiet.replace("appended to", "")
    said = [line.split("] ", 1)[1].strip() for line in err.splitlines()]
    for phase in ("scoring 100 generated against 100 reference events (protocol scaled)",
                  "per-feature KL, W1, JS and moments", "noise floors of kl_sum, w1_sum and js_sum: two halves of "
                  "the reference", "jet-level metrics (scaled): generated against the reference",
                  "EFPs of 100 generated jets (up to 30 particles)", "jet-level floors (scaled): two halves of the "
                  "reference", "FPD's floor before its extrapolation: the FD of two halves of the reference"):
        assert phase in said, phase
    assert any(" s" in line and "%)" in line for line in said)  # the periodic lines: how far a phase is
    assert said[-1].startswith("scoring 100 generated against 100 reference events (protocol scaled): done in ")
    rows = pd.read_csv(tmp_path / "rows.csv")
    metrics = [c for c in rows.columns if c.startswith(("kl_", "w1", "js_", "gen_", "input_", "noise", "fpd", "kpd"))]
    assert len(metrics) > 30 and rows.loc[0, metrics].equals(rows.loc[1, metrics])
