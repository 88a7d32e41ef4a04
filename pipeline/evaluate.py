"""Stage 5: score the trained student, and the untrained model it started from, on the held-out
evaluation set(s), with the metrics of sentence-transformers' SparseInformationRetrievalEvaluator
(those of a sentence-transformers model card; equal to it within 1e-4, tested) computed from one
encoding of each model, plus the fraction of training triplets (the first
evaluate.max_train_triplets) whose positive the model ranks above the negative.

Writes metrics/eval.json (a DVC metrics file): {"student": {...}, "base": {...}, "gain": {...}} (pooled
over the sets when there are several, as sentence-transformers' NanoBEIR mean), each set's
under "datasets": {name: {"student", "base"}}, and with evaluate.max_active_dims both models'
retrieval metrics at each top-k size ("student_max_active_dims": {"16": {...}, ...},
"base_max_active_dims"), as CSR model cards report them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline import snapshot
from pipeline.cli import stage_main
from pipeline.config import BASE_MODEL_DIR, EVAL_METRICS, SNAPSHOT_DIR, STUDENT_DIR, Params
from pipeline.metrics import mean_metrics, ranking_metrics
from pipeline.sources import RetrievalSet
from pipeline.tracking import stage_record, write_json

log = logging.getLogger(__name__)

HEADLINE = ["dot_ndcg@10", "dot_mrr@10", "dot_map@100", "dot_recall@10", "dot_accuracy@1"]


@dataclass
class Encoded:
    """A model's vectors for an evaluation set: dense queries (few) and a sparse corpus (many)."""
    query_ids: list[str]
    queries: "torch.Tensor"
    doc_ids: list[str]
    corpus: "torch.Tensor"


def encode(model, data: RetrievalSet, batch_size: int) -> Encoded:
    query_ids = [q for q in data.qrels if q in data.queries]  # judged queries, as the evaluator
    doc_ids = list(data.corpus)
    queries = model.encode_query([data.queries[q] for q in query_ids], batch_size=batch_size,
                                 convert_to_tensor=True).to_dense().cpu()
    corpus = model.encode_document([data.corpus[d] for d in doc_ids], batch_size=batch_size,
                                   convert_to_tensor=True, show_progress_bar=True).cpu().coalesce()
    return Encoded(query_ids, queries, doc_ids, corpus)


@dataclass
class SetScores:
    """One set's metrics, and how many of its queries / documents use each dimension (sets pool
    their sparsity statistics through these, as SparseNanoBEIREvaluator pools them)."""
    metrics: dict[str, float]
    query_counts: "torch.Tensor"
    doc_counts: "torch.Tensor"
    queries: int
    docs: int


def retrieval_scores(vectors: Encoded, data: RetrievalSet, k: int | None = None,
                     chunk: int = 1024) -> SetScores:
    """What SparseInformationRetrievalEvaluator reports (ranking metrics, active dims, sparsity
    ratios, avg_flops), from vectors already encoded, keeping each vector's top-k dimensions when
    k is given: encoding with max_active_dims=k gives the same, but re-encodes the corpus per k."""
    import torch
    from sentence_transformers.util import select_max_active_dims

    def top(x):
        return select_max_active_dims(x, k) if k else x

    queries = top(vectors.queries)
    width = queries.shape[1]
    scores, doc_active, doc_counts = [], [], torch.zeros(width)
    for start in range(0, len(vectors.doc_ids), chunk):  # dense a chunk at a time: SPLADE is 30522 wide
        docs = top(vectors.corpus.index_select(
            0, torch.arange(start, min(start + chunk, len(vectors.doc_ids)))).to_dense())
        active = docs != 0
        doc_active.append(active.sum(1).float())
        doc_counts += active.sum(0).float()
        scores.append(queries @ docs.T)
    best = torch.cat(scores, dim=1).topk(min(100, len(vectors.doc_ids)), dim=1)
    ranking = {q: {vectors.doc_ids[j]: float(v) for v, j in zip(values.tolist(), indices.tolist())}
               for q, values, indices in zip(vectors.query_ids, best.values, best.indices)}
    query_active = (queries != 0).float()
    query_dims, corpus_dims = float(query_active.sum(1).mean()), float(torch.cat(doc_active).mean())
    metrics = {**ranking_metrics(data, ranking),
               "query_active_dims": query_dims, "query_sparsity_ratio": 1 - query_dims / width,
               "corpus_active_dims": corpus_dims, "corpus_sparsity_ratio": 1 - corpus_dims / width}
    result = SetScores(metrics, query_active.sum(0), doc_counts, len(vectors.query_ids), len(vectors.doc_ids))
    result.metrics["avg_flops"] = pooled_flops([result])
    return result


def pooled_flops(per_set: list[SetScores]) -> float:
    """Expected multiplications per query-document dot product (the evaluator's avg_flops): the
    chance that a dimension is active in a query times in a document, summed over dimensions."""
    queries, docs = sum(s.queries for s in per_set), sum(s.docs for s in per_set)
    return float(sum(s.query_counts for s in per_set) / queries @ (sum(s.doc_counts for s in per_set) / docs))


def pooled_metrics(per_set: list[SetScores]) -> dict[str, float]:
    """Several sets' metrics as SparseNanoBEIREvaluator pools them: ranking metrics' plain mean,
    active dims and sparsity ratios weighted by each set's queries or documents, avg_flops from
    the pooled counts. One set: its own metrics."""
    metrics = mean_metrics([s.metrics for s in per_set])
    for side, size in (("query", lambda s: s.queries), ("corpus", lambda s: s.docs)):
        total = sum(size(s) for s in per_set)
        for name in (f"{side}_active_dims", f"{side}_sparsity_ratio"):
            metrics[name] = sum(s.metrics[name] * size(s) for s in per_set) / total
    metrics["avg_flops"] = pooled_flops(per_set)
    return metrics


def evaluate_model(model_dir: Path, sets: dict[str, RetrievalSet], train: pd.DataFrame, batch_size: int,
                   max_active_dims: list[int], max_seq_length: int | None = None) -> dict:
    """Retrieval metrics of the model as saved, and at each top-k size (each set encoded once), per
    set and pooled over the sets, plus the training triplets' accuracy where the training set
    has negatives."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseTripletEvaluator

    model = SparseEncoder(str(model_dir))
    if max_seq_length:
        model.max_seq_length = max_seq_length
    per_set, sweeps = {}, []
    for name, data in sets.items():
        log.info("scoring %s on %s", model_dir, name)
        vectors = encode(model, data, batch_size)
        per_set[name] = retrieval_scores(vectors, data)
        sweeps.append({k: retrieval_scores(vectors, data, k) for k in max_active_dims})
    metrics = pooled_metrics(list(per_set.values()))
    if "negative" in train:  # pairs: no triplets to check
        triplets = SparseTripletEvaluator(
            train["query"].tolist(), train["positive"].tolist(), train["negative"].tolist(),
            similarity_fn_names=["dot"], batch_size=batch_size, write_csv=False)
        metrics.update({f"train_triplets_{k}": float(v) for k, v in triplets(model).items()})
    return {"metrics": metrics, "datasets": {name: scores.metrics for name, scores in per_set.items()},
            "max_active_dims": {str(k): pooled_metrics([sweep[k] for sweep in sweeps])
                                for k in max_active_dims}}


def run(params: Params, snapshot_dir: Path = SNAPSHOT_DIR) -> dict:
    cfg = params.evaluate
    with stage_record("evaluate", cfg, params.tracking) as record:
        sets = snapshot.read_eval_snapshot(snapshot_dir, params.snapshot.eval.split)
        train = pd.read_parquet(snapshot_dir / snapshot.TRAIN_FILE).head(cfg.max_train_triplets)
        student, base = (evaluate_model(folder, sets, train, cfg.batch_size, cfg.max_active_dims)
                         for folder in (STUDENT_DIR, BASE_MODEL_DIR))
        result = {"student": student["metrics"], "base": base["metrics"],
                  "gain": {k: student["metrics"][k] - base["metrics"][k] for k in HEADLINE},
                  "datasets": {name: {"student": student["datasets"][name], "base": base["datasets"][name]}
                               for name in sets}}
        if cfg.max_active_dims:
            result["student_max_active_dims"] = student["max_active_dims"]
            result["base_max_active_dims"] = base["max_active_dims"]
        write_json(EVAL_METRICS, result)
        record["metrics"] = {**result["student"], **{f"base_{k}": v for k, v in result["base"].items()},
                             **{f"gain_{k}": v for k, v in result["gain"].items()},
                             **{f"max_active_dims_{k}_{name}": metrics[name]
                                for k, metrics in result.get("student_max_active_dims", {}).items()
                                for name in HEADLINE},
                             **({f"{data_name}_{name}": per_set["student"][name]
                                 for data_name, per_set in result["datasets"].items() for name in HEADLINE}
                                if len(sets) > 1 else {})}
    return result


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
