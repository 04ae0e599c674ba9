"""``data=npy`` and ``data=jets`` end to end: the example data maker, the console script, bad files, posterior runs."""

from __future__ import annotations

import importlib.util
import logging
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowvae.cli import main
from flowvae.data.events import load_events
from flowvae.files import RunFiles
from flowvae.flows import FLOWS
from tests.conftest import TINY, compose_config, run_flowvae

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_particles.py"
# TINY without the keys of the drawn toys: an npy run takes its sizes from its file.
SIZES = [o for o in TINY if not o.startswith("data.")]
FLOW_FAMILIES = [name for name in FLOWS if name != "none"]


def _make_particles_module():
    spec = importlib.util.spec_from_file_location("make_particles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_particles_gives_skewed_jet_like_features():
    make_particles = _make_particles_module().make_particles
    x = make_particles(400, 50, np.random.default_rng(0))
    assert x.shape == (400, 3, 50) and x.dtype == np.float32
    assert np.array_equal(x, make_particles(400, 50, np.random.default_rng(0)))
    pt, eta, phi = x[:, 0].astype(np.float64), x[:, 1].astype(np.float64), x[:, 2].astype(np.float64)
    assert pt.min() > 0 and pt.mean() > 1.3 * np.median(pt)  # positive and right-skewed
    assert np.log(pt.mean(axis=1)).std() > 0.4  # each jet its own energy scale
    assert eta.mean(axis=1).var() > 0.5 and np.mean(eta.std(axis=1)) < 0.4  # particles around their jet's axis
    assert -math.pi <= phi.min() and phi.max() <= math.pi and abs(phi.std() - math.pi / math.sqrt(3)) < 0.05


@pytest.mark.slow
def test_npy_example_runs_end_to_end_with_the_printed_command(tmp_path):
    made = subprocess.run([sys.executable, str(SCRIPT), "--out", "particles.npy", "--events", "300", "--particles",
                           "10", "--seed", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    command = next(line for line in made.stdout.splitlines() if "flowvae train" in line)
    overrides = shlex.split(command)[2:]
    assert overrides == ["data=npy", "data.path=particles.npy", "data.feature_names=[pt,eta,phi]"]

    out = run_flowvae(["train", *overrides, *SIZES, "hydra.run.dir=run", "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["data.name"] == "npy" and row["data.path"] == "particles.npy"
    assert bool(row["data.standardize"]) and math.isfinite(row["kl_sum"])
    # Scored in the file's own units: the input columns are the held-out split's moments, and the generated
    # events (trained standardized) are mapped back near them.
    events = load_events(compose_config(*overrides).data, launch_dir=tmp_path)
    assert len(events.test) == 60 and events.feature_names == ["pt", "eta", "phi"]
    np.testing.assert_allclose([row[f"input_mean_{i}"] for i in range(3)], events.test.mean(axis=(0, 2)),
                               rtol=1e-5, atol=1e-6)
    assert abs(row["gen_mean_0"] - row["input_mean_0"]) < 0.5 * row["input_std_0"]
    assert (tmp_path / "run" / "histograms.png").exists()


def _bad_files(tmp_path: Path) -> None:
    x = _make_particles_module().make_particles(20, 4, np.random.default_rng(0))
    np.save(tmp_path / "flat.npy", x.reshape(20, -1))
    with_nan = x.copy()
    with_nan[2, 1, 3] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    np.save(tmp_path / "few.npy", x[:5])
    np.savez(tmp_path / "several.npz", jets=x, weights=np.ones(20))
    np.save(tmp_path / "good.npy", x)


@pytest.fixture
def restore_logging():
    """Hydra's in-process run points the root logger at this test's captured streams: put the handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.path=missing.npy"], "data.path"),
        (["data.path=flat.npy"], "data.path"),
        (["data.path=nan.npy"], "data.path"),
        (["data.path=few.npy"], "data.path"),
        (["data.path=several.npz"], "data.key"),
        (["data.path=good.npy", "data.feature_names=[pt,eta]"], "data.feature_names"),
    ],
    ids=["missing", "wrong rank", "nan", "too few events", "npz without key", "feature names"],
)
def test_bad_file_exits_2_with_one_line_naming_the_key(tmp_path, monkeypatch, capfd, restore_logging, overrides,
                                                       key):
    # In-process through the command line's own entry (a console-script start per case would cost seconds).
    _bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    code = main(["train", "data=npy", *overrides, *SIZES, "hydra.run.dir=run", "results_csv=results.csv"])
    text = "".join(capfd.readouterr())
    assert code == 2, text
    errors = [line for line in text.splitlines() if "bad configuration" in line]
    assert len(errors) == 1 and f"bad configuration: {key}=" in errors[0], text
    assert "Traceback" not in text
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.slow
def test_jets_run_from_the_command_line(tmp_path):
    out = run_flowvae(["train", "data=jets", *TINY, "flow=triangular", "n_flows=1", "eval.source=posterior",
                       "hydra.run.dir=run", "results_csv=results.csv"], cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    row = pd.read_csv(tmp_path / "results.csv").iloc[0]
    assert row["status"] == "ok" and row["data.name"] == "jets" and row["eval.source"] == "posterior"
    assert math.isfinite(row["kl_sum"]) and row["input_std_0"] > 0.6  # offsets and scales widen the marginal


@pytest.mark.parametrize("flow", FLOW_FAMILIES)
def test_posterior_source_runs_on_jets_for_every_flow_family(tmp_path, flow):
    from flowvae.run.experiment import train_and_score

    tiny = [o for o in TINY if not o.startswith(("train.epochs=", "model.hidden="))]
    tiny += ["train.epochs=1", "model.hidden=[16]"]
    cfg = compose_config("data=jets", *tiny, f"flow={flow}", "n_flows=1", "eval.source=posterior")
    events = load_events(cfg.data)
    status, message, values = train_and_score(cfg, events, RunFiles(tmp_path))
    assert status == "ok", message
    assert all(math.isfinite(values[c]) for c in ("kl_sum", "w1_sum", "js_sum", "gen_std_0"))
    assert values["gen_std_0"] > 0
