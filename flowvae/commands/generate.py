"""``flowvae generate RUN_DIR --n N --out FILE``: N new events from a finished run's model, streamed to a file;
``--source heldout``: the run's held-out events, the reference it was scored against.

The run is rebuilt from its directory (:mod:`flowvae.run.rebuild`: config, data, feature map, weights). Events are
generated in model space exactly as a run generates its own (:func:`flowvae.models.sampling.generate_events`), mapped
back to the data's units (transforms and scaler inverted) and written in the data's own layout: (N, F, P), or
(N, P, F) for ``data.layout=particles_first``, float32, with the 0/1 particle mask back at ``data.mask_feature``
on the feature axis when the data has one — what ``generated_sample.npy`` holds and what ``flowvae score`` reads
with the data's flags.

Files:

* ``.npy``: that one array.
* ``.npz``: that array under the data's own array name (``data.key``, e.g. ``particle_features`` for JetNet
  files, so ``flowvae score gen.npz jets.npz --key particle_features ...`` reads both; ``events`` when the data has
  no key), and, when the data has a mask, ``mask``: the same mask once more as (N, P) booleans, True for a real
  particle; when the run names its features (``data.feature_names``, one per feature of the file, the mask's
  included), those names as strings, JetNet-style (``particle_feature_names`` beside ``particle_features``, else
  ``feature_names``: :func:`flowvae.commands.score.names_entry`), so that ``flowvae score`` names the features. Stored
  uncompressed, as ``numpy.savez`` does.

Random streams: ``--seed S`` draws what a run with ``seed=S`` draws when it generates: one ``torch.Generator``
seeded ``S + 1`` on the device, consumed block after block of :data:`flowvae.models.sampling.GENERATE_BATCH` events
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

A run whose training did not finish is refused unless ``--allow-unfinished`` (:mod:`flowvae.run.rebuild`).

Memory: one block of events at a time (its values, mask and their float64 inverse), plus the model and the run's
data (needed to fit the feature map; the posterior also keeps the held-out events on the device): nothing grows
with N. Both formats are written as a stream of blocks through a plain file handle (no memory map, whose dirty
pages would count against the process); a ``.npz`` streams its events entry into the zip archive and spools the
mask to a temporary file beside the output, copied in at the end. The file is written under a temporary name and
renamed when complete, so an interrupted command (SIGTERM or Ctrl-C: exit 3) leaves no half file.

Progress (``--progress``, :mod:`flowvae.progress`): on stderr, a bar when it is a terminal, else a log line when
the writing starts, at least every 10 s while it runs and when it is done.

Exit codes: 0 written, 1 the write failed (e.g. the disk is full), 2 a bad argument or run directory (one line on
stderr), 3 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import IO

import numpy as np

from flowvae import progress, stopping
from flowvae.config import DECODES, DEVICES, SOURCES
from flowvae.files import replaced, resolve_path
from flowvae.run.rebuild import RebuildError, Run, data_layout, file_shape, load_held_out, load_run

__all__ = ["main", "GenerateError", "file_blocks", "held_out_blocks", "write_events", "SUFFIXES", "NPZ_EVENTS",
           "NPZ_MASK", "HELDOUT"]

SUFFIXES = (".npy", ".npz")
NPZ_EVENTS = "events"  # the events' name in a .npz when the data has no array name of its own
NPZ_MASK = "mask"  # the (N, P) boolean mask in a .npz, when the data has one
HELDOUT = "heldout"  # --source: the run's held-out events, not generated ones
_COPY_BUFFER = 1 << 20
_PROG = "flowvae generate"

# by name: `python -m flowvae.commands.generate` runs it as __main__
log = logging.getLogger("flowvae.commands.generate")


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
    parser.add_argument("--progress", choices=progress.MODES, default="auto",
                        help="on stderr: auto: a progress bar when stderr is a terminal, else a log line at least "
                             "every 10 s (default); bar: always a bar; log: always log lines; none: nothing")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="generate from a run whose training did not finish (its last checkpoint)")
    return parser.parse_args(args)


# --- generation ----------------------------------------------------------------------------------------------


def file_blocks(run: Run, n: int, source: str, decode: str, seed: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """N events as the data's file holds them, block by block: (events in the data's units and layout with the
    mask at ``data.mask_feature``, the mask (b, P) bool or None)."""
    from flowvae.data.events import file_array
    from flowvae.data.units import data_units
    from flowvae.models.sampling import generate_blocks

    events = run.events
    mask_feature = run.cfg.data.get("mask_feature")
    for values, mask in generate_blocks(run.model, n, source, decode, run.test_input(source), seed,
                                        events.test.shape[1:]):
        values = data_units(run.feature_map, values, mask, run.events.kinematics)
        yield file_array(values, None if mask is None else mask.astype(values.dtype), mask_feature,
                         run.layout), mask


def held_out_blocks(cfg, events, n: int, block: int = 2000) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The first N held-out events as the data's file holds them, block by block, as :func:`file_blocks` gives
    generated ones: (events in the data's units and layout with the mask at ``data.mask_feature``, mask or None)."""
    from flowvae.data.events import file_array

    for start in range(0, n, block):
        values = events.test[start:min(n, start + block)]
        mask = None if events.test_mask is None else events.test_mask[start:start + len(values)]
        yield file_array(values, None if mask is None else mask.astype(values.dtype), cfg.data.get("mask_feature"),
                         data_layout(cfg)), mask


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
                 on_block: Callable[[int], None] | None = None, names: Sequence[str] | None = None) -> None:
    """Stream ``blocks`` of (events, mask) to ``path`` (.npy, or .npz with ``events_name``, given
    ``mask_shape`` ``mask``, and given ``names`` the features' names, one per entry of the file's feature axis,
    at :func:`flowvae.commands.score.names_entry`) through a temporary file renamed at the end. Memory: one block."""
    from numpy.lib import format as npy

    from flowvae.commands.score import names_entry

    path = Path(path)
    npz = path.suffix.lower() == ".npz"
    if npz and mask_shape is not None and events_name == NPZ_MASK:
        events_name = NPZ_EVENTS
    names_name = names_entry(events_name)
    if names is not None and names_name in (events_name, NPZ_MASK if mask_shape is not None else None):
        names = None  # nowhere to put them that the events or the mask do not take
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
            if names is not None:
                with archive.open(f"{names_name}.npy", "w") as entry:
                    npy.write_array(entry, np.array([str(name) for name in names]), allow_pickle=False)


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


def _generate(options: argparse.Namespace) -> str:
    out = _check_out(options.out)
    if options.source == HELDOUT:
        return _write_held_out(options, out)
    if options.n is None:
        raise GenerateError(f"the following arguments are required: --n (how many events to generate; only "
                            f"--source {HELDOUT} takes all of them by default)")
    from flowvae.cores import usable_cores
    from flowvae.run.preflight import configure_torch

    configure_torch(options.threads or usable_cores())
    run = load_run(options.run_dir, options.device, options.allow_unfinished)
    seed = run.cfg.seed if options.seed is None else options.seed
    source = options.source or run.cfg.eval.source
    decode = options.decode or run.cfg.eval.decode
    n = options.n
    seconds = _write(out, file_blocks(run, n, source, decode, seed), run.cfg, run.events, n,
                     f"generating {n} events ({source}, {decode}, seed {seed}) into {out.name}")
    return (f"{n} events ({_described(run.cfg, run.events, n)}; {source}, {decode}, seed {seed}, "
            f"{_weights(run)}) "
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
    seconds = _write(out, held_out_blocks(cfg, events, n), cfg, events, n,
                     f"writing {n} held-out events into {out.name}")
    return (f"{n} of the run's {held_out} held-out events ({_described(cfg, events, n)}; the reference its row was "
            f"scored against) written to {out} in {seconds:.1f} s")


def _write(out: Path, blocks, cfg, events, n: int, what: str) -> float:
    """Stream N events' ``blocks`` to ``out`` as the data's file holds them, as a progress phase that says
    ``what`` it does; returns the seconds it took."""
    key = cfg.data.get("key") if cfg.data.name == "npy" else None
    has_mask = events.test_mask is not None
    names = cfg.data.get("feature_names")  # the file's features, the mask's included (data.npy checks the count)
    started = time.perf_counter()
    try:
        with progress.phase(what, n, "events", logger=log) as step:

            def advance(count: int) -> None:
                step.advance(count)
                stopping.check("while writing; no file was written")

            mask_shape = (n, events.n_particles) if has_mask else None
            write_events(out, blocks, file_shape(events, data_layout(cfg), n), mask_shape,
                         events_name=key or NPZ_EVENTS, on_block=advance,
                         names=None if names is None else list(names))
    except OSError as err:
        raise _WriteFailed(f"writing {out} failed, nothing was written: {err}") from None
    return time.perf_counter() - started


def _weights(run: Run) -> str:
    """Which epoch's weights generated: the best validation epoch's when it is not the last one trained."""
    if run.scored_epoch == run.epoch:
        return f"epoch {run.epoch}"
    return f"epoch {run.scored_epoch}, the best validation epoch of {run.epoch}"


def _described(cfg, events, n: int) -> str:
    """The file's shape, layout and mask, as the summary line says them."""
    shape = "x".join(map(str, file_shape(events, data_layout(cfg), n)))
    mask = f", the mask at feature {cfg.data.mask_feature}" if events.test_mask is not None else ""
    return f"{shape}, {data_layout(cfg)}{mask}"


def main(args: list[str]) -> int:
    """``flowvae generate``: write the events; returns the exit code (0 ok, 1 write failed, 2 bad input, 3
    interrupted)."""
    stopping.install()
    try:
        options = _parse_args(list(args))
        with progress.console(), progress.settings(mode=options.progress):
            print(_generate(options))
        return 0
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except (GenerateError, RebuildError) as err:
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
