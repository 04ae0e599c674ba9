"""Checks before work that need torch, and the torch set-up of a run: the device asked for exists, a checkpoint
in the run directory belongs to this config, and torch's threads are set from the config."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from flowvae.errors import ConfigError
from flowvae.files import RunFiles
from flowvae.identity import train_hash
from flowvae.training.kit import CheckpointMismatch, check_checkpoint

__all__ = ["choose_device", "configure_torch", "checkpoint_key", "preflight"]


log = logging.getLogger(__name__)


def choose_device(name: str) -> torch.device:
    """``train.device`` as a torch device; ``cuda`` without a CUDA device is a :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "cpu or auto: torch sees no CUDA device here (a CPU build of "
                                                "torch, or no GPU visible to this process)")
    return torch.device(name)


def checkpoint_key(cfg: DictConfig) -> dict:
    """What a checkpoint records of its run: the hash of what trains the model (not of how it is scored)."""
    return {"train_hash": train_hash(cfg)}


def preflight(cfg: DictConfig, files: RunFiles) -> None:
    """The checks that need torch but no training: the device, and a checkpoint in the run directory that
    belongs to another config. Raises :class:`ConfigError`, so the run is refused before any work."""
    choose_device(cfg.train.device)
    try:
        check_checkpoint(files.checkpoint, checkpoint_key(cfg))
    except CheckpointMismatch as err:
        raise ConfigError("hydra.run.dir", str(files.root), str(err)) from None


def configure_torch(threads: int) -> None:
    """Threads, deterministic kernels, and subnormal floats flushed to zero, before any tensor work.

    Flushing matters: once the unused latent path's gradients and Adam moments decay below 1e-38 (posterior
    collapse, from about epoch 8 of the default run) every operation on them takes a slow microcode path on x86,
    and a training step became twice as slow. Flushed, they are zero, which changes no result beyond rounding.
    It is set before the thread pool exists, because threads inherit the floating-point mode of their creator.
    """
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
