"""Files a run writes whole or not at all, and where a user's path points. Standard library only."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["replaced", "resolve_path", "RunFiles"]


@dataclass(frozen=True)
class RunFiles:
    """The files of one run directory, named in this one place (the job, the experiment, the sweep summary and
    the tests ask here). The run's log, ``train.log``, is named by Hydra's ``hydra.job.name``."""

    root: Path

    @property
    def config(self) -> Path:
        """The composed config as Hydra wrote it: what rebuilds the run."""
        return self.root / ".hydra" / "config.yaml"

    @property
    def overrides(self) -> Path:
        """The command line's overrides, as Hydra wrote them."""
        return self.root / ".hydra" / "overrides.yaml"

    @property
    def hydra(self) -> Path:
        """Hydra's own settings for the run; ``hydra.runtime.cwd`` is where it was launched."""
        return self.root / ".hydra" / "hydra.yaml"

    @property
    def result(self) -> Path:
        """The run's own one-row CSV, every column kept."""
        return self.root / "result.csv"

    @property
    def status(self) -> Path:
        """``{"status", "exit_code", "message"}``: how the run ended, for whoever launched it."""
        return self.root / "status.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def best(self) -> Path:
        """With validation (``train.val_fraction`` > 0): the weights of the epoch with the lowest validation loss,
        the model that is generated from and scored."""
        return self.root / "best.pt"

    @property
    def curves(self) -> Path:
        """Per-epoch losses."""
        return self.root / "training_curves.csv"

    @property
    def histograms(self) -> Path:
        """Each feature's generated vs input histogram."""
        return self.root / "histograms.png"

    @property
    def sample(self) -> Path:
        """The first generated events, in the data's units."""
        return self.root / "generated_sample.npy"

    @property
    def error(self) -> Path:
        """The traceback of a run that failed."""
        return self.root / "error.txt"

    @property
    def tracking(self) -> Path:
        """The experiment tracker's run id (``logger=mlflow``), so a resumed run continues its tracked run."""
        return self.root / "tracking.json"

    @property
    def lock(self) -> Path:
        """Held while a run works in this directory, so two runs never share it."""
        return self.root / ".flowvae.lock"

    def holds_no_work(self) -> bool:
        """Whether the directory holds only what every start writes (Hydra's ``.hydra/`` and log, the status, the
        lock) and nothing a run made: a run that did no work here may remove it (:meth:`discard`)."""
        start = {self.config.parent.name, self.status.name, self.lock.name}
        try:
            return all(p.name in start or (p.suffix == ".log" and p.is_file()) for p in self.root.iterdir())
        except OSError:
            return False

    def discard(self) -> bool:
        """Remove the directory if it holds no work (:meth:`holds_no_work`); whether it did. A run refused, or
        skipped, or gone on in another directory leaves no folder behind: Hydra makes one before the run starts."""
        if not self.holds_no_work():
            return False
        shutil.rmtree(self.root, ignore_errors=True)
        return not self.root.exists()


@contextmanager
def replaced(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed if it raises.

    The rename is atomic, so a reader (or a rerun after a kill) sees the old file or the new one, never half of
    one. The temporary name keeps the suffix (np.save and savefig read it) and has the process id in it, so two
    processes writing the same file do not share a temporary.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_path(path: str, launch_dir: Path | None = None) -> Path:
    """``path`` with ``~`` expanded; a relative one is taken from ``launch_dir`` (default: the working directory)."""
    resolved = Path(os.path.expanduser(path))
    return resolved if resolved.is_absolute() else (launch_dir or Path.cwd()) / resolved
