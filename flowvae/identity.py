"""What a run *is*: the settings that make its numbers what they are, defined once.

The config hash, the result row's setting columns, ``skip_existing`` and ``flowvae table``'s mixed-settings
check all come from :func:`run_settings`, so a config key added to the schema is part of a run's identity
without anyone listing it: only the keys below, which say where or how a run writes (not what it computes),
are left out, and with ``n_flows = 0`` the flow is left out (every flow type then trains the bit-identical
plain VAE, so they are one run). The identity splits into what trains the model (:func:`train_hash`, which
keys the checkpoint) and what scores it (``eval.*``, which ``flowvae evaluate`` may change after training).

Setting columns are the config's dotted keys (``train.lr``, ``data.mu``), named as on the command line, plus
``flow`` (the family), ``n_flows`` and ``seed``. Standard library and omegaconf only: the CLI imports this.

What a run is trained on has a short name too, :func:`data_label`: the name of the things grouped by their data
(a search's study, the tracker's experiment).
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flowvae.files import resolve_path

__all__ = ["NOT_IDENTITY", "NEUTRAL", "SCORING_KEYS", "CELL_COLUMNS", "SEED_COLUMN", "run_settings", "run_hash",
           "train_hash", "setting_columns", "is_setting_column", "same_value", "data_label"]

# Where or how a run writes, how fast it goes: these change no number of the row, so they are not its identity.
# train.eval_every belongs here because the test loss has its own random stream: it changes no trained weight.
NOT_IDENTITY = ("results_csv", "skip_existing", "optimize", "logger", "train.threads", "train.progress",
                "train.checkpoint_every", "train.eval_every", "hydra")
# What scores a trained model rather than trains it: changing these needs no training (``flowvae evaluate``).
SCORING_KEYS = ("eval",)
# Settings added after runs existed, at the value that does what every earlier run did: left out of the identity
# there, so earlier runs keep their hashes, rows and checkpoints (a new setting changes the hash only when set).
NEUTRAL = {"prior.name": "standard", "train.ema": 0.0, "train.select_by": "val_loss"}
# A table's cells: one per (flow, n_flows); the seeds inside a cell are what its mean and std are over.
CELL_COLUMNS = ("flow", "n_flows")
SEED_COLUMN = "seed"
# Besides the config's keys, the code's version decides the numbers (a release that changes numbers says so).
VERSION_COLUMN = "flowvae_version"


def _plain(cfg: DictConfig | dict) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else json.loads(json.dumps(cfg))
    for key in NOT_IDENTITY:
        node = data
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return data


def _identity(cfg: DictConfig | dict) -> dict:
    """The nested identity: the resolved config without NOT_IDENTITY, the flow's unset options dropped, the
    flow replaced by ``none`` when n_flows is 0, and a standard prior dropped (N(0, I) is what every run had
    before priors could be chosen: their hashes, rows and checkpoints stay theirs); another prior without its
    unset keys."""
    data = _plain(cfg)
    prior = data.pop("prior", None) or {}
    if prior.get("name", "standard") != NEUTRAL["prior.name"]:
        data["prior"] = {key: value for key, value in prior.items() if value is not None}
    for key, neutral in NEUTRAL.items():
        section, _, leaf = key.partition(".")
        if section != "prior" and leaf in data.get(section, {}) and data[section][leaf] == neutral:
            del data[section][leaf]
    flow = data.get("flow") or {}
    if data.get("n_flows") == 0:
        flow = {"name": "none"}
    data["flow"] = {key: value for key, value in flow.items() if value is not None}
    return data


def run_hash(cfg: DictConfig | dict) -> str:
    """12 hex digits of sha256 over the run's identity: equal configs up to NOT_IDENTITY give equal hashes."""
    text = json.dumps(_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_hash(cfg: DictConfig | dict) -> str:
    """12 hex digits of sha256 over what trains the model: the identity without SCORING_KEYS. A checkpoint is
    keyed by it, so any evaluation of a trained model finds it, and a resumed run only resumes its own training.
    A two-stage prior is fitted after training, to the trained model: it is no part of what trains it."""
    data = _identity(cfg)
    if data.get("prior", {}).get("name") == "two_stage":
        data.pop("prior")
    for key in SCORING_KEYS:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cell(value: Any) -> Any:
    """A setting as one CSV cell: numbers and text as they are, lists as JSON, unset as blank."""
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def run_settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The identity as flat columns: ``flow``, ``n_flows``, ``seed``, then every other key dotted.

    ``{"flow": "planar", "n_flows": 10, "seed": 0, "data.name": "gaussian", "data.mu": 1.0, ...,
    "train.lr": 0.001, ...}``. The flow's own options come as ``flow.<option>``.
    """
    data = _identity(cfg)
    flow = data.pop("flow")
    columns: dict[str, Any] = {"flow": flow.pop("name", "none"), "n_flows": data.pop("n_flows", 0),
                               SEED_COLUMN: data.pop(SEED_COLUMN, 0)}
    columns.update({f"flow.{key}": _cell(value) for key, value in sorted(flow.items())})

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                flatten(f"{prefix}.{key}" if prefix else key, value)
        else:
            columns[prefix] = _cell(node)

    flatten("", data)
    return columns


def is_setting_column(name: str) -> bool:
    """Whether a results-table column is one of a run's settings (as :func:`run_settings` names them)."""
    return "." in name or name in (*CELL_COLUMNS, SEED_COLUMN, VERSION_COLUMN)


def setting_columns(columns) -> list[str]:
    """The setting columns among ``columns``, in their order."""
    return [c for c in columns if is_setting_column(c)]


def same_value(cell: str, wanted: str) -> bool:
    """Whether a CSV cell equals a value a user typed, by type: ``1000`` matches ``1000.0``, ``1e-3`` matches
    ``0.001``, ``true`` matches ``True``; otherwise the text must be equal."""
    if cell == wanted:
        return True
    try:
        a, b = float(cell), float(wanted)
    except ValueError:
        return cell.lower() == wanted.lower() and cell.lower() in ("true", "false")
    return a == b or (math.isnan(a) and math.isnan(b))


def data_label(data: DictConfig | dict, launch_dir: Path | None = None) -> str:
    """A short name of the data a run is trained on: the kind for drawn data (``gaussian``, ``jets``: their
    parameters are settings), and for a file (``data=npy``, ``data=jetnet``) its stem and 8 hex digits of sha256
    over ``data.key``, a newline and the file's bytes, e.g. ``gluon_30p_<8 hex digits>``: every file gets its own
    name, the same file the same name wherever it lies. A file that cannot be read is named by its path instead
    (its runs are refused anyway). A relative ``data.path`` is taken from ``launch_dir``."""
    name = str(data.get("name"))
    if name != "npy" or data.get("path") is None:
        return name
    file = resolve_path(str(data.get("path")), launch_dir)
    try:
        stat = file.stat()
        digest = _file_digest(str(file.resolve()), stat.st_size, stat.st_mtime_ns, str(data.get("key")))
    except OSError:
        digest = hashlib.sha256(f"{data.get('key')}\n{file}".encode()).hexdigest()
    return f"{file.stem}_{digest[:8]}"


@lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int, key: str) -> str:
    """sha256 of ``key``, a newline and a file's bytes; read once per process for each version of the file (its
    size and mtime are in the cache's key)."""
    digest = hashlib.sha256(f"{key}\n".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
