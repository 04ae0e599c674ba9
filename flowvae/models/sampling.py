"""Drawing events from a trained model: z from the prior or from the posterior of held-out events, decoded as the
mean or a sample of p(x|z), in blocks on the model's own generator (so the same seed gives the same events)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from flowvae.models import FlowVAE

__all__ = ["GENERATE_BATCH", "generate_blocks", "generate_events"]


log = logging.getLogger(__name__)


GENERATE_BATCH = 2000


def generate_blocks(model: FlowVAE, n: int, source: str, decode: str, test_x: torch.Tensor, seed: int,
                    event_shape: tuple[int, int], block: int | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """N events in model space from the prior (``source="prior"``) or the posterior of held-out events
    ``test_x`` (cycled), block by block: (values (b, F, P) float32, mask (b, P) bool or None).

    One generator seeded ``seed + 1`` on the device, so generation never shifts the training's random stream;
    per block of ``block`` (default :data:`GENERATE_BATCH`, read at call time) events it draws the latents,
    then the decoder's sample noise, then the multiplicity. The block size is part of the stream.
    """
    block = GENERATE_BATCH if block is None else block
    if source == "posterior" and n > len(test_x):
        # not wrong, but it bounds what the events can show: the user should know their number is not N
        log.warning("posterior generation: %d events from %d held-out events, each encoded about %.3g times (event i "
                    "from held-out event i mod %d): they are draws from %d posteriors, not %d independent events",
                    n, len(test_x), n / len(test_x), len(test_x), len(test_x), n)
    model.eval()
    device = test_x.device
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for start in range(0, n, block):
            size = min(block, n - start)
            if source == "prior":
                z = model.prior.sample(size, generator, device)  # N(0, I): torch.randn as it always was
            else:
                index = torch.arange(start, start + size, device=device) % len(test_x)
                z = model.posterior_latent(test_x[index], generator)
            flat = model.generate(z, decode, generator).cpu().numpy()
            mask = flat[:, model.n_in:] > 0.5 if model.n_mask else None
            yield flat[:, :model.n_in].reshape(size, *event_shape), mask


def generate_events(model: FlowVAE, cfg_eval: DictConfig, test_x: torch.Tensor, seed: int,
                    event_shape: tuple[int, int], on_block: Callable[[int], None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """``eval.n_samples`` events (N, F, P) in model space and their mask (N, P) bool or None, all at once
    (:func:`generate_blocks` concatenated); ``on_block`` gets each block's event count once it is generated."""
    blocks = []
    for block in generate_blocks(model, cfg_eval.n_samples, cfg_eval.source, cfg_eval.decode, test_x, seed,
                                 event_shape):
        blocks.append(block)
        if on_block is not None:
            on_block(len(block[0]))
    values = np.concatenate([values for values, _ in blocks])
    mask = None if blocks[0][1] is None else np.concatenate([mask for _, mask in blocks])
    return values, mask
