"""The two-stage prior: a flow fitted by maximum likelihood to latent codes of the training events, after the VAE.

As in the user's ConVAE+NF (Orzari et al., Mach. Learn.: Sci. Technol. 4 (2023) 045023): the trained encoder
gives one posterior draw z_K per training event; a flow prior is fitted to them by maximising Σ log p(z) with
Adam, on a validation split with early stopping, and keeps its best epoch's weights. Everything is seeded: the
split and the batch order by their own generators, the flow's initial weights by the caller (torch's stream
seeded before the prior is built), so the same run fits the same prior, bit for bit.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowvae import stopping
from flowvae.models.priors import Prior

__all__ = ["PriorFit", "fit_prior"]

log = logging.getLogger(__name__)


@dataclass
class PriorFit:
    """What fitting a prior did: per-epoch mean negative log-likelihoods, the best epoch and its validation NLL."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_nll: float = math.inf


def _nll(prior: Prior, codes: Tensor, batch_size: int) -> float:
    with torch.no_grad():
        total = sum(-prior.log_prob(codes[i:i + batch_size]).sum().item() for i in range(0, len(codes), batch_size))
    return total / len(codes)


def fit_prior(prior: Prior, codes: Tensor, *, epochs: int, lr: float, batch_size: int, val_fraction: float,
              patience: int | None, seed: int) -> PriorFit:
    """Fit ``prior`` to ``codes`` (N, D) by maximum likelihood; it ends with its best validation epoch's weights.

    ``val_fraction`` of the codes (drawn by ``seed``) choose the best epoch; ``patience`` epochs without a lower
    validation NLL stop early (None: all ``epochs``)."""
    split = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(codes), generator=split)
    n_val = max(1, int(round(val_fraction * len(codes))))
    val, train = codes[order[:n_val]], codes[order[n_val:]]
    shuffle = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
    outcome, best_state, since_best = PriorFit(), copy.deepcopy(prior.state_dict()), 0
    for epoch in range(1, epochs + 1):
        prior.train()
        batches = torch.randperm(len(train), generator=shuffle).split(batch_size)
        total = 0.0
        for index in batches:
            loss = -prior.log_prob(train[index]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        prior.eval()
        stopping.check(f"while fitting the prior (epoch {epoch}); nothing of it is saved")
        row = {"epoch": epoch, "train_nll": total / len(train), "val_nll": _nll(prior, val, batch_size)}
        outcome.history.append(row)
        log.info("prior epoch %d/%d  train nll %.4f  val nll %.4f", epoch, epochs, row["train_nll"], row["val_nll"])
        if row["val_nll"] < outcome.best_val_nll:
            outcome.best_epoch, outcome.best_val_nll, since_best = epoch, row["val_nll"], 0
            best_state = copy.deepcopy(prior.state_dict())
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                log.info("prior: stopped early after epoch %d, best epoch %d", epoch, outcome.best_epoch)
                break
    prior.load_state_dict(best_state)
    prior.eval()
    return outcome
