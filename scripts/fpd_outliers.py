"""Which generated jets decide FPD: a generated set scored against a real one under JetNet's protocol, then again
without the few generated jets that lie where no real jet does.

FPD fits a Gaussian to each set's 36 EFPs (normalised by the real set's), so a handful of generated jets far outside
the real ones moves their covariance, and FPD with it, by orders of magnitude while KPD, W1M and every histogram
barely notice. This script says how many such jets a set has and what FPD is without them:

* ``all``: the set as generated;
* ``inside_range``: without the generated jets any of whose 36 EFPs lies outside the real jets' range;
* ``sum_ptrel<=S``: without those whose particles' pT fractions add up to more than S (``--max-sum``, 1.05);
* ``drop_farthest_Q``: without the fraction Q (``--drop``) of jets farthest from the real set's mean in any
  EFP, in the real set's standard deviations.

Dropping jets is a diagnosis, not a remedy: a generator must not make them (``data.transforms`` ``fraction``,
docs/real-jets.md). Files as ``flowvae generate`` writes them, e.g. a run's generated and held-out jets:

    flowvae generate outputs/runs/<run> --n 50000 --out gen.npz
    flowvae generate outputs/runs/<run> --source heldout --out held_out.npz
    python scripts/fpd_outliers.py gen.npz held_out.npz --json outliers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from flowvae.data.events import read_array, split_mask
from flowvae.errors import ConfigError
from flowvae.metrics.efp import JetSet
from flowvae.metrics.protocol import score_protocol

COLUMNS = ("fpd", "fpd_err", "fpd_exact", "kpd", "kpd_err", "w1m")


def load(path: Path, layout: str, mask_feature: int | None) -> JetSet:
    """A file's jets: a .npy, or the events array of a .npz (the one that is not ``mask``)."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (write one with `flowvae generate RUN_DIR --out FILE`)")
    key = None
    if path.suffix == ".npz":
        with np.load(path) as stored:
            keys = [k for k in stored.files if k != "mask" and not k.endswith("_names")]
        if len(keys) != 1:
            raise SystemExit(f"{path}: expected one events array beside 'mask', found {keys}")
        key = keys[0]
    try:
        events, mask = split_mask(np.asarray(read_array(str(path), key, layout=layout)), mask_feature,
                                  "--mask-feature")
        return JetSet(events, mask, path.name)
    except (ConfigError, ValueError) as error:
        raise SystemExit(f"{path}: {error}") from None


def score(generated: JetSet, reference: JetSet, kinematics: tuple[int, int, int]) -> dict[str, float]:
    row = score_protocol("jetnet", generated, None, reference, None, kinematics=kinematics)
    return {column: row[column] for column in COLUMNS}


def without(generated: JetSet, drop: np.ndarray, reference: JetSet, kinematics: tuple[int, int, int]) -> dict:
    """The row of the generated set without the jets where ``drop`` is True, and the share dropped."""
    return {"dropped": float(drop.mean()), **score(generated.rows(np.flatnonzero(~drop)), reference, kinematics)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generated", type=Path)
    parser.add_argument("reference", type=Path, help="the real jets (a run's held-out set)")
    parser.add_argument("--layout", default="particles_first", choices=("particles_first", "features_first"))
    parser.add_argument("--mask-feature", type=int, default=3, help="the mask's feature index (-1: no mask)")
    parser.add_argument("--kinematics", default="0,1,2", help="the indices of eta, phi and pT (default 0,1,2)")
    parser.add_argument("--max-sum", type=float, default=1.05, help="the largest Σ pT fraction kept (1.05)")
    parser.add_argument("--drop", default="0.001,0.005", help="shares of farthest jets dropped (0.001,0.005)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    kinematics = tuple(int(i) for i in args.kinematics.split(","))
    if len(kinematics) != 3:
        raise SystemExit(f"--kinematics takes three indices (eta, phi, pT), got {args.kinematics!r}")
    mask_feature = None if args.mask_feature < 0 else args.mask_feature
    generated = load(args.generated, args.layout, mask_feature)
    reference = load(args.reference, args.layout, mask_feature)
    gen_efps, ref_efps = generated.features(kinematics, False), reference.features(kinematics, False)
    rows = {"all": {"dropped": 0.0, **score(generated, reference, kinematics)}}
    rows["inside_range"] = without(generated, ((gen_efps < ref_efps.min(0)) | (gen_efps > ref_efps.max(0))).any(1),
                                   reference, kinematics)
    sums = (generated.jets[:, kinematics[2]] * generated.real).sum(1)
    rows[f"sum_ptrel<={args.max_sum:g}"] = without(generated, sums > args.max_sum, reference, kinematics)
    distance = np.abs((gen_efps - ref_efps.mean(0)) / ref_efps.std(0)).max(1)
    for share in (float(q) for q in args.drop.split(",") if q):
        rows[f"drop_farthest_{share:g}"] = without(generated, distance > np.quantile(distance, 1 - share), reference,
                                                   kinematics)
    print(f"{len(gen_efps)} generated against {len(ref_efps)} real jets, JetNet's protocol (×10⁻³)")
    print(f"{'':>22} {'dropped':>8} {'fpd':>16} {'kpd':>14} {'w1m':>6}")
    for name, row in rows.items():
        print(f"{name:>22} {row['dropped']:>8.2%} {row['fpd'] * 1e3:>8.2f} ± {row['fpd_err'] * 1e3:<5.2f} "
              f"{row['kpd'] * 1e3:>6.3f} ± {row['kpd_err'] * 1e3:<5.3f} {row['w1m'] * 1e3:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
