"""The study's figures: one helper draws a panel of seed-mean score curves with their seed bands (every study's
curves go through it), one saves a figure; ``plot_methods`` is the figure of ``dense-rlhf experiment`` and
``demo``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dense_rlhf.study import methods as M
from dense_rlhf.study.stats import moving_average

# The experiment's headline methods, drawn thicker.
BOLD = ("sparse", "abc-0.8", "prefix-0.8", "bpe-sparse", "bpe-abc-0.8", "oracle-0.8")
SCORE_LABEL = "ground-truth score (5-step MA, ±1 std over seeds)"


def pyplot():
    """matplotlib's pyplot with the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_curves(
    ax,
    curves: Iterable[tuple[str, dict, dict]],
    *,
    threshold: float | None = None,
    threshold_label: str = "threshold",
    band_alpha: float = 0.1,
    xlabel: str = "PPO step",
    ylabel: str = SCORE_LABEL,
    title: str | None = None,
    title_size: float | None = None,
    legend_size: float = 7,
) -> None:
    """Draw on ``ax`` one curve per ``(label, stats, style)``: the 5-step moving average of ``stats["mean_curve"]``
    (a method's seed-mean score per step, ``stats.summarise``) with a band of ±1 ``stats["std_curve"]`` (smoothed
    the same way) in the line's colour; ``style``: the line's matplotlib keywords (``color`` also colours the
    band). Then the threshold as a dotted line (if given), the labels, the title and the legend."""
    for label, stats, style in curves:
        mean, std = moving_average(stats["mean_curve"]), moving_average(stats["std_curve"])
        xs = range(len(mean))
        line = ax.plot(xs, mean, label=label, **style)[0]
        ax.fill_between(
            xs,
            [a - b for a, b in zip(mean, std)],
            [a + b for a, b in zip(mean, std)],
            color=line.get_color(),
            alpha=band_alpha,
        )
    if threshold is not None:
        ax.axhline(threshold, color="k", ls=":", lw=1, label=threshold_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title, fontsize=title_size)
    ax.legend(fontsize=legend_size)


def save(fig, path: Path, *, title: str | None = None, dpi: int = 120) -> None:
    """Save ``fig`` to ``path`` (with ``title`` above its panels if given) and close it."""
    plt = pyplot()
    if title is not None:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_methods(summary: dict, path: Path, title: str) -> None:
    """Every method's score curve of one comparison (``stats.summarise``'s summary) and its threshold."""
    fig, ax = pyplot().subplots(figsize=(8, 5))
    present = [m for m in M.ALL_METHODS if m in summary["methods"]]
    curves = [
        (M.LABELS[m], summary["methods"][m], {"color": f"C{k}", "lw": 2 if m in BOLD else 1.2})
        for k, m in enumerate(present)
    ]
    score_curves(ax, curves, threshold=summary["threshold"], band_alpha=0.15, title=title, legend_size=8)
    save(fig, path)
