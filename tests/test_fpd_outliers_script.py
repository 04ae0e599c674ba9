"""scripts/fpd_outliers.py, the diagnosis the prior study's FPD table rests on: it finds the generated jets that lie
outside the real ones and scores the set without them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "gluon_30p_slice.npz"


def _script():
    spec = importlib.util.spec_from_file_location("fpd_outliers", ROOT / "scripts" / "fpd_outliers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three rows under JetNet's protocol, whose batch sizes do not shrink with the set: ~30 s
def test_the_jets_that_carry_more_than_their_pt_are_found_and_fpd_falls_without_them(tmp_path):
    """Real jets (the test slice, 400) against themselves with 4 of the copies' jets made to carry 3x their pT:
    exactly those 4 are outside the real range and above the Σ pT_rel cut, and dropping them brings FPD back to
    the set scored against itself."""
    jets = np.load(SLICE)["particle_features"]  # (400, 30, 4): etarel, phirel, ptrel, mask
    generated = jets.copy()
    generated[:4, :, 2] *= 3.0  # 4 jets whose fractions add up to about 3
    np.savez(tmp_path / "gen.npz", particle_features=generated)
    np.savez(tmp_path / "real.npz", particle_features=jets)
    assert _script().main([str(tmp_path / "gen.npz"), str(tmp_path / "real.npz"), "--drop", "",
                           "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows["inside_range"]["dropped"] == rows["sum_ptrel<=1.05"]["dropped"] == 4 / 400
    # without the 4 the generated set is the real one less 4 of its jets: FPD near the set against itself
    # (0.2e-3), and the 4 alone had made it far larger
    assert rows["inside_range"]["fpd"] < 1e-3 and rows["all"]["fpd"] > 20 * rows["inside_range"]["fpd"]


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        _script().main([str(tmp_path / "nope.npz"), str(SLICE)])
