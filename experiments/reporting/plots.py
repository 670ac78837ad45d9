"""PNG figures of the diagnostics. Each function draws one figure from arrays and writes it atomically.

Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas: no pyplot state, no GUI backend,
nothing left open after saving. Arrays come in as numpy or torch; images as flattened rows plus a shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vae_priors.experiments.files import atomic_path

PRIOR_COLOR, QAGG_COLOR = "tab:gray", "tab:blue"
DPI = 150  # sharp enough to read the tick labels on a laptop screen


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


_LABEL: ContextVar[str] = ContextVar("vae_priors_plot_label", default="")


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Every figure saved inside this block names ``label`` (e.g. "vae on digits") in its top-left corner, so a
    figure copied out of the report still says what it shows."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically."""
    if _LABEL.get():
        fig.text(0.005, 0.995, _LABEL.get(), ha="left", va="top", fontsize=8, color="#555555")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    fig.clear()
    return Path(path)


def marginals(q_agg: np.ndarray, prior: np.ndarray, path: str | Path, max_dims: int = 16) -> Path:
    """Histogram of each latent dimension: draws from q_agg(z) against draws from p(z)."""
    q_agg, prior = _np(q_agg), _np(prior)
    dims = min(q_agg.shape[1], max_dims)
    cols = min(dims, 4)
    rows = -(-dims // cols)
    fig = Figure(figsize=(2.6 * cols, 1.7 * rows + 0.5))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.08, top=1 - 0.45 / (1.7 * rows + 0.5), hspace=0.45, wspace=0.08)
    for d in range(dims):
        ax = fig.add_subplot(rows, cols, d + 1)
        both = np.concatenate([q_agg[:, d], prior[:, d]])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 40)
        ax.hist(prior[:, d], bins=bins, density=True, color=PRIOR_COLOR, alpha=0.5, histtype="stepfilled",
                label="p(z)")
        ax.hist(q_agg[:, d], bins=bins, density=True, color=QAGG_COLOR, histtype="step", lw=1.5, label="q_agg(z)")
        ax.set_title(f"z[{d}]", fontsize=9)
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("Per-dimension marginals: aggregated posterior vs prior")
    return save_figure(fig, path)


def latent_2d(q_agg: np.ndarray, prior: np.ndarray, path: str | Path) -> Path:
    """q_agg and prior draws in 2-D: the first two dimensions, or the first two principal axes of q_agg."""
    q_agg, prior = _np(q_agg), _np(prior)
    if q_agg.shape[1] > 2:
        center = q_agg.mean(axis=0)
        _, _, vt = np.linalg.svd(q_agg - center, full_matrices=False)
        project = lambda a: (a - center) @ vt[:2].T  # noqa: E731
        labels = ("PC 1 of q_agg", "PC 2 of q_agg")
    else:
        project = lambda a: np.pad(a, ((0, 0), (0, 2 - a.shape[1])))  # noqa: E731
        labels = ("z[0]", "z[1]")
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    p, q = project(prior), project(q_agg)
    ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.3, color=PRIOR_COLOR, label="p(z)")
    ax.scatter(q[:, 0], q[:, 1], s=4, alpha=0.4, color=QAGG_COLOR, label="q_agg(z)")
    ax.set_xlabel(labels[0]), ax.set_ylabel(labels[1])
    ax.legend(markerscale=4)
    ax.set_title("Aggregated posterior vs prior draws")
    return save_figure(fig, path)


def kl_per_dim(kl: np.ndarray, path: str | Path, active: np.ndarray | None = None) -> Path:
    """Mean KL(q(z_d|x) || p(z_d)) per latent dimension; active units (Burda et al. 2016) in a darker colour."""
    kl = _np(kl)
    colors = [QAGG_COLOR if active is None or a else "lightsteelblue" for a in
              (_np(active) if active is not None else [True] * len(kl))]
    fig = Figure(figsize=(max(4, 0.4 * len(kl)), 3), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(np.arange(len(kl)), kl, color=colors)
    ax.set_xlabel("latent dimension"), ax.set_ylabel("mean KL (nats)")
    ax.set_title("KL per dimension" + ("" if active is None else " (pale = inactive unit)"))
    return save_figure(fig, path)


def khat(draw: Callable, path: str | Path, share_above: float, threshold: float) -> Path:
    """``az.plot_khat`` of one variant; ``draw(ax)`` is ``arviz_adapter.plot_khat`` bound to its ELPD data."""
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.add_subplot()
    draw(ax)
    ax.set_xlabel("test point")
    ax.set_title(f"Pareto k-hat per point: {share_above:.1%} above {threshold:.2f}", fontsize=10)
    return save_figure(fig, path)


def image_rows(rows: dict[str, np.ndarray], image_shape: Sequence[int], path: str | Path, per_row: int = 12,
               title: str = "") -> Path:
    """One row of images per entry of ``rows`` (label -> flattened images), grey scale in [0, 1].

    The images are tiled into one array and drawn with a single ``imshow`` (one axes per image is ~20x slower).
    """
    h, w = image_shape
    pad = max(1, h // 8)
    mosaic = np.full((len(rows) * (h + pad) + pad, per_row * (w + pad) + pad), np.nan)
    for r, images in enumerate(rows.values()):
        for c, image in enumerate(_np(images)[:per_row]):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            mosaic[top : top + h, left : left + w] = image.reshape(h, w)
    inch = 0.6 / w  # each image 0.6 inch wide; the figure has the mosaic's aspect plus room for labels
    label, top = 1.3, 0.3 if title else 0.05
    width, height = label + mosaic.shape[1] * inch, top + mosaic.shape[0] * inch
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((label / width, 0, 1 - label / width, 1 - top / height))
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(rows))], list(rows), fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def compare(draw: Callable, path: str | Path, num_variants: int, title: str, xlabel: str) -> Path:
    """The ArviZ compare plot; ``draw(ax)`` is ``arviz_adapter.plot_compare`` bound to its table."""
    fig = Figure(figsize=(8, 1.5 + 0.5 * num_variants), layout="constrained")
    ax = fig.add_subplot()
    draw(ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)  # ArviZ writes "elpd_loo": this is not leave-one-out
    return save_figure(fig, path)


def learning_curves(history, path: str | Path) -> Path:
    """Train and validation ELBO per epoch for every variant of a run (``history.csv``)."""
    names = list(dict.fromkeys(history["variant"]))
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.4 * rows + 0.4))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        h = history[history["variant"] == name]
        ax.plot(h["epoch"], h["train_elbo"], lw=1, label="train")
        if h["val_elbo"].notna().any():
            ax.plot(h["epoch"], h["val_elbo"], lw=1, label="validation")
        low = np.nanpercentile(np.concatenate([h["train_elbo"], h["val_elbo"].dropna()]), 5)
        ax.set_ylim(low, None)  # the first epochs are far below: show where training ends up
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].set_ylabel("ELBO per point", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
