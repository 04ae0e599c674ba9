"""Pictures and tables for people: each feature's generated vs input histogram, and ``flowvae table``.

matplotlib is imported inside the functions with the non-interactive Agg backend, so a cluster node or a cron
job without a display can draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowvae.files import replaced

__all__ = ["plot_histograms", "table_main"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(generated: np.ndarray, reference: np.ndarray, feature_names: list[str], scores: dict,
                    path: Path, title: str = "", bins: int = 100) -> None:
    """One panel per feature: the pooled values of generated (N, F, P) and input (M, F, P) events, on the same
    bins as the KL estimator (the pooled range), labelled with the feature's KL and the two means and stds
    from ``scores`` (the row of :func:`flowvae.metrics.score`), so the picture shows the row's numbers."""
    plt = _pyplot()
    n_features = reference.shape[1]
    fig, axes = plt.subplots(1, n_features, figsize=(4.2 * n_features, 3.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        gen, ref = generated[:, i].ravel(), reference[:, i].ravel()
        edges = np.linspace(min(gen.min(), ref.min()), max(gen.max(), ref.max()), bins + 1)
        ax.hist(ref, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color="C0", label="input")
        ax.hist(gen, bins=edges, density=True, histtype="step", lw=1.6, color="C3", label="generated")
        ax.set_title(f"{feature_names[i]}: KL={scores[f'kl_{i}']:.4f}", fontsize=10)
        ax.text(0.02, 0.97, f"input  {scores[f'input_mean_{i}']:.3f} ± {scores[f'input_std_{i}']:.3f}\n"
                            f"gen    {scores[f'gen_mean_{i}']:.3f} ± {scores[f'gen_std_{i}']:.3f}",
                transform=ax.transAxes, va="top", fontsize=8, family="monospace")
        ax.set_xlabel("value")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# --- flowvae table -----------------------------------------------------------------------------------------

# The seed slides' column order; other flow types follow alphabetically.
FLOW_ORDER = ["planar", "iaf", "householder", "triangular", "orthogonal"]
# Columns that describe the experiment's setting: one table compares flows within one setting.
SETTING_COLUMNS = ["data", "data_mu", "data_sigma", "data_offset_sigma", "data_scale_sigma",
                   "n_particles", "n_train", "data_path", "data_key", "test_fraction", "standardize", "likelihood",
                   "sigma_x", "latent_dim", "decode", "source", "epochs", "batch_size", "lr"]


class TableError(ValueError):
    """The results table cannot be made as asked; the message says why and what to pass instead."""


def load_results(path: Path, filters: dict[str, str] | None = None):
    """The ok rows of a results CSV (the newest row of each config), after ``filters``; and the count of
    rows left out because they did not finish (failed, diverged)."""
    import pandas as pd

    if not path.exists():
        raise TableError(f"{path} does not exist; run `flowvae train` first or pass the results CSV's path")
    table = pd.read_csv(path, dtype={"data_mu": str, "data_sigma": str, "sigma_x": str})
    for column in ("flow", "n_flows", "status"):
        if column not in table.columns:
            raise TableError(f"{path} has no column {column!r}: is it a flowvae results table?")
    for key, value in (filters or {}).items():
        if key not in table.columns:
            raise TableError(f"--filter {key}={value}: no column {key!r}; columns: {', '.join(table.columns)}")
        table = table[table[key].astype(str) == value]
    not_ok = int((table["status"] != "ok").sum())
    table = table[table["status"] == "ok"]
    if "config_hash" in table.columns:
        table = table.drop_duplicates("config_hash", keep="last")
    return table, not_ok


def _check_one_setting(table) -> None:
    varying = {c: sorted(table[c].astype(str).unique()) for c in SETTING_COLUMNS
               if c in table.columns and table[c].astype(str).nunique() > 1}
    if varying:
        detail = "; ".join(f"{c} in {values}" for c, values in varying.items())
        example = next(iter(varying.items()))
        raise TableError(f"the results mix several settings ({detail}): choose one with --filter, "
                         f"e.g. --filter {example[0]}={example[1][0]}")


def seed_table(table, metric: str):
    """Rows n_flows, columns flow types; each cell (mean, std, count) of ``metric`` over seeds.

    n_flows = 0 is the same plain VAE for every flow type, so its runs fill that row of every column.
    """
    import pandas as pd

    if metric not in table.columns:
        metrics = [c for c in table.columns if c.startswith(("kl_", "w1_", "js_", "final_", "noise"))]
        raise TableError(f"--metric {metric}: no such column; choose one of {', '.join(metrics)}")
    flows = [f for f in table["flow"].unique() if f != "none"] or ["none"]
    flows = sorted(flows, key=lambda f: (FLOW_ORDER.index(f) if f in FLOW_ORDER else len(FLOW_ORDER), f))
    plain = table[table["n_flows"] == 0]
    parts = [table[(table["n_flows"] > 0) & (table["flow"] == f)] for f in flows]
    parts += [plain.assign(flow=f) for f in flows]
    cells = pd.concat(parts).groupby(["n_flows", "flow"])[metric].agg(["mean", "std", "count"])
    return cells, flows


def _cell(stats) -> str:
    if stats is None or stats["count"] == 0:
        return ""
    if stats["count"] == 1:
        return f"{stats['mean']:.4f} (n=1)"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={int(stats['count'])})"


def format_table(cells, flows: list[str], metric: str):
    """A DataFrame of strings in the seed's layout: index n_flows, one column per flow type."""
    import pandas as pd

    n_flows = sorted(cells.index.get_level_values(0).unique())
    data = {f: [_cell(cells.loc[(k, f)] if (k, f) in cells.index else None) for k in n_flows] for f in flows}
    return pd.DataFrame(data, index=pd.Index(n_flows, name="n_flows"))


def plot_table(cells, flows: list[str], metric: str, path: Path, title: str = "") -> None:
    """``metric`` against n_flows, one line per flow type, a band of ± one std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, flow in enumerate(flows):
        sub = cells.xs(flow, level="flow").sort_index()
        x, mean, std = sub.index.to_numpy(), sub["mean"].to_numpy(), sub["std"].fillna(0).to_numpy()
        ax.plot(x, mean, marker="o", ms=3.5, lw=1.4, color=f"C{i}", label=flow)
        ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.15, lw=0)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("n_flows")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_args(args: list[str]):
    import argparse

    parser = argparse.ArgumentParser(
        prog="flowvae table",
        description="The seed-style table of a results CSV: rows n_flows, columns flow types, each cell the "
                    "mean ± std of a metric over seeds (with the count). Failed rows are left out and counted.")
    parser.add_argument("results_csv", nargs="?", default="outputs/results.csv",
                        help="the results table runs append to (default: outputs/results.csv)")
    parser.add_argument("--metric", default="kl_sum", help="column to tabulate: kl_sum, w1_sum, kl_0, ... "
                        "(default: kl_sum)")
    parser.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep rows whose COLUMN equals VALUE, e.g. --filter data_mu=1.0; repeatable")
    parser.add_argument("--out", default=None, help="folder for the CSV, Markdown and PNG (default: next to "
                        "the results CSV)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    return parser.parse_args(args)


def table_main(args: list[str]) -> int:
    """``flowvae table``: print the table, write it as CSV and Markdown, and plot it."""
    import sys

    options = _parse_args(args)
    filters = {}
    for item in options.filter:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"flowvae table: --filter {item!r} must be COLUMN=VALUE", file=sys.stderr)
            return 2
        filters[key] = value
    path = Path(options.results_csv)
    try:
        table, not_ok = load_results(path, filters)
        if table.empty:
            raise TableError(f"{path} has no finished (ok) rows" + (" matching the filters" if filters else ""))
        _check_one_setting(table)
        cells, flows = seed_table(table, options.metric)
    except TableError as err:
        print(f"flowvae table: {err}", file=sys.stderr)
        return 2
    formatted = format_table(cells, flows, options.metric)
    out = Path(options.out) if options.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{path.stem}_{options.metric}"
    formatted.to_csv(out / f"{stem}.csv")
    (out / f"{stem}.md").write_text(_markdown(formatted))
    print(f"{options.metric}: mean ± std over seeds (n = runs); {len(table)} ok rows"
          + (f", {not_ok} failed or unfinished rows left out" if not_ok else ""))
    print(formatted.to_string())
    written = [out / f"{stem}.csv", out / f"{stem}.md"]
    if not options.no_plot:
        plot_table(cells, flows, options.metric, out / f"{stem}.png", title=f"{options.metric} vs n_flows")
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
