"""Files a run writes whole or not at all, locks that leave no file behind, and where a user's path points.
Standard library only."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["replaced", "resolve_path", "RunFiles", "Lock", "LockTimeout", "locked"]


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
    def prior(self) -> Path:
        """A two-stage prior (``prior=two_stage``, ``flowvae fit-prior``): the flow fitted to the training events'
        latent codes, its settings and its fit; what generating from this run draws z from."""
        return self.root / "prior.pt"

    @property
    def latent(self) -> Path:
        """Each latent dimension's aggregate posterior (held-out events' codes) against the generating prior."""
        return self.root / "latent.png"

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
        """Held while a run works in this directory, so two runs never share it (:class:`Lock`: there only while
        held)."""
        return self.root / ".flowvae.lock"

    @property
    def group_training(self) -> Path:
        """A stacked group's training of this run's seed (``hydra/launcher=stacked``): ``{"seconds": its share of
        the group's wall time, "group_seconds", "seeds"}``, added to the row's ``wall_seconds``, then removed."""
        return self.root / "group_training.json"

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


class LockTimeout(TimeoutError):
    """The lock was held by another process (or thread) for longer than the caller would wait."""


class Lock:
    """An exclusive lock on the file ``path`` (``flock``), which exists only while the lock is held: the holder
    removes it before it lets go, so finished work leaves no lock files behind.

    Removing a lock file others may wait on is safe here because a file is only ever removed by its holder, and
    a lock won on a file that is no longer at ``path`` (its holder removed it while this one waited on the open
    file) counts for nothing: the waiter opens ``path`` again, making a new file, and competes for that. So
    whoever holds a lock holds it on the file at ``path``, and two never hold it at once. ``remove_folder``: also
    remove the lock's folder on release when that leaves it empty (a waiter that finds it gone makes it again).
    Process- and thread-safe (each acquire opens its own file description); not re-entrant.
    """

    def __init__(self, path: str | os.PathLike, remove_folder: bool = False):
        self.path = Path(path)
        self.remove_folder = remove_folder
        self._fd: int | None = None

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float | None = None, poll: float = 0.05, check: Callable[[], None] | None = None
                ) -> bool:
        """Take the lock, waiting at most ``timeout`` seconds (None: as long as it takes; 0: one try) and
        calling ``check()`` between tries (it raises to stop waiting). Returns whether it had to wait; raises
        :class:`LockTimeout` when the time ran out, OSError when the file cannot be made or locked."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this Lock")
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                waited = True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise LockTimeout(f"{self.path} is held by another process") from None
                if check is not None:
                    check()
                time.sleep(poll if left is None else min(poll, left))
                continue
            except BaseException:
                os.close(fd)
                raise
            if self._names(fd):
                self._fd = fd
                return waited
            os.close(fd)  # won on a file its holder removed before letting go: the lock is the file at path now

    def _open(self) -> int:
        for _ in range(100):
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:  # the folder went with its last lock (remove_folder): make it again
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except FileExistsError:  # made, then removed by a holder's release between mkdir's two looks
                    pass
        return os.open(self.path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)  # or say why not

    def _names(self, fd: int) -> bool:
        """Whether ``path`` is the file ``fd`` has open."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then let go of the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._names(fd):  # always, unless someone removed it by hand
                self.path.unlink()
        finally:
            os.close(fd)
        if self.remove_folder:
            try:
                self.path.parent.rmdir()
            except OSError:  # not empty (another lock, an entry), or gone already
                pass


@contextmanager
def locked(path: str | os.PathLike, timeout: float | None = None, poll: float = 0.05,
           check: Callable[[], None] | None = None, remove_folder: bool = False) -> Iterator[bool]:
    """Hold the :class:`Lock` of ``path`` for the block (``timeout``, ``poll``, ``check`` as
    :meth:`Lock.acquire`); yields whether it had to wait. The lock file is gone when the block ends."""
    lock = Lock(path, remove_folder)
    waited = lock.acquire(timeout, poll, check)
    try:
        yield waited
    finally:
        lock.release()
