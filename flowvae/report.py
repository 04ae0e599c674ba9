"""A run's pictures for people: each feature's generated vs input histogram.

matplotlib is imported inside the functions with the non-interactive Agg backend, so a cluster node or a cron
job without a display can draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowvae.files import replaced

__all__ = ["plot_histograms", "pyplot"]


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
