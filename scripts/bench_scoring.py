"""How long a result row's scoring takes (:func:`flowvae.metrics.row.score_row`), and, given an older checkout, how
much faster this code is than that one on the same jets, with the same row to the last bit.

Rows: ``jetnet`` with a truth set (its floors: the truth row) and ``scaled`` (its floors: two halves of the
reference, and ``fpd_floor_fd``), both with kinematics (0, 1, 2) and the mask. The jets: ``--data``, a
JetNet-layout file (``particle_features`` (N, P, 4): etarel, phirel, ptrel, mask), by default the test slice of
400 gluon jets; its first ``--n`` jets are the reference, the next ``--n`` the truth set, the next ``--n``, their
angles smeared by 0.01 and pT scaled by 1.05, the generated (fewer where the file has fewer than 3 × ``--n``).

Each code (this checkout, and ``--before``'s, e.g. made by ``git worktree add ../before <commit>``) scores in a
process of its own, which loads the jets once; the two take turns, ``--repeats`` times per protocol, their order
alternating, so a load that comes and goes on a shared machine moves both alike. A figure is the median over the
repeats (wall time and the process's CPU time). The rows of the two codes are compared column by column, exactly.

    python scripts/bench_scoring.py                                       # the test slice, this code alone
    python scripts/bench_scoring.py --data gluon_30p.npz --n 5000 --before ../before --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as flowvae's CLI: spinning threads stall on a shared machine

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "gluon_30p_slice.npz"
PROTOCOLS = ("jetnet", "scaled")


def jet_sets(path: Path, n: int) -> dict[str, tuple]:
    """The reference, truth and generated (events (N, 3, P), mask (N, P)) of ``path``, ``n`` jets each or a third
    of the file's where it has fewer."""
    import numpy as np

    raw = np.load(path)["particle_features"].astype(np.float64).transpose(0, 2, 1)
    n = min(n, len(raw) // 3)
    events, mask = np.ascontiguousarray(raw[:, :3]), raw[:, 3].copy()
    generated = events[2 * n:3 * n].copy()
    generated[:, :2] += np.random.default_rng(1).normal(0, 0.01, generated[:, :2].shape)
    generated[:, 2] *= 1.05
    generated *= mask[2 * n:3 * n, None, :]
    return {"reference": (events[:n], mask[:n]), "truth": (events[n:2 * n], mask[n:2 * n]),
            "generated": (generated, mask[2 * n:3 * n])}


def worker(code: Path, data: Path, n: int, threads: int | None) -> None:
    """Score a row for each protocol named on stdin with ``code``'s flowvae; a JSON line per row on stdout."""
    sys.path.insert(0, str(code))
    from threadpoolctl import threadpool_limits

    from flowvae.metrics.row import score_row

    if not Path(score_row.__code__.co_filename).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"bench_scoring: {code} did not provide flowvae (got {score_row.__code__.co_filename})")
    sets = jet_sets(data, n)
    print(json.dumps({"jets": len(sets["reference"][0])}), flush=True)
    for line in sys.stdin:
        protocol = line.strip()
        truth = sets["truth"] if protocol == "jetnet" else None
        with threadpool_limits(limits=threads):
            started, cpu_started = time.perf_counter(), time.process_time()
            row = score_row(*sets["generated"], *sets["reference"], (0, 1, 2), seed=0, protocol=protocol,
                            truth=truth)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        print(json.dumps({"seconds": seconds, "cpu": cpu, "row": {k: float(v) for k, v in row.items()}}), flush=True)


class Code:
    """A worker process scoring with one checkout's flowvae."""

    def __init__(self, name: str, code: Path, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--worker", str(code), "--data", str(args.data), "--n", str(args.n)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.name, self.times = name, {p: [] for p in args.protocols}
        self.cpu = {p: [] for p in args.protocols}
        self.rows: dict[str, dict] = {}
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.jets = self._answer()["jets"]

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"bench_scoring: the {self.name} worker ended (exit code {self.process.wait()})")
        return json.loads(line)

    def score(self, protocol: str) -> None:
        self.process.stdin.write(protocol + "\n")
        self.process.stdin.flush()
        answer = self._answer()
        self.times[protocol].append(answer["seconds"])
        self.cpu[protocol].append(answer["cpu"])
        self.rows[protocol] = answer["row"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def differing(one: dict, other: dict) -> list[str]:
    """The columns whose values differ in any bit (repr round-trips a float exactly), or the columns' names."""
    if list(one) != list(other):
        return ["<the columns differ>"]
    return [column for column in one if repr(one[column]) != repr(other[column])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="JetNet-layout .npz (default: the test slice)")
    parser.add_argument("--n", type=int, default=5000, help="jets per set (default 5,000)")
    parser.add_argument("--before", type=Path, help="an older checkout to compare with (its flowvae/ is imported)")
    parser.add_argument("--repeats", type=int, default=3, help="rows per protocol and code; the median is reported")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated (default jetnet,scaled)")
    parser.add_argument("--threads", type=int, help="BLAS threads (default: numpy's own)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.data, args.n, args.threads)
        return 0
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.data.exists():
        print(f"bench_scoring: no such file {args.data}", file=sys.stderr)
        return 2
    from flowvae.cores import cpu_name

    codes = [Code("after", ROOT, args)]
    if args.before:
        codes.insert(0, Code("before", args.before, args))
    print(f"{cpu_name()}; {args.data.name}: {codes[0].jets} generated, reference and truth jets; "
          f"BLAS threads: {args.threads or 'default'}; {args.repeats} repeats")
    for repeat in range(args.repeats):
        for protocol in args.protocols:
            for code in codes if repeat % 2 == 0 else codes[::-1]:
                code.score(protocol)
                print(f"  {protocol} {code.name}: {code.times[protocol][-1]:.2f} s", flush=True)
    for code in codes:
        code.close()
    for protocol in args.protocols:
        figures = "  ".join(f"{code.name} {statistics.median(code.times[protocol]):.2f} s "
                            f"(CPU {statistics.median(code.cpu[protocol]):.2f} s)" for code in codes)
        line = f"{protocol}: {figures}"
        if args.before:
            before, after = codes
            ratio = statistics.median(before.times[protocol]) / statistics.median(after.times[protocol])
            moved = differing(before.rows[protocol], after.rows[protocol])
            line += (f"  before/after {ratio:.2f}  rows: "
                     + ("identical" if not moved else f"DIFFER in {', '.join(moved)}"))
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
