"""Scores on disk and as a picture: the heat map of head and neuron importance per layer."""

from __future__ import annotations

import numpy as np

from jdistill.utils import files


def save_scores(path, scores: dict) -> None:
    """Writes scores (a dict of arrays) to an .npz file atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, **{k: np.asarray(v) for k, v in scores.items()})

    files.atomic_write_with(path, write)


def load_scores(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _normalise_rows(a):
    a = np.asarray(a, np.float64)
    return a / np.maximum(a.max(axis=1, keepdims=True), 1e-30)


def plot_scores(scores: dict, path, title: str = "importance") -> None:
    """PNG: head scores [L, H] and neuron scores [L, F] as heat maps (each layer scaled to its
    maximum), hidden-channel scores sorted, and per-layer depth scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), gridspec_kw={"width_ratios": [1, 3]})
    panels = [("heads", "query head"), ("mlp", "MLP neuron")]
    for ax, (key, label) in zip(axes[0], panels):
        im = ax.imshow(_normalise_rows(scores[key]), aspect="auto", cmap="viridis",
                       interpolation="nearest")
        ax.set(xlabel=label, ylabel="layer", title=f"{key} (÷ layer max)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax)
    hidden = np.sort(np.asarray(scores["hidden"]))[::-1]
    axes[1][1].plot(hidden)
    axes[1][1].set(xlabel="hidden channel (sorted)", ylabel="score", title="hidden channels",
                   yscale="log" if hidden.min() > 0 else "linear")
    axes[1][0].bar(np.arange(len(scores["layers"])), np.asarray(scores["layers"]))
    axes[1][0].set(xlabel="layer", ylabel="score", title="layers")
    axes[1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    files.atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


