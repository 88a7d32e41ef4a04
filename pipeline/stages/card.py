"""Stage 6: render the model card (README.md) from what the run recorded, never from memory.

Reads the stage records (records/*.json: the snapshot manifest, the loss, every training argument,
the training log, energy and hardware), metrics/eval.json, the rows the student trained on and the
trained model itself, and renders templates/model_card.md.j2 into build/card/README.md, beside two
figures: the training curve and nDCG@10 per evaluation set. The sections are those of
sentence-transformers' own sparse-encoder cards; the stage fails if one is missing or empty.
"""

from __future__ import annotations

import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

import pandas as pd

from pipeline.cli import StageError, stage_main
from pipeline.config import (
    CARD_DIR,
    EVAL_METRICS,
    PLOTS_DIR,
    STUDENT_DIR,
    TEACHER_SCORED,
    Params,
)
from pipeline.data.snapshots import rows_head, training_rows
from pipeline.data.sources import detect_format
from pipeline.evaluation import plots, stats
from pipeline.evaluation.measures import HEADLINE
from pipeline.tracking.records import (
    evaluation_identity,
    fact_text,
    load_records,
    main_result_name,
    replace_folder,
    stage_record,
)

TEMPLATE = Path(__file__).parents[1] / "templates" / "model_card.md.j2"
UPSTREAM_STAGES = ["snapshot", "validate", "teacher", "train", "export", "evaluate"]
SPARSITY = ["query_active_dims", "corpus_active_dims", "query_sparsity_ratio", "corpus_sparsity_ratio"]
LIBRARIES = ["sentence-transformers", "transformers", "torch", "accelerate", "datasets", "tokenizers",
             "codecarbon"]
FIGURES = {"training_curve.png": "Training curve", "ndcg_per_dataset.png": "nDCG@10 per evaluation set"}
# The card's sections, in order; each must be present and followed by content
SECTIONS = ["## Model Details", "### Model Description", "### Full Model Architecture", "## Usage",
            "## Evaluation", "### Metrics", "## Training Details", "### Training Dataset",
            "### Training Hyperparameters", "#### Non-Default Hyperparameters", "#### All Hyperparameters",
            "### Training Logs", "### Environmental Impact", "### Framework Versions", "## Citation"]
PLACEHOLDERS = ["More Information Needed", "TODO", "[optional]"]  # what templates leave unfilled
# Training arguments that name this machine's folders, not the training
LOCAL_ARGS = {"output_dir", "logging_dir"}
SAMPLE_CHARS = 500  # sample texts in the dataset table are cut to this length


# the evaluator's metrics in the order its cards list them, then graded nDCG
METRIC_ORDER = ([f"dot_{name}@{k}" for name in ("accuracy", "precision", "recall") for k in (1, 3, 5, 10)]
                + ["dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_graded_ndcg@10", "query_active_dims",
                   "query_sparsity_ratio", "corpus_active_dims", "corpus_sparsity_ratio", "avg_flops"])


def card_metrics(metrics: dict) -> dict:
    """The evaluator's metrics (ranking and sparsity) in METRIC_ORDER, without the training-triplet checks."""
    return {k: metrics[k] for k in METRIC_ORDER if k in metrics}


def hub_id(name: str, fmt: str = "hf") -> str | None:
    """A Hub id, for the card's `base_model:` and `datasets:` metadata (which take nothing else):
    None for the synthetic set, local files and folders."""
    if name == "synthetic" or Path(name).exists():
        return None
    return name if (fmt if fmt != "auto" else detect_format(name)) == "hf" else None


def dataset_table(frame: pd.DataFrame, tokenizer, rows: int = 1000) -> list[dict]:
    """Per column: its type and, for text, token counts (min / mean / max over the first `rows` rows,
    with the model's tokenizer), as sentence-transformers' cards give them."""
    head = frame.head(rows)
    columns = []
    for name in frame.columns:
        first = head[name].iloc[0]
        if isinstance(first, str):
            lengths = [len(ids) for ids in tokenizer(head[name].tolist(), add_special_tokens=True)["input_ids"]]
            columns.append({"name": name, "type": "string", "details": (
                f"min: {min(lengths)} tokens, mean: {sum(lengths) / len(lengths):.2f} tokens, "
                f"max: {max(lengths)} tokens")})
        else:
            values = pd.Series([v for cell in head[name] for v in (cell if hasattr(cell, "__len__") else [cell])])
            kind = f"list of {len(first)} floats" if hasattr(first, "__len__") else "float"
            columns.append({"name": name, "type": kind, "details": (
                f"min: {values.min():.2f}, mean: {values.mean():.2f}, max: {values.max():.2f}")})
    return columns


def sample_rows(frame: pd.DataFrame, count: int = 3) -> list[dict]:
    def show(value):
        if isinstance(value, str):
            return value if len(value) <= SAMPLE_CHARS else value[:SAMPLE_CHARS] + "…"
        return [round(float(v), 4) for v in value] if hasattr(value, "__len__") else round(float(value), 4)

    return [{k: show(v) for k, v in row.items()} for row in frame.head(count).to_dict(orient="records")]


def training_logs(log_history: list[dict]) -> list[dict]:
    """One row per logged step: epoch, step, training loss and held-out nDCG@10 where scored."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        if "step" not in entry or "train_runtime" in entry:  # the closing summary is no step
            continue
        row = by_step.setdefault(entry["step"], {"epoch": entry.get("epoch", 0.0), "step": entry["step"],
                                                 "loss": None, "ndcg": None})
        if "loss" in entry:
            row["loss"] = entry["loss"]
        if plots.held_out_score(entry) is not None:
            row["ndcg"] = plots.held_out_score(entry)
    return list(by_step.values())


def hyperparameters(training_args: dict) -> tuple[dict, dict]:
    """(non-default, all) training arguments, as the cards list them; folders of this machine left out."""
    from sentence_transformers import SparseEncoderTrainingArguments

    defaults = SparseEncoderTrainingArguments(output_dir="unused").to_dict()
    every = {k: v for k, v in training_args.items() if k not in LOCAL_ARGS}
    changed = {k: v for k, v in every.items() if k in defaults and v != defaults[k]}
    return changed, every


def card_facts(params: Params) -> dict:
    from sentence_transformers import SparseEncoder

    records = load_records(UPSTREAM_STAGES)
    evaluation = json.loads(EVAL_METRICS.read_text())
    student = card_metrics(evaluation["student"])
    model = SparseEncoder(str(STUDENT_DIR))
    train_cfg = params.train
    train_facts = records["train"]["facts"]
    manifest = records["snapshot"]["facts"]["manifest"]
    synthetic = params.snapshot.train.source == "synthetic"
    teacher_cfg = params.teacher
    eval_sets = manifest["eval"]["sets"]
    scored_head, scored_rows = rows_head(TEACHER_SCORED, 1000)  # what the card shows of them
    trained_rows = training_rows(train_cfg, scored_head)
    # model-index entries: the main result first (the push gate reads it), which is the mean over
    # the sets when there are several (as NanoBEIR cards list it), then each set, then each top-k size
    eval_name = main_result_name(manifest)
    eval_results = {eval_name: student}
    eval_results.update({name: card_metrics(both["student"]) for name, both in evaluation["datasets"].items()})
    sweep = {k: card_metrics(v) for k, v in evaluation.get("student_max_active_dims", {}).items()}
    for k, metrics in sweep.items():
        eval_results[f"{eval_name} max_active_dims {k}"] = metrics
    non_default, all_args = hyperparameters(train_facts["training_args"])
    datasets = [d for d in (hub_id(params.snapshot.train.source, params.snapshot.train.format),
                            hub_id(params.snapshot.eval.source, params.snapshot.eval.format)) if d]
    csr, inference_free = train_cfg.architecture == "csr", train_cfg.architecture == "inference-free-splade"
    return {
        "card": params.card,
        "repo_id": params.push.repo_id,
        "csr": csr,
        "inference_free": inference_free,
        "model_type": ("CSR Sparse Encoder" if csr else "Inference-free SPLADE Sparse Encoder" if inference_free
                       else "SPLADE Sparse Encoder"),
        "onnx_files": records["export"]["facts"].get("files", []),
        "onnx_int8": evaluation.get("student_onnx_int8"),
        "loss": train_facts["loss"],
        "datasets": list(dict.fromkeys(datasets)),
        "base_model_id": hub_id(train_cfg.base_model),
        "base_model_label": (
            "BertForMaskedLM built from config (randomly initialised), WordPiece vocabulary learnt "
            "from the training text" if train_cfg.base_model == "synthetic"
            else f"`{train_cfg.base_model}`" if hub_id(train_cfg.base_model) is None
            else f"[{train_cfg.base_model}](https://huggingface.co/{train_cfg.base_model})"
            + (f" (revision `{train_facts['base_model_commit']}`)" if train_facts.get("base_model_commit") else "")),
        "train_source_label": (
            "the pipeline's synthetic quickstart set" if synthetic else
            f"`{params.snapshot.train.source}`" + (f" at revision `{params.snapshot.train.revision}`"
                                                   if params.snapshot.train.revision else "")),
        "train_sha256": manifest["train"]["sha256"],
        "teacher_label": (
            "BM25 with the synthetic lexicon (knows the synonyms)" if teacher_cfg.kind == "lexicon-bm25"
            else f"{teacher_cfg.kind} `{teacher_cfg.model}`" + (f" at revision `{teacher_cfg.revision}`"
                                                                 if teacher_cfg.revision else "")),
        "train_rows": scored_rows,
        "dataset_columns": dataset_table(trained_rows, model.tokenizer),
        "samples": sample_rows(trained_rows),
        "sample": manifest["train"]["samples"][0],
        "eval_name": eval_name,
        # every model-index result names the evaluation it was measured on: the push gate compares
        # a pushed card's numbers only when this id is the same
        "eval_id": evaluation_identity(manifest)["id"],
        "eval_source": params.snapshot.eval.source,
        "eval_queries": sum(s["judged_queries"] for s in eval_sets.values()),
        "eval_docs": sum(s["docs"] for s in eval_sets.values()),
        "eval_results": eval_results,
        "eval_columns": list(eval_results),
        "per_dataset": evaluation["datasets"],
        "sweep": sweep,
        "max_seq_length": model.max_seq_length,
        "max_active_dims": train_cfg.max_active_dims,
        "dimensions": model.get_embedding_dimension(),
        "architecture": str(model),
        "metric_names": list(student),
        "student_metrics": student,
        "base_metrics": evaluation["base"],
        "bm25_metrics": evaluation["bm25"],
        "intervals": evaluation["intervals"],
        "differences": evaluation["differences"],
        "confidence": evaluation["intervals"]["student"][HEADLINE[0]]["confidence"],
        "resamples": evaluation["intervals"]["student"][HEADLINE[0]]["resamples"],
        "machines": {stage: records[stage]["machine"] for stage in ("train", "evaluate")},
        "headline": HEADLINE,
        "sparsity": [k for k in SPARSITY if k in student],
        "teacher_ndcg": records["teacher"]["metrics"].get("eval_dot_ndcg@10"),
        "train_metrics": records["train"]["metrics"],
        "non_default_args": non_default,
        "all_args": all_args,
        "logs": training_logs(train_facts["log_history"]),
        "figures": FIGURES,
        "energy_kwh": sum(r["energy_kwh"] for r in records.values()),
        "emissions_g": 1000 * sum(r["emissions_kg_co2eq"] for r in records.values()),
        "hours": sum(r["seconds"] for r in records.values()) / 3600,
        "hardware": records["train"]["hardware"],
        "versions": {"python": platform.python_version(),
                     **{name: metadata.version(name) for name in LIBRARIES}},
    }


def render(facts: dict) -> str:
    from jinja2 import Environment, StrictUndefined

    env = Environment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False, default=str)
    env.filters["interval"] = stats.shown
    env.filters["fact"] = fact_text
    return env.from_string(TEMPLATE.read_text()).render(**facts)


def missing_sections(text: str) -> list[str]:
    """Sections absent or empty (a heading followed directly by the next), and placeholder text."""
    lines = text.splitlines()
    problems = []
    for section in SECTIONS:
        if section not in lines:
            problems.append(f"no section {section!r}")
            continue
        following = [line for line in lines[lines.index(section) + 1:] if line.strip()]
        if not following or (following[0].startswith("#") and following[0].count("#") <= section.count("#")):
            problems.append(f"section {section!r} is empty")
    problems += [f"placeholder {p!r}" for p in PLACEHOLDERS if p in text]
    return problems


def run(params: Params, out_dir: Path = CARD_DIR) -> dict:
    with stage_record("card", params) as record:
        facts = card_facts(params)
        text = render(facts)
        problems = missing_sections(text)
        if problems:
            raise StageError("the rendered model card is incomplete: " + "; ".join(problems))

        def write(folder: Path) -> None:
            (folder / "README.md").write_text(text)
            plots.training_curve(load_records(["train"])["train"]["facts"]["log_history"],
                                 folder / "training_curve.png")
            shutil.copy(PLOTS_DIR / "ndcg_per_dataset.png", folder / "ndcg_per_dataset.png")

        replace_folder(out_dir, write)
        record["metrics"] = {"card_chars": len(text), "model_index_results": len(facts["eval_results"])}
    return {"card": str(out_dir / "README.md")}


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
