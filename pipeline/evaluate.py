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
from pipeline.metrics import ranking_metrics
from pipeline.sources import RetrievalSet, read_retrieval_set
from pipeline.tracking import stage_record, write_json

HEADLINE = ["dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "dot_accuracy@1"]


def evaluate_model(model_dir: Path, data: RetrievalSet, train: pd.DataFrame,
                   batch_size: int) -> dict[str, float]:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import (
        SparseInformationRetrievalEvaluator, SparseTripletEvaluator)

    model = SparseEncoder(str(model_dir))
    retrieval = SparseInformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(d) for q, d in data.qrels.items()},
        batch_size=batch_size, write_csv=False, show_progress_bar=True)
    metrics = {k: float(v) for k, v in retrieval(model).items()}
    if "negative" not in train:  # pairs: no triplets to check
        return metrics
    triplets = SparseTripletEvaluator(
        train["query"].tolist(), train["positive"].tolist(), train["negative"].tolist(),
        similarity_fn_names=["dot"], batch_size=batch_size, write_csv=False)
    metrics.update({f"train_triplets_{k}": float(v) for k, v in triplets(model).items()})
    return metrics


def max_active_dims_sweep(model_dir: Path, data: RetrievalSet, sizes: list[int],
                          batch_size: int, chunk: int = 1024) -> dict[str, dict[str, float]]:
    """Retrieval metrics keeping only each vector's top-k dimensions, for every k in `sizes`.

    What encoding with max_active_dims=k gives, but the queries and corpus are encoded once and
    truncated per k, where the evaluator would encode the corpus again for every k."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.util import select_max_active_dims

    model = SparseEncoder(str(model_dir))
    query_ids = [q for q in data.qrels if q in data.queries]
    doc_ids = list(data.corpus)
    queries = model.encode_query([data.queries[q] for q in query_ids], batch_size=batch_size,
                                 convert_to_tensor=True).to_dense().cpu()
    corpus = model.encode_document([data.corpus[d] for d in doc_ids], batch_size=batch_size,
                                   convert_to_tensor=True, show_progress_bar=True).cpu().coalesce()
    sweep = {}
    for k in sizes:
        top_queries = select_max_active_dims(queries, k)
        scores, doc_active = [], []
        for start in range(0, len(doc_ids), chunk):  # dense a chunk at a time: SPLADE is 30522 wide
            docs = select_max_active_dims(corpus.index_select(
                0, torch.arange(start, min(start + chunk, len(doc_ids)))).to_dense(), k)
            doc_active.append((docs != 0).sum(1).float())
            scores.append(top_queries @ docs.T)
        best = torch.cat(scores, dim=1).topk(min(100, len(doc_ids)), dim=1)
        ranking = {q: {doc_ids[j]: float(v) for v, j in zip(values.tolist(), indices.tolist())}
                   for q, values, indices in zip(query_ids, best.values, best.indices)}
        sweep[str(k)] = {**ranking_metrics(data, ranking),
                         "query_active_dims": float((top_queries != 0).sum(1).float().mean()),
                         "corpus_active_dims": float(torch.cat(doc_active).mean())}
    return sweep


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
            result["student_max_active_dims"] = max_active_dims_sweep(
                STUDENT_DIR, data, cfg.max_active_dims, cfg.batch_size)
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
