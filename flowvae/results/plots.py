"""A run's pictures for people: each feature's generated vs input histogram.

matplotlib is imported inside the functions with the non-interactive Agg backend, so a cluster node or a cron
job without a display can draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowvae.files import replaced

__all__ = ["plot_histograms", "plot_latent", "pyplot", "plot_table", "table_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend: draws without a display (cluster nodes, cron)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(generated: np.ndarray, reference: np.ndarray, feature_names: list[str], scores: dict,
                    path: Path, title: str = "", bins: int = 100, gen_mask: np.ndarray | None = None,
                    ref_mask: np.ndarray | None = None) -> None:
    """One panel per feature: the pooled values of generated (N, F, P) and input (M, F, P) events, on the same
    bins as the KL estimator (the pooled range), labelled with the feature's KL and the two means and stds
    from ``scores`` (the row of :func:`flowvae.metrics.score`), so the picture shows the row's numbers. Masks
    (N, P) leave padded particles out, as the metrics do."""
    plt = pyplot()
    n_features = reference.shape[1]
    fig, axes = plt.subplots(1, n_features, figsize=(4.2 * n_features, 3.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        gen = generated[:, i][gen_mask] if gen_mask is not None else generated[:, i].ravel()
        ref = reference[:, i][ref_mask] if ref_mask is not None else reference[:, i].ravel()
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


def plot_table(cells, flows: list[str], metric: str, path: Path, title: str = "", floor: float | None = None
               ) -> None:
    """Draw :func:`table_figure` into the PNG ``path``."""
    fig = table_figure(cells, flows, metric, title, floor)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def table_figure(cells, flows: list[str], metric: str, title: str = "", floor: float | None = None):
    """``metric`` against n_flows, one line per flow type, a band of ± one std over seeds, and the metric's
    noise floor as a dashed line when it is known. Values over decades get a log axis, on which a band that
    reaches zero (std ≥ mean) is cut at the axis floor; every n_flows that was run is a tick."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    ax.set_xscale("symlog", linthresh=1)  # before anything is drawn, or the x margins are linear ones
    y_limits = _log_limits(cells, floor)
    for i, flow in enumerate(flows):
        sub = cells.xs(flow, level="flow").sort_index()
        x, mean, std = sub.index.to_numpy(), sub["mean"].to_numpy(), sub["std"].fillna(0).to_numpy()
        low = mean - std if y_limits is None else (mean - std).clip(min=y_limits[0])
        ax.plot(x, mean, marker="o", ms=3.5, lw=1.4, color=f"C{i}", label=flow)
        ax.fill_between(x, low, mean + std, color=f"C{i}", alpha=0.15, lw=0)
    if y_limits is not None:
        ax.set_yscale("log")
        ax.set_ylim(*y_limits)
    if floor is not None and (floor > 0 or y_limits is None):
        ax.axhline(floor, color="0.4", ls="--", lw=1, label="noise floor")
    _n_flows_ticks(ax, sorted(cells.index.get_level_values("n_flows").unique()))
    ax.set_xlabel("n_flows")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _log_limits(cells, floor: float | None) -> tuple[float, float] | None:
    """The y-limits of a log axis when the means span more than a factor 30 (None: a linear axis, which
    matplotlib fits to the bands itself). From the lowest mean (or the noise floor) to the highest band top,
    with a margin of 5 % of the span each side (at least a tenth of a decade): a band whose lower edge is at or
    below zero would otherwise pull the axis down by decades, or off it."""
    import numpy as np

    means = cells["mean"].dropna()
    if not len(means) or means.min() <= 0 or means.max() <= 30 * means.min():
        return None
    tops = (cells["mean"] + cells["std"].fillna(0)).dropna()
    low = min(means.min(), floor if floor is not None and floor > 0 else np.inf)
    high = max(tops.max(), floor if floor is not None else -np.inf)
    pad = max(0.05 * np.log10(high / low), 0.1)
    return float(low / 10**pad), float(high * 10**pad)


def _n_flows_ticks(ax, n_flows: list[int]) -> None:
    """A tick at every n_flows that was run, labelled unless it would crowd its left neighbour's label (closer
    than 1/30 of the first-to-last distance on the symlog scale); symlog's own ticks label 0 and 10^0, not 2."""
    from matplotlib.ticker import NullLocator

    positions = ax.xaxis.get_transform().transform(n_flows)
    min_gap = (positions[-1] - positions[0]) / 30
    labels, last = [], None
    for value, position in zip(n_flows, positions, strict=True):
        show = last is None or position - last >= min_gap
        labels.append(str(value) if show else "")
        last = position if show else last
    ax.set_xticks(n_flows, labels=labels, fontsize=8)
    ax.xaxis.set_minor_locator(NullLocator())


def plot_latent(codes: np.ndarray, prior_samples: np.ndarray, path: Path, gap: float, floor: float,
                title: str = "", bins: int = 60) -> None:
    """One panel per latent dimension: the held-out events' posterior codes (N, D), the aggregate posterior,
    against as many draws of the generating prior (M, D), on shared bins; the title gives ``latent_gap`` and its
    floor (:mod:`flowvae.metrics.latent`). The histograms the user draws by hand to ask "is the latent Gaussian?"."""
    plt = pyplot()
    n_dims = codes.shape[1]
    columns = min(n_dims, 4)
    rows = -(-n_dims // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False)
    for d, ax in enumerate(axes.ravel()):
        if d >= n_dims:
            ax.axis("off")
            continue
        edges = np.linspace(min(codes[:, d].min(), prior_samples[:, d].min()),
                            max(codes[:, d].max(), prior_samples[:, d].max()), bins + 1)
        ax.hist(codes[:, d], bins=edges, density=True, histtype="stepfilled", alpha=0.35, color="C0",
                label="posterior codes")
        ax.hist(prior_samples[:, d], bins=edges, density=True, histtype="step", lw=1.6, color="C3", label="prior")
        ax.set_title(f"z{d}", fontsize=9)
    axes[0][-1].legend(loc="upper right", fontsize=7)
    fig.suptitle(f"{title + ': ' if title else ''}latent_gap {gap:.3f} (floor {floor:.3f})", fontsize=10)
    fig.tight_layout()
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
