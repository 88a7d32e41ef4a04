"""Stage 5: score the trained student, and the untrained model it started from, on the held-out
evaluation set, with sentence-transformers' SparseInformationRetrievalEvaluator (the metrics of a
sentence-transformers model card), plus the fraction of training triplets (the first
evaluate.max_train_triplets) whose positive the model ranks above the negative.

Writes metrics/eval.json (a DVC metrics file): {"student": {...}, "base": {...}, "gain": {...}}, and
with evaluate.max_active_dims the student's retrieval metrics at each top-k size
("student_max_active_dims": {"16": {...}, ...}), as CSR model cards report them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import snapshot
from pipeline.cli import stage_main
from pipeline.config import BASE_MODEL_DIR, EVAL_METRICS, SNAPSHOT_DIR, STUDENT_DIR, Params
from pipeline.sources import RetrievalSet, read_retrieval_set
from pipeline.tracking import stage_record, write_json

HEADLINE = ["dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "dot_accuracy@1"]


def evaluate_model(model_dir: Path, data: RetrievalSet, train: pd.DataFrame,
                   batch_size: int, max_active_dims: int | None = None) -> dict[str, float]:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator, SparseTripletEvaluator)

    model = SparseEncoder(str(model_dir))
    retrieval = SparseInformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
        batch_size=batch_size, write_csv=False, show_progress_bar=True,
        max_active_dims=max_active_dims)
    metrics = {k: float(v) for k, v in retrieval(model).items()}
    if max_active_dims:  # the top-k sweep reports retrieval only
        return metrics
    if "negative" not in train:  # pairs: no triplets to check
        return metrics
    triplets = SparseTripletEvaluator(
        train["query"].tolist(), train["positive"].tolist(), train["negative"].tolist(),
        similarity_fn_names=["dot"], batch_size=batch_size, write_csv=False)
    metrics.update({f"train_triplets_{k}": float(v) for k, v in triplets(model).items()})
    return metrics


def run(params: Params, snapshot_dir: Path = SNAPSHOT_DIR) -> dict:
    cfg = params.evaluate
    with stage_record("evaluate", cfg, params.tracking) as record:
        data = read_retrieval_set(snapshot_dir / snapshot.EVAL_DIR, params.snapshot.eval.split)
        train = pd.read_parquet(snapshot_dir / snapshot.TRAIN_FILE).head(cfg.max_train_triplets)
        student = evaluate_model(STUDENT_DIR, data, train, cfg.batch_size)
        base = evaluate_model(BASE_MODEL_DIR, data, train, cfg.batch_size)
        result = {"student": student, "base": base,
                  "gain": {k: student[k] - base[k] for k in HEADLINE}}
        if cfg.max_active_dims:
            result["student_max_active_dims"] = {
                str(k): evaluate_model(STUDENT_DIR, data, train, cfg.batch_size, k)
                for k in cfg.max_active_dims}
        write_json(EVAL_METRICS, result)
        record["metrics"] = {**student, **{f"base_{k}": v for k, v in base.items()},
                             **{f"gain_{k}": v for k, v in result["gain"].items()},
                             **{f"max_active_dims_{k}_{name}": metrics[name]
                                for k, metrics in result.get("student_max_active_dims", {}).items()
                                for name in HEADLINE}}
    return result


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
