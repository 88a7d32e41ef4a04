"""Stage 6: render the model card (README.md) from what the run recorded, never from memory.

Reads the stage records (records/*.json), metrics/eval.json and the trained model itself, and renders
templates/model_card.md.j2 into build/card/README.md.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from pipeline.cli import stage_main
from pipeline.config import CARD_DIR, EVAL_METRICS, STUDENT_DIR, Params
from pipeline.evaluate import HEADLINE
from pipeline.tracking import load_records, stage_record

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.j2"
UPSTREAM_STAGES = ["snapshot", "validate", "teacher", "train", "evaluate"]
SPARSITY = ["query_active_dims", "corpus_active_dims", "query_sparsity_ratio", "corpus_sparsity_ratio"]
LIBRARIES = ["sentence-transformers", "transformers", "torch", "datasets", "tokenizers", "codecarbon"]


def card_metrics(metrics: dict) -> dict:
    """The evaluator's metrics (ranking and sparsity), without the training-triplet checks."""
    return {k: v for k, v in metrics.items() if k.startswith(("dot_", "query_", "corpus_"))}


def card_facts(params: Params) -> dict:
    from sentence_transformers import SparseEncoder

    records = load_records(UPSTREAM_STAGES)
    evaluation = json.loads(EVAL_METRICS.read_text())
    student = card_metrics(evaluation["student"])
    model = SparseEncoder(str(STUDENT_DIR))
    train_cfg = params.train
    manifest = records["snapshot"]["facts"]["manifest"]
    sample = manifest["train"]["samples"][0]
    synthetic = params.snapshot.train.source == "synthetic"
    teacher = params.teacher
    eval_sets = manifest["eval"]["sets"]
    # one model-index entry per set, and the mean over them (as NanoBEIR cards list it)
    eval_results = {name: card_metrics(both["student"]) for name, both in evaluation["datasets"].items()}
    eval_name = next(iter(eval_sets)) if len(eval_sets) == 1 else f"{Path(params.snapshot.eval.source).name} mean"
    if len(eval_sets) > 1:
        eval_results[eval_name] = student
    return {
        "card": params.card,
        "repo_id": params.push.repo_id,
        "base_model_id": None if train_cfg.base_model == "synthetic" else train_cfg.base_model,
        "base_model_label": (
            "BertForMaskedLM built from config (randomly initialised), WordPiece vocabulary learnt "
            "from the training text" if train_cfg.base_model == "synthetic"
            else f"[{train_cfg.base_model}](https://huggingface.co/{train_cfg.base_model})"),
        "train_source_label": (
            "the pipeline's synthetic quickstart set" if synthetic else params.snapshot.train.source),
        "teacher_label": (
            "BM25 with the synthetic lexicon (knows the synonyms)" if teacher.kind == "lexicon-bm25"
            else f"cross-encoder {teacher.model}" + (f"@{teacher.revision}" if teacher.revision else "")),
        "train_rows": manifest["train"]["rows"],
        "eval_name": eval_name,
        "eval_queries": sum(s["judged_queries"] for s in eval_sets.values()),
        "eval_docs": sum(s["docs"] for s in eval_sets.values()),
        "eval_results": eval_results,
        "per_dataset": evaluation["datasets"],
        "max_seq_length": model.max_seq_length,
        "dimensions": model.get_embedding_dimension(),
        "architecture": str(model),
        "sample": sample,
        "metric_names": list(student),
        "student_metrics": student,
        "base_metrics": evaluation["base"],
        "bm25_metrics": evaluation["bm25"],
        "headline": HEADLINE,
        "sparsity": [k for k in SPARSITY if k in student],
        "teacher_ndcg": records["teacher"]["metrics"].get("eval_dot_ndcg@10"),
        "train": train_cfg,
        "train_metrics": records["train"]["metrics"],
        "train_params": {k: v for k, v in records["train"]["params"].items() if not isinstance(v, dict)},
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
    return env.from_string(TEMPLATE.read_text()).render(**facts)


def run(params: Params, out_dir: Path = CARD_DIR) -> dict:
    with stage_record("card", params.card, params.tracking) as record:
        text = render(card_facts(params))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "README.md").write_text(text)
        record["metrics"] = {"card_chars": len(text)}
    return {"card": str(out_dir / "README.md")}


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
