"""Write an example particle data set: N events x 3 features (pt, eta, phi) x P particles, as a .npy file.

    python scripts/make_particles.py --out particles.npy --events 2000 --particles 100 --seed 0

Each event is a toy jet, so its particles share event-level structure and the features are not Gaussian:

* pt  ~ Exponential(mean m), with the jet's mean particle pT m = exp(N(log 5, 0.5^2)) drawn per event
  (jets have different energies): skewed, positive, heavy-tailed;
* eta ~ N(eta_jet, 0.3^2) around the jet's axis eta_jet ~ N(0, 1), drawn per event;
* phi ~ Uniform(-pi, pi), independent of everything: flat, bounded.

Importable too: ``make_particles(n_events, n_particles, rng)`` returns the array.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np

__all__ = ["FEATURE_NAMES", "make_particles", "main"]

FEATURE_NAMES = ("pt", "eta", "phi")
LOG_MEAN_PT, LOG_MEAN_PT_SPREAD = math.log(5.0), 0.5  # each jet's mean particle pT, log-normal
JET_ETA_SPREAD, PARTICLE_ETA_SPREAD = 1.0, 0.3  # the jets' axes, and the particles around their axis


def make_particles(n_events: int, n_particles: int, rng: np.random.Generator) -> np.ndarray:
    """Toy jets of shape (n_events, 3, n_particles), float32; features in the order of ``FEATURE_NAMES``."""
    mean_pt = np.exp(LOG_MEAN_PT + LOG_MEAN_PT_SPREAD * rng.standard_normal(n_events))
    jet_eta = JET_ETA_SPREAD * rng.standard_normal(n_events)
    pt = rng.exponential(1.0, (n_events, n_particles)) * mean_pt[:, None]
    eta = jet_eta[:, None] + PARTICLE_ETA_SPREAD * rng.standard_normal((n_events, n_particles))
    phi = rng.uniform(-math.pi, math.pi, (n_events, n_particles))
    return np.stack([pt, eta, phi], axis=1).astype(np.float32)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: an integer >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("particles.npy"), help="the .npy file to write")
    parser.add_argument("--events", type=_positive, default=2000, help="number of events N (default 2000)")
    parser.add_argument("--particles", type=_positive, default=100, help="particles per event P (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    events = make_particles(args.events, args.particles, np.random.default_rng(args.seed))
    out = args.out if args.out.suffix == ".npy" else args.out.with_name(args.out.name + ".npy")  # as np.save
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, events)
    print(f"wrote {out}: {events.shape[0]} events x {len(FEATURE_NAMES)} features ({', '.join(FEATURE_NAMES)}) "
          f"x {events.shape[2]} particles")
    print("train on it with:")
    overrides = ["data=npy", f"data.path={out}", f"data.feature_names=[{','.join(FEATURE_NAMES)}]"]
    print("  flowvae train " + " ".join(shlex.quote(o) for o in overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
