"""Metrics of generated vs reference events, one module per kind; the per-feature ones are re-exported here
(``flowvae.metrics.kl_divergence``, ``flowvae.metrics.feature_kl``, ...).

- :mod:`~flowvae.metrics.marginal`: per feature — histogram KL, JS, W1, moments, the noise floor, the row's
  per-feature columns;
- :mod:`~flowvae.metrics.jets`: jets as the jet-level metrics read them — inputs and masks, multiplicity, jet
  kinematics;
- :mod:`~flowvae.metrics.efp`: the 36 energy-flow polynomials with d ≤ 4 and the feature vector of FPD/KPD;
- :mod:`~flowvae.metrics.distances`: W1 with errors (jet mass, multiplicity, particle features), FPD, KPD;
- :mod:`~flowvae.metrics.protocol`: the jet-level part of a row, with noise floors, under a named protocol
  (``PROTOCOLS``): ``scaled`` (the differences below) or ``jetnet``, jetnet.evaluation's published defaults
  exactly, whose docstring lists what still differs from jetnet's code and by how much;
- :mod:`~flowvae.metrics.row`: a result row's metric columns and how they are computed (``score_row``), the one
  definition that a run, ``flowvae evaluate`` and ``flowvae score`` share.

Layers: marginal imports nothing of flowvae's and jets only marginal; efp and distances import jets; protocol
imports them all; row builds on them all (and on ``Events`` of :mod:`flowvae.data.events`). efp, distances,
protocol and row report what a long step is doing (EFPs, W1 batches, FPD's batch sizes, KPD, the floors) through
:mod:`flowvae.progress`, a base module that imports nothing of flowvae; reporting changes no number and no random
stream.

**The jet-level metrics, and where they differ from jetnet.** The definitions follow R. Kansal et al., "Evaluating
generative models in high energy physics", Phys. Rev. D 107 (2023) 076017 (arXiv:2211.10295), and their reference
implementation in the ``jetnet`` package (``jetnet.evaluation.gen_metrics``: w1m, w1p, fpd, kpd,
``get_fpd_kpd_jet_features``; ``jetnet.utils``: jet_features, efps). Where a module differs from jetnet it says so
in the function's docstring; in short:

- FPD and KPD draw their batches *without* replacement by default (jetnet draws with replacement), so that a
  batch is an i.i.d. sample of the distribution and the 1/N extrapolation and the unbiased MMD hold even when
  the sets are not much larger than a batch; ``replace=True`` gives jetnet's sampling. Batch sizes larger than
  the sets allow are scaled down, and the functions take a ``seed`` (0 by default; jetnet's is 42).
- The energy-flow polynomials are computed here in numpy (the same 36 EFPs, d ≤ 4, as jetnet's
  ``energyflow.EFPSet("d<=4", measure="hadr", beta=1, normed=None, coords="ptyphim")``, in that order), and
  the jet feature vector for FPD/KPD prepends jet mass and pT to them (``include_mass_pt=False`` gives jetnet's
  36 EFPs alone).
- Padded particles are removed by a mask (N, P); jetnet relies on zero-padding (a padded particle with pT = 0
  adds nothing) and, in w1p, also drops particles whose features are all exactly 0. Here only the mask decides.

Events are flowvae's (N, F, P) = (events, features, particles) with an optional mask (N, P) of 0/1: a padded
particle (mask 0) enters no metric, whatever its values (NaN included). Real particles must be finite. The
kinematic features, where there are any, are named by their indices ``(i_eta, i_phi, i_pt)`` along F; JetNet's
particle features (etarel, phirel, ptrel) are (0, 1, 2). Values are used as given: a generator's negative pT is
not clipped (jetnet's ``gen_jet_corrections`` zeroes it; do that before scoring if it is wanted).

All functions are pure numpy (scipy for KPD's percentile spread) and work in float64. They accept numpy arrays or torch
tensors (detached and copied to the CPU).
"""

from flowvae.metrics.marginal import *  # noqa: F403 - the per-feature API is the package's
from flowvae.metrics.marginal import __all__ as __all__
