"""Per-feature maps between the data's units and the space the model learns in, and back.

A feature first goes through its elementwise transform, then (``data.standardize``) through a per-feature affine
map fitted on the training events' real particles:

* ``none``: x;
* ``log``: log x, for a positive feature (a particle's pT): generated values exp(·) are positive by construction;
* ``logit``: log(x / (1 − x)), for a feature in (0, 1) (pT relative to the jet): generated values sigmoid(·) lie
  in (0, 1) by construction;
* ``fraction``: for a feature that is each particle's share of its jet (pT relative to the jet), the additive
  log-ratio of the jet's shares against what they leave below a ceiling c,

      y_i = log x_i − log(c − Σ_j x_j),      x_i = c · e^{y_i} / (1 + Σ_j e^{y_j})      (sums over the jet's real
                                                                                            particles),

  with c the training jets' largest Σ x times (1 + :data:`FRACTION_MARGIN`): generated shares are positive and
  add up to less than c, so no generated jet's particles carry more of its pT than the data's jets do (Aitchison,
  "The statistical analysis of compositional data", 1986). A held-out jet above c (rarer than the training set's
  largest) is taken to just below it.

Padded particles (mask False) are set to 0 in both directions and never enter a fit (nor a jet's sum). Values outside a
transform's domain are refused with the feature named, before any training. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowvae.errors import ConfigError

__all__ = ["FeatureMap", "TRANSFORMS", "Scaler", "FRACTION_MARGIN"]

# How far above the training jets' largest sum of shares the ``fraction`` ceiling lies, relative: the largest jet
# then maps to a finite log-ratio (log 0.02 below its particles' own), and generated jets may exceed the training
# set's largest sum by at most 2 %.
FRACTION_MARGIN = 0.02
# The smallest room below the ceiling a held-out jet is given, relative to the ceiling: one whose shares add up to
# more than c is taken there (its log-ratios stay finite) instead of becoming NaN.
_ROOM = 1e-6

_FORWARD = {
    "none": lambda x: x,
    "log": np.log,
    "logit": lambda x: np.log(x) - np.log1p(-x),
}
_INVERSE = {
    "none": lambda y: y,
    "log": np.exp,
    "logit": lambda y: 0.5 * (1.0 + np.tanh(0.5 * y)),  # the sigmoid, without overflow for large |y|
}
_DOMAIN = {
    "none": (lambda x: np.isfinite(x), "finite values"),
    "fraction": (lambda x: (x > 0) & np.isfinite(x), "values > 0 (each particle's share of its jet)"),
    "log": (lambda x: x > 0, "values > 0"),
    "logit": (lambda x: (x > 0) & (x < 1), "values in (0, 1)"),
}


def _real(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """(N, 1, P) booleans broadcasting over features: True where a particle is real."""
    if mask is None:
        return np.ones((shape[0], 1, shape[2]), dtype=bool)
    return mask[:, None, :]


@dataclass
class FeatureMap:
    """The per-feature transforms and the scaler after them; ``forward`` into model space, ``inverse`` back."""

    kinds: list[str]
    scaler: Scaler
    ceilings: dict[int, float] = field(default_factory=dict)  # feature index -> c, for each ``fraction`` feature

    @classmethod
    def fit(cls, events: np.ndarray, mask: np.ndarray | None, kinds: list[str] | None, standardize: bool,
            names: list[str] | None = None) -> FeatureMap:
        """Check the training events against each transform's domain, then fit the scaler on their real
        particles (in transformed units). Raises ConfigError (``data.transforms``) naming the feature."""
        n_features = events.shape[1]
        kinds = list(kinds) if kinds is not None else ["none"] * n_features
        if len(kinds) != n_features or any(k not in TRANSFORMS for k in kinds):
            raise ConfigError("data.transforms", kinds, f"one per feature ({n_features}), each one of "
                                                        f"{', '.join(TRANSFORMS)}")
        feature_map = cls(kinds, Scaler.identity(n_features))
        feature_map.check(events, mask, names)
        real = _real(mask, events.shape)[:, 0]
        feature_map.ceilings = {i: float(np.where(real, events[:, i], 0.0).sum(axis=1, dtype=np.float64).max())
                                * (1.0 + FRACTION_MARGIN) for i, kind in enumerate(kinds) if kind == "fraction"}
        if standardize:
            feature_map.scaler = Scaler.fit(feature_map._elementwise(events, mask, _FORWARD), mask)
        return feature_map

    def check(self, events: np.ndarray, mask: np.ndarray | None, names: list[str] | None = None) -> None:
        """Raise ConfigError if a real particle's value is outside its feature's transform domain."""
        real = _real(mask, events.shape)[:, 0]
        for i, kind in enumerate(self.kinds):
            inside, domain = _DOMAIN[kind]
            values = np.asarray(events[:, i])[real]
            outside = ~inside(values)
            if outside.any():
                name = names[i] if names else f"feature {i}"
                raise ConfigError("data.transforms", self.kinds, f"{kind} needs {domain}, but {name} has "
                                                                 f"{int(outside.sum())} values outside (e.g. "
                                                                 f"{values[outside][0]:g}); choose another "
                                                                 f"transform for it")

    def _elementwise(self, events: np.ndarray, mask: np.ndarray | None, table) -> np.ndarray:
        out = np.asarray(events, dtype=np.float64).copy()
        real = np.broadcast_to(_real(mask, out.shape), out.shape)
        for i, kind in enumerate(self.kinds):
            if kind == "fraction":
                shares = _shares_forward if table is _FORWARD else _shares_inverse
                out[:, i] = shares(out[:, i], real[:, i], self.ceilings[i])
            elif kind != "none":
                column, where = out[:, i], real[:, i]
                column[where] = table[kind](column[where])
        return np.where(real, out, 0.0)

    def forward(self, events: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Data units → model space (float32); padded particles 0."""
        transformed = self.scaler.transform(self._elementwise(events, mask, _FORWARD))
        return np.where(_real(mask, events.shape), transformed, 0).astype(np.float32)

    def inverse(self, values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Model space → data units (float32); padded particles 0."""
        unscaled = self.scaler.inverse(values).astype(np.float64)
        with np.errstate(over="ignore"):  # exp of a huge generated value: inf, reported by the metrics' checks
            return self._elementwise(unscaled, mask, _INVERSE).astype(np.float32)


TRANSFORMS = ("none", "log", "logit", "fraction")


def _shares_forward(shares: np.ndarray, real: np.ndarray, ceiling: float) -> np.ndarray:
    """(N, P) shares of their jets -> additive log-ratios against the room below ``ceiling`` (padded slots 0)."""
    shares = np.where(real, shares, 0.0)
    room = np.maximum(ceiling - shares.sum(axis=1, keepdims=True), _ROOM * ceiling)
    with np.errstate(divide="ignore"):
        return np.where(real, np.log(np.where(real, shares, 1.0)) - np.log(room), 0.0)


def _shares_inverse(ratios: np.ndarray, real: np.ndarray, ceiling: float) -> np.ndarray:
    """(N, P) log-ratios -> shares: ``ceiling`` times the softmax of (0, y_1, …, y_n) over the jet's real
    particles and the room, its first entry dropped; computed from the largest exponent, so no jet overflows."""
    ratios = np.where(real, ratios, -np.inf)
    top = np.maximum(ratios.max(axis=1, keepdims=True), 0.0)
    weights = np.exp(ratios - top)
    total = np.exp(-top) + weights.sum(axis=1, keepdims=True)
    return np.where(real, ceiling * weights / total, 0.0)


@dataclass
class Scaler:
    """Per-feature affine map x -> (x - shift) / scale; the identity when standardization is off.

    Fitted on the training set only, so held-out events never leak into the model. Works for any number of
    features F; both directions compute in float64 and round once to float32, so ``inverse(transform(x))``
    equals ``x`` to about one float32 ulp of ``max(|x|, |x - shift|)``.
    """

    shift: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)

    @classmethod
    def identity(cls, n_features: int) -> Scaler:
        return cls(np.zeros(n_features), np.ones(n_features))

    @classmethod
    def fit(cls, events: np.ndarray, mask: np.ndarray | None = None) -> Scaler:
        """Mean and std of each feature, pooled over events and (real, where ``mask`` (N, P) says) particles;
        a constant feature keeps scale 1."""
        if mask is None:
            shift = events.mean(axis=(0, 2), dtype=np.float64)
            scale = events.std(axis=(0, 2), dtype=np.float64)
        else:
            pooled = np.moveaxis(np.asarray(events, dtype=np.float64), 1, 0)[:, mask]  # (F, real particles)
            shift, scale = pooled.mean(axis=1), pooled.std(axis=1)
        return cls(shift, np.where(scale > 0, scale, 1.0))

    def transform(self, events: np.ndarray) -> np.ndarray:
        return ((events - self.shift[:, None]) / self.scale[:, None]).astype(np.float32)

    def inverse(self, events: np.ndarray) -> np.ndarray:
        return (events * self.scale[:, None] + self.shift[:, None]).astype(np.float32)
