"""``flowvae table``: the seed-style table of a results CSV, refusing to average runs of different settings.

Rows n_flows, columns flow types, each cell the mean ± std of a metric over seeds. A cell may only hold runs
that differ in their seed: every other setting column (those :mod:`flowvae.identity` makes, e.g. ``train.lr``,
``data.mu``, ``flow.num_householder``) must have one value in the table, or the command names the columns that
vary and the ``--filter`` that picks one. Cells are read as text (no pandas type guessing: a blank stays
blank on pandas 2 and 3); a filter compares by type (``data.n_train=1000`` matches ``1000.0``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowvae.identity import CELL_COLUMNS, SEED_COLUMN, VERSION_COLUMN, run_settings, same_value, setting_columns
from flowvae.results.plots import plot_table
from flowvae.results.store import REQUIRED_COLUMNS

__all__ = ["TableError", "load_results", "check_one_setting", "seed_table", "format_table", "noise_floor",
           "floor_meaning", "upgrade_results", "main"]

# The 0.2 format's setting columns, replaced by the dotted ones of flowvae.identity (read only by --upgrade).
_OLD_SETTING_COLUMNS = ["data", "data_mu", "data_sigma", "data_offset_sigma", "data_scale_sigma", "data_seed",
                        "n_particles", "n_train", "data_path", "data_key", "test_fraction", "standardize",
                        "likelihood", "sigma_x", "latent_dim", "decode", "source", "epochs", "batch_size", "lr"]


class TableError(ValueError):
    """The results table cannot be made as asked; the message says why and what to pass instead."""


def _read_csv(path: Path):
    """Every cell as text, blanks as ''; a file that is not a flowvae results table raises TableError."""
    import pandas as pd

    if not path.exists():
        raise TableError(f"{path} does not exist; run `flowvae train` first or pass the results CSV's path")
    if path.is_dir():
        raise TableError(f"{path} is a directory; pass the results CSV inside it")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise TableError(f"{path} is not a CSV file flowvae can read ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else 'empty'})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise TableError(f"{path} is not a flowvae results table: it has no column {', '.join(missing)}")
    return table


def _old_rows(table):
    """Rows written before setting columns existed (flowvae < 0.3): none of their dotted columns is filled."""
    dotted = [c for c in table.columns if "." in c]
    if not dotted:
        return table.index
    return table.index[(table[dotted] == "").all(axis=1)]


def load_results(path: Path, filters: dict[str, str] | None = None):
    """The ok rows of a results CSV (the newest row of each config hash), after ``filters``, with ``n_flows``
    as int; and the count of rows left out because they did not finish (failed, diverged)."""
    table = _read_csv(path)
    old = _old_rows(table)
    if len(old):
        raise TableError(f"{path} has {len(old)} rows from flowvae < 0.3, without the setting columns that keep "
                         f"runs of different settings apart; convert it with `flowvae table {path} --upgrade`")
    for key, value in (filters or {}).items():
        if key not in table.columns:
            settings = ", ".join(setting_columns(table.columns))
            raise TableError(f"--filter {key}={value}: no column {key!r}; setting columns: {settings}")
        table = table[[same_value(cell, value) for cell in table[key]]]
    table = table[table["n_flows"] != ""]  # rows of `flowvae score` have no cell of the table
    not_ok = int((table["status"] != "ok").sum())
    table = table[table["status"] == "ok"].drop_duplicates("config_hash", keep="last")
    bad = [v for v in table["n_flows"] if not v.isdigit()]
    if bad:
        raise TableError(f"{path}: n_flows must be a whole number in every ok row, found {bad[0]!r}")
    return table.assign(n_flows=table["n_flows"].astype(int)), not_ok


def check_one_setting(table) -> None:
    """Raise TableError unless the rows differ only in flow, n_flows and seed (a flow's own options may differ
    between families, not within one). The message names what varies and the filter that picks one setting."""
    fixed = {*CELL_COLUMNS, SEED_COLUMN}
    settings = [c for c in setting_columns(table.columns) if c not in fixed]
    varying = {}
    for column in settings:
        values: set[str] = set()
        if column.startswith("flow."):  # a family's option: one value per family (n_flows 0 has no flow)
            for _, group in table[table["n_flows"] > 0].groupby("flow"):
                if group[column].nunique() > 1:
                    values |= set(group[column])
        elif table[column].nunique() > 1:
            values = set(table[column])
        if values:
            varying[column] = sorted(values)
    if varying:
        detail = "; ".join(f"{c} in {[v or '(blank)' for v in values]}" for c, values in varying.items())
        column, values = next(iter(varying.items()))
        raise TableError(f"the rows mix settings other than the seed ({detail}): choose one with --filter, e.g. "
                         f"--filter {column}={values[-1]}")


def _flow_order(flows: list[str]) -> list[str]:
    from flowvae.flows import table_order  # the registry decides the columns' order (the slides')

    order = table_order()
    return sorted(flows, key=lambda f: (order.index(f) if f in order else len(order), f))


def seed_table(table, metric: str):
    """Rows n_flows, columns flow types; each cell (mean, std, count) of ``metric`` over seeds.

    n_flows = 0 is the same plain VAE for every flow type, so its runs fill that row of every column.
    """
    import pandas as pd

    settings = set(setting_columns(table.columns))
    if metric not in table.columns or metric in settings:
        metrics = [c for c in table.columns if c.startswith(("kl_", "w1", "js_", "final_", "noise", "fpd", "kpd"))]
        raise TableError(f"--metric {metric}: no such metric column; choose one of {', '.join(metrics)}")
    table = table.assign(**{metric: pd.to_numeric(table[metric], errors="coerce")})
    flows = _flow_order([f for f in table["flow"].unique() if f != "none"] or ["none"])
    plain = table[table["n_flows"] == 0]
    parts = [table[(table["n_flows"] > 0) & (table["flow"] == f)] for f in flows]
    parts += [plain.assign(flow=f) for f in flows]
    cells = pd.concat(parts).groupby(["n_flows", "flow"])[metric].agg(["mean", "std", "count"])
    return cells, flows


def noise_floor(table, metric: str) -> float | None:
    """The mean noise floor of ``metric`` over the table's rows (``noise_floor`` for kl_sum, ``<metric>_floor``
    for the jet-level metrics), or None when the rows carry none."""
    import pandas as pd

    column = "noise_floor" if metric == "kl_sum" else f"{metric}_floor"
    if column not in table.columns:
        return None
    values = pd.to_numeric(table[column], errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


# The per-feature metrics whose floors the rows carry: always between two halves of the held-out events.
_FEATURE_FLOORS = ("kl_sum", "w1_sum", "js_sum")
_HALVES = "the metric between two halves of the held-out events"


def floor_meaning(table, metric: str) -> str:
    """What the noise floor of ``metric`` in these rows is: the per-feature metrics' floors and the jet-level ones
    under ``eval.protocol=scaled`` are the metric between two halves of the held-out events; the jet-level ones
    under a protocol with a truth row (``jetnet``) are the metric between the held-out and the training jets."""
    from flowvae.metrics.protocol import PROTOCOLS

    if metric in _FEATURE_FLOORS:
        return _HALVES
    protocols = set(table["eval.protocol"]) - {""} if "eval.protocol" in table.columns else set()
    name = protocols.pop() if len(protocols) == 1 else "scaled"  # check_one_setting leaves one; blank: before
    protocol = PROTOCOLS.get(name)
    if protocol is not None and protocol.floor == "truth":
        return f"the metric between the held-out and the training jets: eval.protocol={name}'s truth row"
    return _HALVES


def _cell(stats) -> str:
    if stats is None or stats["count"] == 0:
        return ""
    if stats["count"] == 1:
        return f"{stats['mean']:.4f} (n=1)"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={int(stats['count'])})"


def format_table(cells, flows: list[str]):
    """A DataFrame of strings in the seed's layout: index n_flows, one column per flow type."""
    import pandas as pd

    n_flows = sorted(cells.index.get_level_values(0).unique())
    data = {f: [_cell(cells.loc[(k, f)] if (k, f) in cells.index else None) for k in n_flows] for f in flows}
    return pd.DataFrame(data, index=pd.Index(n_flows, name="n_flows"))


def upgrade_results(path: Path) -> tuple[int, int]:
    """Rewrite a results CSV of flowvae < 0.3 in the current format, each row's settings rebuilt from its run
    directory's ``.hydra/config.yaml``; the original is kept as ``<name>.orig``. Rows whose run directory is
    gone are moved to ``<name>.unconverted.csv``. Returns (converted, unconverted)."""
    from omegaconf import OmegaConf

    from flowvae.config import with_schema_defaults
    from flowvae.files import RunFiles, replaced

    table = _read_csv(path)
    old = set(_old_rows(table))
    converted, unconverted = [], []
    for index, row in table.iterrows():
        row = {k: v for k, v in row.items() if v != "" or "." not in k}
        if index not in old:
            converted.append(row)
            continue
        config_file = RunFiles(Path(row.get("run_dir", ""))).config
        if not row.get("run_dir") or not config_file.is_file():
            unconverted.append(row)
            continue
        cfg = with_schema_defaults(OmegaConf.load(config_file))
        settings = run_settings(cfg)
        rest = {k: v for k, v in row.items() if k not in settings and k not in _OLD_SETTING_COLUMNS}
        converted.append({**settings, **rest})
    columns: list[str] = []
    for row in converted + unconverted:
        columns += [k for k in row if k not in columns]
    import pandas as pd

    path.with_name(path.name + ".orig").write_bytes(path.read_bytes())
    with replaced(path) as tmp:
        pd.DataFrame(converted, columns=[c for c in columns if c not in _OLD_SETTING_COLUMNS]).to_csv(tmp, index=False)
    if unconverted:
        pd.DataFrame(unconverted).to_csv(path.with_name(path.stem + ".unconverted.csv"), index=False)
    return len(converted), len(unconverted)


def _parse_args(args: list[str]):
    parser = argparse.ArgumentParser(
        prog="flowvae table",
        description="The seed-style table of a results CSV: rows n_flows, columns flow types, each cell the "
                    "mean ± std of a metric over seeds (with the count). Failed rows are left out and counted. "
                    "Rows that differ in any setting other than the seed are refused: pick one with --filter.")
    parser.add_argument("results_csv", nargs="?", default="outputs/results.csv",
                        help="the results table runs append to (default: outputs/results.csv)")
    parser.add_argument("--metric", default="kl_sum", help="column to tabulate: kl_sum, w1_sum, kl_0, ... "
                        "(default: kl_sum)")
    parser.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep rows whose COLUMN equals VALUE (numbers compared as numbers), e.g. --filter "
                             "train.lr=1e-3 or --filter data.name=jets; repeatable")
    parser.add_argument("--out", default=None, help="folder for the CSV, Markdown and PNG (default: next to "
                        "the results CSV)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    parser.add_argument("--upgrade", action="store_true", help="convert a results CSV written by flowvae < 0.3 "
                        "in place (settings rebuilt from each row's run directory; the original kept as .orig)")
    return parser.parse_args(args)


def main(args: list[str]) -> int:
    """``flowvae table``: print the table, write it as CSV and Markdown, and plot it."""
    options = _parse_args(args)
    path = Path(options.results_csv)
    filters = {}
    for item in options.filter:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"flowvae table: --filter {item!r} must be COLUMN=VALUE", file=sys.stderr)
            return 2
        filters[key] = value
    try:
        if options.upgrade:
            converted, unconverted = upgrade_results(path)
            print(f"{path}: {converted} rows in the current format (original kept as {path.name}.orig)"
                  + (f"; {unconverted} rows whose run directory is gone moved to "
                     f"{path.stem}.unconverted.csv" if unconverted else ""))
            return 0
        table, not_ok = load_results(path, filters)
        if table.empty:
            raise TableError(f"{path} has no finished (ok) rows" + (" matching the filters" if filters else ""))
        check_one_setting(table)
        cells, flows = seed_table(table, options.metric)
    except TableError as err:
        print(f"flowvae table: {err}", file=sys.stderr)
        return 2
    formatted = format_table(cells, flows)
    out = Path(options.out) if options.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{path.stem}_{options.metric}"
    formatted.to_csv(out / f"{stem}.csv")
    (out / f"{stem}.md").write_text(_markdown(formatted))
    version = table[VERSION_COLUMN].iloc[0] if VERSION_COLUMN in table.columns else "?"
    print(f"{options.metric}: mean ± std over seeds (n = runs); {len(table)} ok rows of flowvae {version}"
          + (f", {not_ok} failed or unfinished rows left out" if not_ok else ""))
    floor = noise_floor(table, options.metric)
    if floor is not None:
        print(f"noise floor of {options.metric} ({floor_meaning(table, options.metric)}): {floor:.4g}")
    print(formatted.to_string())
    written = [out / f"{stem}.csv", out / f"{stem}.md"]
    if not options.no_plot:
        plot_table(cells, flows, options.metric, out / f"{stem}.png", title=f"{options.metric} vs n_flows",
                   floor=floor)
        written.append(out / f"{stem}.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _markdown(frame) -> str:
    """A Markdown table without the optional `tabulate` dependency."""
    header = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row)]) + " |")
    return "\n".join(lines) + "\n"
