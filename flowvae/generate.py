"""``flowvae generate RUN_DIR --n N --out FILE``: N new events from a finished run's model, streamed to a file;
``--source heldout``: the run's held-out events, the reference it was scored against.

The run is rebuilt from its directory: the composed config (``.hydra/config.yaml``), the data it was trained on
(relative paths from where the run was launched, ``hydra.runtime.cwd``), the same feature transforms and scaler
(fitted again on the same training events: deterministic), and the weights of ``checkpoint.pt``. Events are
generated in model space exactly as a run generates its own (:func:`flowvae.experiment.generate_events`), mapped
back to the data's units (transforms and scaler inverted) and written in the data's own layout: (N, F, P), or
(N, P, F) for ``data.layout=particles_first``, float32, with the 0/1 particle mask back at ``data.mask_feature``
on the feature axis when the data has one — what ``generated_sample.npy`` holds and what ``flowvae score`` reads
with the data's flags.

Files:

* ``.npy``: that one array.
* ``.npz``: that array under the data's own array name (``data.key``, e.g. ``particle_features`` for JetNet
  files, so ``flowvae score gen.npz jets.npz --key particle_features ...`` reads both; ``events`` when the data has
  no key), and, when the data has a mask, ``mask``: the same mask once more as (N, P) booleans, True for a real
  particle. Stored uncompressed, as ``numpy.savez`` does.

Random streams: ``--seed S`` draws what a run with ``seed=S`` draws when it generates: one ``torch.Generator``
seeded ``S + 1`` on the device, consumed block after block of :data:`flowvae.experiment.GENERATE_BATCH` events
(per block: the latents — N(0, I) for the prior, q0's noise for the held-out events ``i mod n_test`` for the
posterior —, then the decoder's sample noise, then the multiplicity draw). The events are a function of the run,
the seed, the source, the read-out and N (and, as for training, of the device and the torch build; thread counts
can differ at rounding level); whole blocks are shared: the first k blocks of any N of at least k blocks are the
same events. With the run's own settings (the defaults of ``--seed``, ``--source`` and ``--decode``) and ``--n``
equal to its ``eval.n_samples``, the first 1000 events equal the run's ``generated_sample.npy``. Posterior events
beyond the number held out reuse them (N events from n_test posteriors, not N independent ones): a warning says so.

``--source heldout`` writes the events the run held out and scored its generated events against (all of them, or
the first N with ``--n``), in the same units, layout, mask and file format as generated events, as float32 (what
was scored): ``flowvae score GEN HELDOUT`` with the data's flags scores any generator against exactly the run's
reference, and scoring the run's own events this way gives its row's numbers. They are the run's data, rebuilt
from its config (``data.seed`` draws the toys and splits a file): no model, so no checkpoint is needed.

A run whose training did not finish (its checkpoint is before ``train.epochs``, or inside an epoch: interrupted,
diverged, or still training) is refused unless ``--allow-unfinished``; a checkpoint whose recorded config hash is
not that of ``.hydra/config.yaml`` is always refused.

Memory: one block of events at a time (its values, mask and their float64 inverse), plus the model and the run's
data (needed to fit the feature map; the posterior also keeps the held-out events on the device): nothing grows
with N. Both formats are written as a stream of blocks through a plain file handle (no memory map, whose dirty
pages would count against the process); a ``.npz`` streams its events entry into the zip archive and spools the
mask to a temporary file beside the output, copied in at the end. The file is written under a temporary name and
renamed when complete, so an interrupted command (SIGTERM or Ctrl-C: exit 3) leaves no half file.

Exit codes: 0 written, 1 the write failed (e.g. the disk is full), 2 a bad argument or run directory (one line on
stderr), 3 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from flowvae import stopping
from flowvae.config import DECODES, DEVICES, SOURCES, ConfigError
from flowvae.files import RunFiles, replaced, resolve_path

__all__ = ["main", "GenerateError", "Run", "load_run", "run_launch_dir", "file_blocks", "held_out_blocks",
           "write_events", "SUFFIXES", "NPZ_EVENTS", "NPZ_MASK", "HELDOUT"]

SUFFIXES = (".npy", ".npz")
NPZ_EVENTS = "events"  # the events' name in a .npz when the data has no array name of its own
NPZ_MASK = "mask"  # the (N, P) boolean mask in a .npz, when the data has one
HELDOUT = "heldout"  # --source: the run's held-out events, not generated ones
_COPY_BUFFER = 1 << 20
_PROG = "flowvae generate"


class GenerateError(Exception):
    """Something the user can fix (a flag, the run directory, the output path): one line, exit code 2."""


class _WriteFailed(Exception):
    """The output could not be written (e.g. the disk filled up): one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (a GenerateError), not a usage block."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise GenerateError(f"{message} ({_PROG} --help)")


def _count(text: str) -> int:
    """An event count: an integer >= 1, written as 1000000, 1_000_000 or 1e6."""
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid count {text!r}: an integer >= 1, e.g. 10000 or 1e6") from None
        if not math.isfinite(number) or number != int(number):
            raise argparse.ArgumentTypeError(f"invalid count {text!r}: a whole number of events") from None
        value = int(number)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: at least 1 event")
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r}: an integer >= 0 (0: this process's cores)")
    return value


def _parse_args(args: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog=_PROG,
        description="Generate N events with a trained run's model and write them, in the data's own units and "
                    "layout (the mask at data.mask_feature when the data has one), to a .npy or .npz file that "
                    "`flowvae score` reads. Events are generated and written in blocks: memory does not grow "
                    "with N. The same run, seed, source, decode and N give the same file.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `flowvae train` (hydra.run.dir)")
    parser.add_argument("--n", type=_count, default=None, metavar="N",
                        help="events to generate (e.g. 10000, 1e6); with --source heldout the first N held-out "
                             "events (default: all)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help=".npy (the events) or .npz (the events under the data's array name, or 'events', "
                             "and 'mask' (N, P) when the data has a mask)")
    parser.add_argument("--source", choices=(*SOURCES, HELDOUT), default=None,
                        help="prior: z ~ N(0, I); posterior: held-out events through q0 and the flows, cycled "
                             "(default: the run's eval.source); heldout: not generated, the run's held-out events "
                             "themselves, the reference its row was scored against")
    parser.add_argument("--decode", choices=DECODES, default=None,
                        help="sample: x ~ p(x|z); mean: the decoder's mean (default: the run's eval.decode)")
    parser.add_argument("--seed", type=int, default=None,
                        help="generation seed, as the run's `seed` (default: the run's seed, which reproduces its "
                             "own generated events)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto (CUDA when available), cpu, cuda")
    parser.add_argument("--threads", type=_threads, default=0, metavar="T",
                        help="torch threads (default 0: the cores this process may use)")
    parser.add_argument("--progress", choices=("auto", "bar", "none"), default="auto",
                        help="auto: a progress bar when stderr is a terminal (default); bar: always; none: never")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="generate from a run whose training did not finish (its last checkpoint)")
    return parser.parse_args(args)


# --- the run -------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A trained run rebuilt from its directory: config, events, feature map and the model on its device."""

    cfg: Any  # DictConfig
    events: Any  # flowvae.data.Events
    feature_map: Any  # flowvae.transforms.FeatureMap
    model: Any  # flowvae.model.FlowVAE, in eval mode
    device: Any  # torch.device
    epoch: int  # epochs in the checkpoint
    root: Path  # the run directory
    history: list  # the checkpoint's per-epoch losses

    @property
    def has_mask(self) -> bool:
        return self.events.train_mask is not None

    @property
    def layout(self) -> str:
        return _layout(self.cfg)

    def test_input(self, source: str):
        """The held-out events as the model's input on its device, which posterior generation encodes; for the
        prior an empty tensor (generation asks it for its device only)."""
        import torch

        from flowvae.experiment import model_input

        if source != "posterior":
            return torch.empty(0, device=self.device)
        events = self.events
        return model_input(self.feature_map.forward(events.test, events.test_mask), self.device, events.test_mask)

    def file_shape(self, n: int) -> tuple[int, int, int]:
        """The shape of N events as the data's file holds them (the mask feature included)."""
        return file_shape(self.events, self.layout, n)


def _layout(cfg) -> str:
    return cfg.data.get("layout") or "features_first"


def file_shape(events, layout: str, n: int) -> tuple[int, int, int]:
    """The shape of N of ``events`` (:class:`flowvae.data.Events`) as the data's file holds them, in ``layout``
    (the mask feature included)."""
    n_features = events.n_features + (1 if events.train_mask is not None else 0)
    return (n, events.n_particles, n_features) if layout == "particles_first" else (n, n_features, events.n_particles)


def _run_config(files: RunFiles):
    """The run's composed config, merged onto the schema (keys added since get their defaults), and the hash of
    the config as written (what the checkpoint records)."""
    from omegaconf import OmegaConf

    from flowvae.config import with_schema_defaults
    from flowvae.experiment import checkpoint_key

    path = files.config
    if not path.is_file():
        hint = ""
        if any(RunFiles(child).config.is_file() for child in files.root.iterdir() if child.is_dir()):
            hint = " (it looks like a sweep directory: name one of its runs, e.g. its subdirectory 0)"
        raise GenerateError(f"{files.root} is not a run directory of `flowvae train`: it has no .hydra/config.yaml"
                            f"{hint}")
    try:
        written = OmegaConf.load(path)
        return with_schema_defaults(written), checkpoint_key(written)
    except Exception as err:  # noqa: BLE001 - any unreadable config is the user's directory, not a bug
        raise GenerateError(f"{path}: not a readable run config ({type(err).__name__}: {err})") from None


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
        raise GenerateError(f"{files.root} has no checkpoint.pt: its training never finished an epoch")
    try:
        state = torch.load(files.checkpoint, map_location="cpu", weights_only=True)
        weights, epoch = state["model"], int(state["epoch"])
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        raise GenerateError(f"{files.checkpoint}: not a flowvae checkpoint ({type(err).__name__}: {err})") from None
    recorded = state.get("extra") or {}
    if recorded != key:
        raise GenerateError(f"{files.checkpoint} was written by another config ({recorded}) than the run's "
                            f".hydra/config.yaml ({key}); was the config edited or the checkpoint copied?")
    unfinished = epoch < epochs or state.get("partial") is not None
    if unfinished and not allow_unfinished:
        status = _status(files)
        raise GenerateError(f"{files.root}: training did not finish (checkpoint after epoch {epoch} of {epochs}"
                            f"{status}); pass --allow-unfinished to generate from this checkpoint anyway")
    return {"model": weights, "epoch": epoch, "history": list(state.get("history") or [])}


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
        raise GenerateError(f"{run_dir}: no such run directory" if not root.exists() else
                            f"{run_dir}: not a directory (a run directory of `flowvae train` is)")
    return RunFiles(root)


def _run_events(cfg, files: RunFiles):
    """The run's events, made or read again as the run did (a relative data path from where it was launched)."""
    from flowvae.data import load_events

    try:
        return load_events(cfg.data, _launch_dir(files))
    except ConfigError as err:
        raise GenerateError(f"the run's data cannot be loaded again: {err}") from None


def load_held_out(run_dir: str | os.PathLike):
    """(the run's config, its events (:class:`flowvae.data.Events`)) for its held-out events: no model, no
    checkpoint. Raises :class:`GenerateError` for a directory that is not a run's, or data that is gone."""
    files = _run_files(run_dir)
    cfg, _ = _run_config(files)
    return cfg, _run_events(cfg, files)


def load_run(run_dir: str | os.PathLike, device: str = "auto", allow_unfinished: bool = False) -> Run:
    """Rebuild the trained run in ``run_dir`` on ``device``. Raises :class:`GenerateError` for anything the user
    can fix: not a run directory, no or a foreign checkpoint, unfinished training, data that is gone."""
    from flowvae.experiment import choose_device, fit_feature_map
    from flowvae.model import build_model

    files = _run_files(run_dir)
    root = files.root
    cfg, key = _run_config(files)
    try:
        torch_device = choose_device(device)
    except ConfigError as err:
        raise GenerateError(f"--device {device}: {err.allowed}") from None
    state = _load_checkpoint(files, key, int(cfg.train.epochs), allow_unfinished)
    events = _run_events(cfg, files)
    try:
        feature_map = fit_feature_map(cfg, events)
    except ConfigError as err:
        raise GenerateError(f"the run's data cannot be loaded again: {err}") from None
    n_mask = events.n_particles if events.train_mask is not None else 0
    try:
        model = build_model(events.n_features * events.n_particles, cfg.model, cfg.flow, cfg.n_flows, n_mask)
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GenerateError(f"{files.checkpoint} does not fit the model of the run's config: {first}") from None
    model.to(torch_device).eval()
    return Run(cfg, events, feature_map, model, torch_device, state["epoch"], root, state["history"])


# --- generation ----------------------------------------------------------------------------------------------


def file_blocks(run: Run, n: int, source: str, decode: str, seed: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """N events as the data's file holds them, block by block: (events in the data's units and layout with the
    mask at ``data.mask_feature``, the mask (b, P) bool or None)."""
    from flowvae.data import file_array
    from flowvae.experiment import generate_blocks

    events = run.events
    mask_feature = run.cfg.data.get("mask_feature")
    for values, mask in generate_blocks(run.model, n, source, decode, run.test_input(source), seed,
                                        events.test.shape[1:]):
        values = run.feature_map.inverse(values, mask)
        yield file_array(values, None if mask is None else mask.astype(values.dtype), mask_feature,
                         run.layout), mask


def held_out_blocks(cfg, events, n: int, block: int = 2000) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The first N held-out events as the data's file holds them, block by block, as :func:`file_blocks` gives
    generated ones: (events in the data's units and layout with the mask at ``data.mask_feature``, mask or None)."""
    from flowvae.data import file_array

    for start in range(0, n, block):
        values = events.test[start:min(n, start + block)]
        mask = None if events.test_mask is None else events.test_mask[start:start + len(values)]
        yield file_array(values, None if mask is None else mask.astype(values.dtype), cfg.data.get("mask_feature"),
                         _layout(cfg)), mask


# --- writing -------------------------------------------------------------------------------------------------


def _write_header(handle: IO[bytes], shape: tuple[int, ...], dtype: np.dtype) -> None:
    """The .npy header numpy.save writes for a C-ordered array of ``shape`` and ``dtype``."""
    from numpy.lib import format as npy

    header = {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    try:
        npy.write_array_header_1_0(handle, header)
    except ValueError:  # a header beyond 64 KiB (never for three dimensions): version 2.0, as numpy does
        npy.write_array_header_2_0(handle, header)


def _write_rows(handle: IO[bytes], array: np.ndarray) -> None:
    handle.write(memoryview(np.ascontiguousarray(array)).cast("B"))


def write_events(path: str | os.PathLike, blocks: Iterator[tuple[np.ndarray, np.ndarray | None]],
                 shape: tuple[int, int, int], mask_shape: tuple[int, int] | None = None, *,
                 events_name: str = NPZ_EVENTS, dtype: np.dtype = np.float32,
                 on_block: Callable[[int], None] | None = None) -> None:
    """Stream ``blocks`` of (events, mask) to ``path`` (.npy, or .npz with ``events_name`` and, given
    ``mask_shape``, ``mask``) through a temporary file renamed at the end. Memory: one block."""
    path = Path(path)
    npz = path.suffix.lower() == ".npz"
    if npz and mask_shape is not None and events_name == NPZ_MASK:
        events_name = NPZ_EVENTS
    with replaced(path) as tmp:
        if not npz:
            with open(tmp, "wb") as out:
                _write_header(out, shape, dtype)
                _stream(blocks, out, None, shape, dtype, on_block)
            return
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            spool = tempfile.TemporaryFile(dir=path.parent) if mask_shape is not None else nullcontext()
            with spool as mask_spool:
                with archive.open(f"{events_name}.npy", "w", force_zip64=True) as entry:
                    _write_header(entry, shape, dtype)
                    _stream(blocks, entry, mask_spool, shape, dtype, on_block)
                if mask_shape is not None:
                    mask_spool.seek(0)
                    with archive.open(f"{NPZ_MASK}.npy", "w", force_zip64=True) as entry:
                        _write_header(entry, mask_shape, np.dtype(bool))
                        shutil.copyfileobj(mask_spool, entry, _COPY_BUFFER)


def _stream(blocks, out: IO[bytes], mask_out: IO[bytes] | None, shape: tuple[int, ...], dtype,
            on_block: Callable[[int], None] | None) -> None:
    written = 0
    for events, mask in blocks:
        if events.dtype != dtype or events.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"a block of shape {events.shape} and dtype {events.dtype} in a file of "
                             f"{shape} {np.dtype(dtype)}")
        _write_rows(out, events)
        if mask_out is not None:
            _write_rows(mask_out, mask.astype(bool, copy=False))
        written += len(events)
        if on_block is not None:
            on_block(len(events))
    if written != shape[0]:
        raise ValueError(f"{written} events written into a file of {shape[0]}")


# --- the command ---------------------------------------------------------------------------------------------


def _check_out(out: str) -> Path:
    path = resolve_path(out)
    if path.suffix.lower() not in SUFFIXES:
        raise GenerateError(f"--out {out}: a .npy or .npz file name (the suffix says which)")
    if path.is_dir():
        raise GenerateError(f"--out {out}: is a directory; name a file in it, e.g. {Path(out) / 'generated.npy'}")
    parent = path.parent
    if not parent.is_dir():
        raise GenerateError(f"--out {out}: the directory {parent} does not exist")
    try:  # the one sure test, before any work: create a file there
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise GenerateError(f"--out {out}: cannot write in {parent}: {err.strerror or err}") from None
    return path


def _bar(total: int, mode: str):
    if mode == "none" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="event", unit_scale=True, dynamic_ncols=True)


def _generate(options: argparse.Namespace) -> str:
    out = _check_out(options.out)
    if options.source == HELDOUT:
        return _write_held_out(options, out)
    if options.n is None:
        raise GenerateError(f"the following arguments are required: --n (how many events to generate; only "
                            f"--source {HELDOUT} takes all of them by default)")
    from flowvae.cores import usable_cores
    from flowvae.experiment import configure_torch

    configure_torch(options.threads or usable_cores())
    run = load_run(options.run_dir, options.device, options.allow_unfinished)
    seed = run.cfg.seed if options.seed is None else options.seed
    source = options.source or run.cfg.eval.source
    decode = options.decode or run.cfg.eval.decode
    n = options.n
    seconds = _write(out, file_blocks(run, n, source, decode, seed), run.cfg, run.events, n, options.progress)
    return (f"{n} events ({_described(run.cfg, run.events, n)}; {source}, {decode}, seed {seed}, epoch {run.epoch}) "
            f"written to {out} in {seconds:.1f} s")


def _write_held_out(options: argparse.Namespace, out: Path) -> str:
    """``--source heldout``: the run's held-out events (all, or the first ``--n``), as generated ones are written."""
    for flag in ("decode", "seed"):
        if getattr(options, flag) is not None:
            raise GenerateError(f"--{flag} {getattr(options, flag)}: --source {HELDOUT} writes the run's own held-out "
                                f"events, nothing is generated (leave --{flag} out)")
    cfg, events = load_held_out(options.run_dir)
    held_out = len(events.test)
    n = held_out if options.n is None else options.n
    if n > held_out:
        raise GenerateError(f"--n {n}: the run held out {held_out} events (--source {HELDOUT} writes them, or the "
                            f"first N of them)")
    seconds = _write(out, held_out_blocks(cfg, events, n), cfg, events, n, options.progress)
    return (f"{n} of the run's {held_out} held-out events ({_described(cfg, events, n)}; the reference its row was "
            f"scored against) written to {out} in {seconds:.1f} s")


def _write(out: Path, blocks, cfg, events, n: int, progress: str) -> float:
    """Stream N events' ``blocks`` to ``out`` as the data's file holds them; returns the seconds it took."""
    key = cfg.data.get("key") if cfg.data.name == "npy" else None
    has_mask = events.test_mask is not None
    bar = _bar(n, progress)

    def advance(count: int) -> None:
        if bar is not None:
            bar.update(count)
        stopping.check("while writing; no file was written")

    started = time.perf_counter()
    try:
        write_events(out, blocks, file_shape(events, _layout(cfg), n), (n, events.n_particles) if has_mask else None,
                     events_name=key or NPZ_EVENTS, on_block=advance)
    except OSError as err:
        raise _WriteFailed(f"writing {out} failed, nothing was written: {err}") from None
    finally:
        if bar is not None:
            bar.close()
    return time.perf_counter() - started


def _described(cfg, events, n: int) -> str:
    """The file's shape, layout and mask, as the summary line says them."""
    shape = "x".join(map(str, file_shape(events, _layout(cfg), n)))
    mask = f", the mask at feature {cfg.data.mask_feature}" if events.test_mask is not None else ""
    return f"{shape}, {_layout(cfg)}{mask}"


def main(args: list[str]) -> int:
    """``flowvae generate``: write the events; returns the exit code (0 ok, 1 write failed, 2 bad input, 3
    interrupted)."""
    stopping.install()
    try:
        options = _parse_args(list(args))
        print(_generate(options))
        return 0
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except GenerateError as err:
        print(f"{_PROG}: {err}", file=sys.stderr)
        return 2
    except (stopping.Interrupted, KeyboardInterrupt) as err:
        reason = str(err) or "stopped by a second Ctrl-C; no file was written"
        print(f"{_PROG}: {reason}", file=sys.stderr)
        return 3
    except _WriteFailed as err:
        print(f"{_PROG}: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # reading the run directory or its data
        print(f"{_PROG}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
