"""Between data and model space: a run's events as the tensors a model takes (features flattened, padded particles
zeroed, the mask beside them), and generated tensors back in data units (the feature map inverted, particles in the
data's order)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from flowvae.data.events import order_particles
from flowvae.data.transforms import FeatureMap

__all__ = ["data_units", "model_input"]


log = logging.getLogger(__name__)


def data_units(feature_map: FeatureMap, values: np.ndarray, mask: np.ndarray | None,
               kinematics: tuple[int, int, int] | None) -> np.ndarray:
    """Generated events from model space to what a data file holds: the feature map's inverse, then (with jet
    kinematics) each jet's particles ordered by pT, largest first, as in the data (:func:`order_particles`)."""
    events = feature_map.inverse(values, mask)
    return events if kinematics is None else order_particles(events, mask, kinematics[2])


def model_input(events: np.ndarray, device: torch.device | str = "cpu", mask: np.ndarray | None = None
                ) -> torch.Tensor:
    """Events (N, F, P) as the flattened (N, F·P) tensor the model takes, on ``device``; with a mask (N, P),
    the mask follows the values: (N, F·P + P)."""
    flat = events.reshape(len(events), -1)
    if mask is not None:
        flat = np.concatenate([flat, mask.astype(flat.dtype)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(flat)).to(device)
