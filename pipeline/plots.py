"""The figures the evaluation and the card show, drawn with matplotlib (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODEL_COLOURS = {"student": "#1f77b4", "base": "#aec7e8", "bm25": "#ff7f0e"}


def _figure(width: float = 7, height: float = 3.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def ndcg_per_dataset(datasets: dict[str, dict[str, dict[str, float]]], path: Path,
                     metric: str = "dot_ndcg@10") -> None:
    """Grouped bars: `metric` of each model (student, base, bm25) on each evaluation set."""
    plt, fig, ax = _figure(max(5, 1.2 * len(datasets) + 2))
    names = list(datasets)
    models = [m for m in MODEL_COLOURS if all(m in datasets[n] for n in names)]
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [datasets[n][model][metric] for n in names]
        ax.bar(np.arange(len(names)) + (i - (len(models) - 1) / 2) * width, values, width,
               label=model, color=MODEL_COLOURS[model])
    ax.set_xticks(np.arange(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def active_dims_histogram(active_dims: dict[str, np.ndarray], path: Path) -> None:
    """How many dimensions each document's vector uses, per model."""
    plt, fig, ax = _figure()
    top = max(int(dims.max()) for dims in active_dims.values() if len(dims)) + 1
    bins = np.linspace(0, top, 50)
    for model, dims in active_dims.items():
        ax.hist(dims, bins=bins, alpha=0.6, label=f"{model} (mean {dims.mean():.0f})",
                color=MODEL_COLOURS.get(model))
    ax.set_xlabel("active dimensions per document")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
