"""The figures the evaluation and the card show, drawn with matplotlib (no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.tracking.records import write_atomically

MODEL_COLOURS = {"student": "#1f77b4", "base": "#aec7e8", "bm25": "#ff7f0e"}


def _figure(width: float = 7, height: float = 3.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height))


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".")))
    plt.close(fig)


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
    _save(plt, fig, path)


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
    _save(plt, fig, path)


def held_out_score(log_entry: dict) -> float | None:
    """A training log entry's held-out nDCG@10 (the mean over sets when there are several), if scored."""
    return log_entry.get("eval_sequential_score", log_entry.get("eval_dot_ndcg@10"))


def training_curve(log_history: list[dict], path: Path) -> None:
    """Training loss per logged step and, where the run scored its held-out set during training,
    its nDCG@10 on a second axis."""
    plt, fig, ax = _figure()
    losses = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if losses:  # none when the run had fewer steps than logging_steps
        ax.plot(*zip(*losses), color=MODEL_COLOURS["student"], label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    scored = [(e["step"], held_out_score(e)) for e in log_history if held_out_score(e) is not None]
    if scored:
        right = ax.twinx()
        right.plot(*zip(*scored), "o-", color=MODEL_COLOURS["bm25"], label="held-out nDCG@10")
        right.set_ylabel("held-out nDCG@10")
        right.legend(loc="upper right")
    if losses:
        ax.legend(loc="upper left")
    _save(plt, fig, path)
