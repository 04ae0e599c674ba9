"""A finished run rebuilt from its directory, for the commands that use a trained run without training
(``flowvae generate``, ``flowvae evaluate``).

The run is rebuilt from its directory: the composed config (``.hydra/config.yaml``, merged onto the schema, so keys
added since get their defaults), the data it was trained on (relative paths from where the run was launched,
``hydra.runtime.cwd``), the same feature transforms and scaler (fitted again on the same training events:
deterministic), and the weights of ``checkpoint.pt``, or with validation (``train.val_fraction`` > 0) those of its
best epoch, ``best.pt``, which the run generated from and scored. Its held-out events alone need no model and no
checkpoint (:func:`load_held_out`).

A run whose training did not finish (its checkpoint is before ``train.epochs``, or inside an epoch: interrupted,
diverged, or still training) is refused unless ``allow_unfinished``; a checkpoint whose recorded config hash is
not that of ``.hydra/config.yaml`` is always refused. Everything a user can fix raises :class:`RebuildError`
with one line that says what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowvae.errors import ConfigError
from flowvae.files import RunFiles, resolve_path

__all__ = ["RebuildError", "Run", "data_layout", "file_shape", "load_held_out", "load_run", "run_launch_dir"]


class RebuildError(Exception):
    """A run directory that cannot be rebuilt, for a reason the user can fix; the message says which."""


@dataclass
class Run:
    """A trained run rebuilt from its directory: config, events, feature map and the model on its device."""

    cfg: Any  # DictConfig
    events: Any  # flowvae.data.events.Events
    feature_map: Any  # flowvae.data.transforms.FeatureMap
    model: Any  # flowvae.models.FlowVAE, in eval mode
    device: Any  # torch.device
    epoch: int  # epochs in the checkpoint
    root: Path  # the run directory
    history: list  # the checkpoint's per-epoch losses
    best_epoch: int | None = None  # the epoch whose weights these are (None: the checkpoint's last, ``epoch``)

    @property
    def scored_epoch(self) -> int:
        """The epoch whose weights the model holds: the best validation epoch, else the last one trained."""
        return self.best_epoch if self.best_epoch is not None else self.epoch

    @property
    def has_mask(self) -> bool:
        return self.events.train_mask is not None

    @property
    def layout(self) -> str:
        return data_layout(self.cfg)

    def test_input(self, source: str):
        """The held-out events as the model's input on its device, which posterior generation encodes; for the
        prior an empty tensor (generation asks it for its device only)."""
        import torch

        from flowvae.data.units import model_input

        if source != "posterior":
            return torch.empty(0, device=self.device)
        events = self.events
        return model_input(self.feature_map.forward(events.test, events.test_mask), self.device, events.test_mask)

    def file_shape(self, n: int) -> tuple[int, int, int]:
        """The shape of N events as the data's file holds them (the mask feature included)."""
        return file_shape(self.events, self.layout, n)


def data_layout(cfg) -> str:
    """The layout of the run's data file: ``features_first`` (N, F, P) or ``particles_first`` (N, P, F)."""
    return cfg.data.get("layout") or "features_first"


def file_shape(events, layout: str, n: int) -> tuple[int, int, int]:
    """The shape of N of ``events`` (:class:`flowvae.data.events.Events`) as the data's file holds them, in ``layout``
    (the mask feature included)."""
    n_features = events.n_features + (1 if events.train_mask is not None else 0)
    return (n, events.n_particles, n_features) if layout == "particles_first" else (n, n_features, events.n_particles)


def _run_config(files: RunFiles):
    """The run's composed config, merged onto the schema (keys added since get their defaults), and the hash of
    the config as written (what the checkpoint records)."""
    from omegaconf import OmegaConf

    from flowvae.config import with_schema_defaults
    from flowvae.run.preflight import checkpoint_key

    path = files.config
    if not path.is_file():
        hint = ""
        if any(RunFiles(child).config.is_file() for child in files.root.iterdir() if child.is_dir()):
            hint = " (it looks like a sweep directory: name one of its runs, e.g. its subdirectory 0)"
        raise RebuildError(f"{files.root} is not a run directory of `flowvae train`: it has no .hydra/config.yaml"
                            f"{hint}")
    try:
        written = OmegaConf.load(path)
        return with_schema_defaults(written), checkpoint_key(written)
    except Exception as err:  # noqa: BLE001 - any unreadable config is the user's directory, not a bug
        raise RebuildError(f"{path}: not a readable run config ({type(err).__name__}: {err})") from None


def run_launch_dir(root: Path) -> Path:
    """Where the run in ``root`` was launched: its relative paths (data, results_csv) are taken from there."""
    return _launch_dir(RunFiles(root))


def _launch_dir(files: RunFiles) -> Path:
    """Where the run was launched (its relative data path is taken from there): Hydra's ``runtime.cwd``."""
    from omegaconf import OmegaConf

    if files.hydra.is_file():
        try:
            cwd = OmegaConf.select(OmegaConf.load(files.hydra), "hydra.runtime.cwd")
        except Exception:  # noqa: BLE001 - fall back to the working directory
            cwd = None
        if cwd:
            return Path(cwd)
    return Path.cwd()


def _load_checkpoint(files: RunFiles, key: dict, epochs: int, allow_unfinished: bool) -> dict:
    import torch

    if not files.checkpoint.is_file():
        raise RebuildError(f"{files.root} has no checkpoint.pt: its training never finished an epoch")
    try:
        state = torch.load(files.checkpoint, map_location="cpu", weights_only=True)
        weights, epoch = state["model"], int(state["epoch"])
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise RebuildError(f"{files.checkpoint}: not a flowvae checkpoint ({type(err).__name__}: {err})") from None
    recorded = state.get("extra") or {}
    if recorded != key:
        raise RebuildError(f"{files.checkpoint} was written by another config ({recorded}) than the run's "
                            f".hydra/config.yaml ({key}); was the config edited or the checkpoint copied?")
    validation = state.get("validation") or {}
    unfinished = (epoch < epochs and not validation.get("stopped")) or state.get("partial") is not None
    if unfinished and not allow_unfinished:
        status = _status(files)
        raise RebuildError(f"{files.root}: training did not finish (checkpoint after epoch {epoch} of {epochs}"
                            f"{status}); pass --allow-unfinished to generate from this checkpoint anyway")
    best_epoch = int(validation["best_epoch"]) if validation.get("best_epoch") else None
    if best_epoch is not None:
        weights = _best_weights(files, key, best_epoch)
    return {"model": weights, "epoch": epoch, "history": list(state.get("history") or []), "best_epoch": best_epoch}


def _best_weights(files: RunFiles, key: dict, best_epoch: int) -> dict:
    """The weights of the run's best validation epoch, from ``best.pt``, checked against the checkpoint's record."""
    import torch

    try:
        state = torch.load(files.best, map_location="cpu", weights_only=True)
        weights, epoch, recorded = state["model"], int(state["epoch"]), state.get("extra") or {}
    except Exception as err:  # noqa: BLE001 - missing, damaged or foreign
        raise RebuildError(f"{files.best}: the weights of the best validation epoch ({best_epoch}) cannot be read "
                            f"({type(err).__name__}: {err})") from None
    if epoch != best_epoch or recorded != key:
        raise RebuildError(f"{files.best} holds epoch {epoch} of config {recorded}, not the checkpoint's best "
                            f"validation epoch {best_epoch} of {key}: copied from another run, or written after the "
                            f"last checkpoint (rerun the run's command to resume it)")
    return weights


def _status(files: RunFiles) -> str:
    import json

    try:
        status = json.loads(files.status.read_text())
    except (OSError, ValueError):
        return ""
    message = status.get("message") or ""
    return f"; status {status.get('status')}" + (f": {message}" if message else "")


def _run_files(run_dir: str | os.PathLike) -> RunFiles:
    root = resolve_path(str(run_dir))
    if not root.is_dir():
        raise RebuildError(f"{run_dir}: no such run directory" if not root.exists() else
                            f"{run_dir}: not a directory (a run directory of `flowvae train` is)")
    return RunFiles(root)


def _run_events(cfg, files: RunFiles):
    """The run's events, made or read again as the run did (a relative data path from where it was launched)."""
    from flowvae.data.events import load_events

    try:
        return load_events(cfg.data, _launch_dir(files))
    except ConfigError as err:
        raise RebuildError(f"the run's data cannot be loaded again: {err}") from None


def load_held_out(run_dir: str | os.PathLike):
    """(the run's config, its events (:class:`flowvae.data.events.Events`)) for its held-out events: no model, no
    checkpoint. Raises :class:`RebuildError` for a directory that is not a run's, or data that is gone."""
    files = _run_files(run_dir)
    cfg, _ = _run_config(files)
    return cfg, _run_events(cfg, files)


def load_run(run_dir: str | os.PathLike, device: str = "auto", allow_unfinished: bool = False) -> Run:
    """Rebuild the trained run in ``run_dir`` on ``device``. Raises :class:`RebuildError` for anything the user
    can fix: not a run directory, no or a foreign checkpoint, unfinished training, data that is gone."""
    from flowvae.models import build_model
    from flowvae.run.preflight import choose_device, fit_feature_map

    files = _run_files(run_dir)
    root = files.root
    cfg, key = _run_config(files)
    try:
        torch_device = choose_device(device)
    except ConfigError as err:
        raise RebuildError(f"--device {device}: {err.allowed}") from None
    state = _load_checkpoint(files, key, int(cfg.train.epochs), allow_unfinished)
    events = _run_events(cfg, files)
    try:
        feature_map = fit_feature_map(cfg, events)
    except ConfigError as err:
        raise RebuildError(f"the run's data cannot be loaded again: {err}") from None
    n_mask = events.n_particles if events.train_mask is not None else 0
    try:
        model = build_model(events.n_features * events.n_particles, cfg.model, cfg.flow, cfg.n_flows, n_mask,
                            events.n_features, cfg.get("prior"))
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RebuildError(f"{files.checkpoint} does not fit the model of the run's config: {first}") from None
    model.to(torch_device).eval()
    if files.prior.exists():  # a two-stage prior (prior=two_stage, flowvae fit-prior): what generation draws from
        from omegaconf import OmegaConf

        from flowvae.config import PriorConfig
        from flowvae.run.two_stage import load_prior

        model.prior, record = load_prior(files.prior, torch_device)
        # the run's rows and identity say which prior generated
        cfg.prior = OmegaConf.merge(OmegaConf.structured(PriorConfig), record["config"])
    return Run(cfg, events, feature_map, model, torch_device, state["epoch"], root, state["history"],
               state["best_epoch"])
