"""Stage 5: score the trained student, and the untrained model it started from, on the held-out
evaluation set(s), with the metrics of sentence-transformers' SparseInformationRetrievalEvaluator
(those of a sentence-transformers model card; equal to it within 1e-4, tested) computed from one
encoding of each model, plus the fraction of training triplets (the first
evaluate.max_train_triplets) whose positive the model ranks above the negative.

Writes metrics/eval.json (a DVC metrics file): {"student": {...}, "base": {...}, "gain": {...}} (pooled
over the sets when there are several, as sentence-transformers' NanoBEIR mean), each set's
under "datasets": {name: {"student", "base"}}, and with evaluate.max_active_dims both models'
retrieval metrics at each top-k size ("student_max_active_dims": {"16": {...}, ...},
"base_max_active_dims"), as CSR model cards report them. A BM25 row (bm25s) on the same sets sits
beside them ("bm25"). Also metrics/ndcg_per_dataset.csv and two figures in metrics/plots/: nDCG@10
per set and model, and the documents' active dimensions.

SPLADE models are encoded without their full logits tensor (pipeline.splade_head); each query's top 100
comes from pipeline.retrieval: exact sparse products, or past evaluate.index.exact_max_docs documents
(MS MARCO's 8.8M passages) the approximate seismic index ("index" in eval.json says which ran).
evaluate.precision bf16 trades exactness for speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline import plots, splade_head
from pipeline.cli import StageError, run_stage
from pipeline.config import (BASE_MODEL_DIR, EVAL_METRICS, EXPORT_DIR, NDCG_TABLE, PARAMS_FILE, PLOTS_DIR,
                             STUDENT_DIR, EvaluateConfig, IndexConfig, Params)
from pipeline.dataset import read_eval_snapshot, read_training_snapshot
from pipeline.metrics import HEADLINE, graded_ndcg, mean_metrics, ranking_metrics
from pipeline.models import load_encoder
from pipeline.onnx_backend import onnx_path, onnx_encoder
from pipeline.retrieval import build_index, index_kind
from pipeline.runtime import use_bf16
from pipeline.sources import RetrievalSet, read_retrieval_set
from pipeline.tracking import stage_record, write_atomically, write_json

if TYPE_CHECKING:
    import scipy.sparse
    import torch

log = logging.getLogger(__name__)

DEPTH = 100  # documents retrieved per query: the deepest cut-off among the metrics (map@100)


@dataclass
class Encoded:
    """A model's vectors for an evaluation set: one CSR row per judged query and per document."""
    query_ids: list[str]
    queries: "scipy.sparse.csr_matrix"
    doc_ids: list[str]
    corpus: "scipy.sparse.csr_matrix"


def to_csr(vectors: "torch.Tensor") -> "scipy.sparse.csr_matrix":
    from scipy.sparse import csr_matrix

    coo = vectors.coalesce()
    rows, cols = coo.indices().numpy()
    matrix = csr_matrix((coo.values().numpy(), (rows, cols)), shape=tuple(coo.shape))
    matrix.eliminate_zeros()
    return matrix


def encode(model, data: RetrievalSet, batch_size: int, bf16: bool = False,
           chunk_docs: int = 100_000) -> Encoded:
    """The judged queries (as the stock evaluator) and the corpus, `chunk_docs` documents at a time:
    a chunk's COO tensor (int64 coordinates) is 2.5 times its CSR rows, too much for 8.8M passages."""
    from scipy.sparse import vstack

    query_ids = [q for q in data.qrels if q in data.queries]
    doc_ids = list(data.corpus)
    queries = to_csr(splade_head.encode(model, [data.queries[q] for q in query_ids], "query", batch_size, bf16))
    chunks = [to_csr(splade_head.encode(model, [data.corpus[d] for d in doc_ids[start:start + chunk_docs]],
                                     "document", batch_size, bf16, show_progress_bar=True))
              for start in range(0, len(doc_ids), chunk_docs)]
    return Encoded(query_ids, queries, doc_ids, vstack(chunks, format="csr"))


def keep_top(matrix: "scipy.sparse.csr_matrix", k: int) -> "scipy.sparse.csr_matrix":
    """Each row's k largest values (sentence-transformers' max_active_dims), the rest dropped."""
    from scipy.sparse import csr_matrix

    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, rows))  # by row, largest first
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - matrix.indptr[rows[order]]
    keep = rank < k
    return csr_matrix((matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape)


@dataclass
class SetScores:
    """One set's metrics, and how many of its queries / documents use each dimension (sets pool
    their sparsity statistics through these, as SparseNanoBEIREvaluator pools them)."""
    metrics: dict[str, float]
    query_counts: np.ndarray
    doc_counts: np.ndarray
    queries: int
    docs: int


def retrieval_scores(vectors: Encoded, data: RetrievalSet, k: int | None = None,
                     index: IndexConfig = IndexConfig()) -> SetScores:
    """What SparseInformationRetrievalEvaluator reports (ranking metrics, active dims, sparsity
    ratios, avg_flops), from vectors already encoded, keeping each vector's top-k dimensions when
    k is given: encoding with max_active_dims=k gives the same, but re-encodes the corpus per k."""
    queries, corpus = (keep_top(m, k) if k else m for m in (vectors.queries, vectors.corpus))
    width = queries.shape[1]
    found = build_index(corpus, index).search(queries, DEPTH)
    ranking = {q: {vectors.doc_ids[j]: float(v) for j, v in zip(indices, values)}
               for q, (indices, values) in zip(vectors.query_ids, found)}
    query_dims, corpus_dims = float(np.diff(queries.indptr).mean()), float(np.diff(corpus.indptr).mean())
    metrics = {**ranking_metrics(data, ranking), "dot_graded_ndcg@10": graded_ndcg(data, ranking),
               "query_active_dims": query_dims, "query_sparsity_ratio": 1 - query_dims / width,
               "corpus_active_dims": corpus_dims, "corpus_sparsity_ratio": 1 - corpus_dims / width}
    result = SetScores(metrics, np.bincount(queries.indices, minlength=width).astype(float),
                       np.bincount(corpus.indices, minlength=width).astype(float),
                       queries.shape[0], corpus.shape[0])
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
                   max_active_dims: list[int], max_seq_length: int | None = None,
                   precision: str = "fp32", index: IndexConfig = IndexConfig(), onnx: str | None = None,
                   export_dir: Path = EXPORT_DIR) -> dict:
    """Retrieval metrics of the model as saved (with `onnx` "int8" or "fp32": its MLM exported to
    `export_dir` and run by ONNX Runtime), and at each top-k size (each set encoded once), per set
    and pooled over the sets, plus the training triplets' accuracy where the training set has negatives."""
    from sentence_transformers.sparse_encoder.evaluation import SparseTripletEvaluator

    model = onnx_encoder(model_dir, export_dir, onnx) if onnx else load_encoder(model_dir, max_seq_length)
    bf16 = use_bf16(precision, model.device.type)
    per_set, sweeps, doc_dims = {}, [], []
    for name, data in sets.items():
        log.info("scoring %s on %s", model_dir, name)
        vectors = encode(model, data, batch_size, bf16)
        per_set[name] = retrieval_scores(vectors, data, index=index)
        doc_dims.append(np.diff(vectors.corpus.indptr))
        sweeps.append({k: retrieval_scores(vectors, data, k, index) for k in max_active_dims})
    metrics = pooled_metrics(list(per_set.values()))
    if "negative" in train:  # pairs: no triplets to check
        triplets = SparseTripletEvaluator(
            train["query"].tolist(), train["positive"].tolist(), train["negative"].tolist(),
            similarity_fn_names=["dot"], batch_size=batch_size, write_csv=False)
        with splade_head.fused_head(model):  # the same vectors, without the full logits
            metrics.update({f"train_triplets_{k}": float(v) for k, v in triplets(model).items()})
    return {"metrics": metrics, "datasets": {name: scores.metrics for name, scores in per_set.items()},
            "max_active_dims": {str(k): pooled_metrics([sweep[k] for sweep in sweeps])
                                for k in max_active_dims},
            "doc_active_dims": np.concatenate(doc_dims)}


def bm25_metrics(data: RetrievalSet, depth: int = DEPTH) -> dict[str, float]:
    """BM25 (bm25s, English stop words) on the same set: the lexical baseline. Its ranking metrics
    carry the models' names (dot_ndcg@10, ...) so that the rows compare column by column."""
    from pipeline.runtime import import_bm25s

    bm25s = import_bm25s()
    doc_ids = list(data.corpus)
    query_ids = [q for q in data.qrels if q in data.queries]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([data.corpus[d] for d in doc_ids], stopwords="en", show_progress=False),
                    show_progress=False)
    queries = bm25s.tokenize([data.queries[q] for q in query_ids], stopwords="en", return_ids=False,
                             show_progress=False)
    found, scores = retriever.retrieve(queries, k=min(depth, len(doc_ids)), show_progress=False)
    ranking = {q: {doc_ids[j]: float(s) for j, s in zip(rows, values)}
               for q, rows, values in zip(query_ids, found, scores)}
    return {**ranking_metrics(data, ranking), "dot_graded_ndcg@10": graded_ndcg(data, ranking)}


def run(params: Params) -> dict:
    cfg = params.evaluate
    with stage_record("evaluate", params) as record:
        sets = read_eval_snapshot(params.snapshot.eval.split)
        train = read_training_snapshot().head(cfg.max_train_triplets)
        student, base = (evaluate_model(folder, sets, train, cfg.batch_size, cfg.max_active_dims,
                                        precision=cfg.precision, index=cfg.index)
                         for folder in (STUDENT_DIR, BASE_MODEL_DIR))
        bm25 = {name: bm25_metrics(data) for name, data in sets.items()}
        result = {"student": student["metrics"], "base": base["metrics"],
                  "bm25": mean_metrics(list(bm25.values())),
                  "gain": {k: student["metrics"][k] - base["metrics"][k] for k in HEADLINE},
                  "datasets": {name: {"student": student["datasets"][name], "base": base["datasets"][name],
                                      "bm25": bm25[name]} for name in sets},
                  "index": {name: index_kind(cfg.index, len(data.corpus)) for name, data in sets.items()}}
        if onnx_path(EXPORT_DIR, STUDENT_DIR, "int8").exists():  # the export stage's quantized student
            int8 = evaluate_model(STUDENT_DIR, sets, pd.DataFrame(), cfg.batch_size, [], index=cfg.index, onnx="int8")
            result["student_onnx_int8"] = int8["metrics"]
            result["onnx_int8_ndcg_drop"] = student["metrics"]["dot_ndcg@10"] - int8["metrics"]["dot_ndcg@10"]
        if cfg.max_active_dims:
            result["student_max_active_dims"] = student["max_active_dims"]
            result["base_max_active_dims"] = base["max_active_dims"]
        write_json(EVAL_METRICS, result)
        plots.ndcg_per_dataset(result["datasets"], PLOTS_DIR / "ndcg_per_dataset.png")
        plots.active_dims_histogram({"student": student["doc_active_dims"], "base": base["doc_active_dims"]},
                                    PLOTS_DIR / "document_active_dims.png")
        write_ndcg_table(result["datasets"], NDCG_TABLE)
        record["metrics"] = {**result["student"], **{f"base_{k}": v for k, v in result["base"].items()},
                             **{f"bm25_{k}": result["bm25"][k] for k in HEADLINE},
                             **{f"gain_{k}": v for k, v in result["gain"].items()},
                             **({f"onnx_int8_{k}": result["student_onnx_int8"][k] for k in HEADLINE}
                                | {"onnx_int8_ndcg_drop": result["onnx_int8_ndcg_drop"]}
                                if "student_onnx_int8" in result else {}),
                             **{f"max_active_dims_{k}_{name}": metrics[name]
                                for k, metrics in result.get("student_max_active_dims", {}).items()
                                for name in HEADLINE},
                             **({f"{data_name}_{name}": per_set["student"][name]
                                 for data_name, per_set in result["datasets"].items() for name in HEADLINE}
                                if len(sets) > 1 else {})}
    return result


def write_ndcg_table(datasets: dict, path: Path) -> None:
    """nDCG@10 per set and model as rows (dataset, model, ndcg_at_10): `dvc plots` draws bars from it."""
    rows = [{"dataset": name, "model": model, "ndcg_at_10": metrics["dot_ndcg@10"]}
            for name, models in datasets.items() for model, metrics in models.items()]
    write_atomically(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def evaluate_folder(model: Path, beir: Path, split: str, max_seq_length: int | None, batch_size: int,
                    precision: str, max_active_dims: list[int], index: IndexConfig = IndexConfig()) -> dict:
    """One model on one BEIR folder, outside the pipeline: its metrics and the seconds they took
    (read, encode, retrieve, score)."""
    started = time.perf_counter()
    data = read_retrieval_set(beir, split)
    result = evaluate_model(model, {beir.name: data}, pd.DataFrame(), batch_size, max_active_dims,
                            max_seq_length, precision, index)
    return {**result["metrics"], "max_active_dims": result["max_active_dims"],
            "index": index_kind(index, len(data.corpus)), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    """The stage (`python -m pipeline.evaluate [--params FILE]`), or with --model and --beir one
    model scored on one BEIR folder, its metrics written as JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument("--model", help="a SparseEncoder folder, or a *ForMaskedLM folder (SPLADE head applied)")
    parser.add_argument("--beir", help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("--batch-size", type=int, default=EvaluateConfig().batch_size)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--max-active-dims", type=int, nargs="*", default=[])
    parser.add_argument("--index", choices=["auto", "exact", "seismic"], default="auto",
                        help="top-100 search: exact, or seismic (approximate; auto: past 2M documents)")
    parser.add_argument("--out", help="JSON file for the metrics (default: print them)")
    args = parser.parse_args(argv)
    if not (args.model or args.beir):
        return run_stage(run, args.params)
    if not (args.model and args.beir):
        parser.error("--model and --beir go together")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = evaluate_folder(Path(args.model), Path(args.beir), args.split, args.max_seq_length,
                                 args.batch_size, args.precision, args.max_active_dims,
                                 IndexConfig(kind=args.index))
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.out:
        write_json(Path(args.out), result)
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
