"""Scoring sparse encoders on retrieval sets as sentence-transformers' SparseInformationRetrievalEvaluator does
(its metrics, within 1e-4, tested) from one encoding of each model: the corpus in resumable shards that
ranks split (Sharding), each query's top 100 from pipeline.retrieval.search, the metrics pooled over sets
as SparseNanoBEIREvaluator pools them, and BM25 (bm25s) on the same sets. The evaluate stage and the
benches call it."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import (
    EXPORT_DIR,
    IndexConfig,
    RayConfig,
)
from pipeline.data.shards import wait_for_shards
from pipeline.data.snapshots import id_texts_digest, texts_between
from pipeline.data.sources import RetrievalSet, read_retrieval_set
from pipeline.evaluation.measures import (
    HEADLINE,
    judged_queries,
    mean_metrics,
    per_query_values,
    scored_ranking,
    untied,
)
from pipeline.modelling import splade_head
from pipeline.modelling.encoders import load_encoder
from pipeline.modelling.onnx import onnx_encoder, onnx_path
from pipeline.retrieval.search import CorpusShards, exact_search, search
from pipeline.runtime import (
    folder_digest,
    use_bf16,
)
from pipeline.tracking.records import replace_folder

if TYPE_CHECKING:
    import scipy.sparse
    import torch


log = logging.getLogger(__name__)


DEPTH = 100  # documents retrieved per query: the deepest cut-off among the metrics (map@100)


@dataclass
class Sharding:
    """Where a corpus's vectors go (one file per `shard_docs` documents, kept across runs: a rerun, or
    a run after a killed one, encodes only the missing shards) and which of them this process
    encodes: under torchrun, or RANK / WORLD_SIZE set by hand on machines sharing the folder, rank r
    takes shards r, r+N, ... and rank 0 waits for the rest, as the teacher splits its scoring. With
    `ray`, Ray workers (pipeline.data.ray_shards) encode them instead, into the same files."""
    folder: Path
    shard_docs: int = 100_000
    rank: int = 0
    world_size: int = 1
    wait_seconds: float = 1800
    ray: RayConfig | None = None  # backend ray: Ray workers encode the missing shards, this process writes them


@dataclass
class Encoded:
    """A model's vectors for an evaluation set: one CSR row per judged query, the corpus in shards."""
    query_ids: list[str]
    queries: "scipy.sparse.csr_matrix"
    doc_ids: list[str]
    corpus: CorpusShards


def to_csr(vectors: "torch.Tensor") -> "scipy.sparse.csr_matrix":
    from scipy.sparse import csr_matrix

    coo = vectors.coalesce()
    rows, cols = coo.indices().numpy()
    matrix = csr_matrix((coo.values().numpy(), (rows, cols)), shape=tuple(coo.shape))
    matrix.eliminate_zeros()
    return matrix


def model_identity(model_dir: Path, onnx_file: Path | None = None) -> str:
    """sha256 of every file that shapes the model's vectors: its folder but the card, and the ONNX file
    that runs it, if any."""
    return folder_digest(model_dir, lambda path: path.name != "README.md", onnx_file)


def corpus_shards(model, identity: str, data: RetrievalSet, batch_size: int, bf16: bool,
                  sharding: Sharding) -> CorpusShards:
    """The corpus's vectors under this model, its shards named by everything that shapes them."""
    key = {"model": identity, "corpus": id_texts_digest(data.corpus), "batch_size": batch_size, "bf16": bf16,
           "max_seq_length": model.max_seq_length, "max_active_dims": model.max_active_dims}
    return CorpusShards(sharding.folder, key, len(data.corpus), model.get_embedding_dimension(),
                        sharding.shard_docs)


def encode_shards(model, data: RetrievalSet, shards: CorpusShards, batch_size: int, bf16: bool,
                  sharding: Sharding) -> dict:
    """Encode this rank's missing corpus shards; returns how many it found and encoded."""
    mine, todo = shards.owed(sharding.rank, sharding.world_size)
    for index in todo:
        texts = texts_between(data.corpus, shards.rows(index).start, shards.rows(index).stop)
        log.info("rank %d/%d: corpus shard %d of %d (%d documents)", sharding.rank, sharding.world_size,
                 index + 1, shards.count, len(texts))
        shards.write(index, to_csr(splade_head.encode(model, texts, "document", batch_size, bf16,
                                                      show_progress_bar=True)))
    return {"shards": shards.count, "shards_reused": len(mine) - len(todo), "shards_encoded": len(todo)}


def encode_documents(held: tuple, texts: list[str], batch_size: int, bf16: bool) -> "scipy.sparse.csr_matrix":
    """A Ray worker's shard: `held` is what scored_model gave it."""
    return to_csr(splade_head.encode(held[0], texts, "document", batch_size, bf16))


def runs_bf16(held: tuple, precision: str) -> bool:
    return use_bf16(precision, held[0].device.type)


def encode(model, identity: str, data: RetrievalSet, batch_size: int, sharding: Sharding,
           bf16: bool = False, workers=None) -> Encoded:
    """The judged queries (as the stock evaluator) and the corpus, in shards on disk: this rank's
    encoded here and the others' waited for, or with `workers` (RayWorkers) the missing ones
    encoded by them. (A shard's COO tensor, int64 coordinates, is 2.5 times its CSR rows: one
    tensor for 8.8M passages would not fit.)"""
    shards = corpus_shards(model, identity, data, batch_size, bf16, sharding)
    if workers is None:
        encode_shards(model, data, shards, batch_size, bf16, sharding)
        wait_for_shards(shards, sharding.world_size, sharding.wait_seconds, "python -m pipeline.stages.evaluate")
    else:
        texts = lambda index: texts_between(data.corpus, shards.rows(index).start, shards.rows(index).stop)  # noqa: E731
        workers.map(shards.missing(), lambda index: (texts(index), batch_size, bf16), encode_documents,
                    shards.write, lambda index: len(shards.rows(index)), "doc")
    query_ids = [q for q in data.qrels if q in data.queries]
    log.info("encoding %d queries", len(query_ids))
    queries = to_csr(splade_head.encode(model, [data.queries[q] for q in query_ids], "query", batch_size, bf16))
    return Encoded(query_ids, queries, list(data.corpus), shards)


def keep_top(matrix: "scipy.sparse.csr_matrix", k: int) -> "scipy.sparse.csr_matrix":
    """Each row's k largest values (sentence-transformers' max_active_dims), the rest dropped."""
    from scipy.sparse import csr_matrix

    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, rows))  # by row, largest first
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - matrix.indptr[rows[order]]
    keep = rank < k
    return csr_matrix((matrix.data[keep], (rows[keep], matrix.indices[keep])), shape=matrix.shape)


class CappedShards:
    """A corpus's shards with each vector's top-k dimensions kept, one shard at a time."""

    def __init__(self, shards: CorpusShards, k: int):
        self.shards, self.k = shards, k
        self.docs, self.dims, self.shard_docs = shards.docs, shards.dims, shards.shard_docs

    def __iter__(self):
        return (keep_top(shard, self.k) for shard in self.shards)

    @property
    def nnz(self) -> int:
        return int(np.minimum(self.shards.document_lengths(), self.k).sum())


@dataclass
class SetScores:
    """One set's metrics, and how many of its queries / documents use each dimension (sets pool
    their sparsity statistics through these, as SparseNanoBEIREvaluator pools them), and what found
    each query's best documents."""
    metrics: dict[str, float]
    query_counts: np.ndarray
    doc_counts: np.ndarray
    queries: int
    docs: int
    index: dict
    ranking: dict[str, dict[str, float]] | None = None  # {query id: {doc id: score}}, the top DEPTH
    per_query: pd.DataFrame | None = None  # the headline metrics of each query


def retrieval_scores(vectors: Encoded, data: RetrievalSet, k: int | None = None,
                     index: IndexConfig = IndexConfig()) -> SetScores:
    """What SparseInformationRetrievalEvaluator reports (ranking metrics, active dims, sparsity
    ratios, avg_flops), from vectors already encoded, keeping each vector's top-k dimensions when
    k is given: encoding with max_active_dims=k gives the same, but re-encodes the corpus per k."""
    queries = keep_top(vectors.queries, k) if k else vectors.queries
    corpus = CappedShards(vectors.corpus, k) if k else vectors.corpus
    width = queries.shape[1]
    log.info("searching %d queries over %d documents%s", queries.shape[0], corpus.docs,
             f" (each vector's top {k} dimensions)" if k else "")
    found, facts = search(corpus, queries, index, DEPTH)
    ranking = {q: {vectors.doc_ids[j]: float(v) for j, v in zip(indices, values)}
               for q, (indices, values) in zip(vectors.query_ids, found)}
    if not facts["rank_safe"] and k is None:
        facts["against_exact"] = approximation_check(vectors, data, corpus, queries, ranking, index)
    doc_counts = np.zeros(width)
    for shard in corpus:
        doc_counts += np.bincount(shard.indices, minlength=width)
    query_dims, corpus_dims = float(np.diff(queries.indptr).mean()), float(doc_counts.sum() / corpus.docs)
    ranked, per_query, ranking = scored_ranking(data, ranking)
    metrics = {**ranked, "query_active_dims": query_dims, "query_sparsity_ratio": 1 - query_dims / width,
               "corpus_active_dims": corpus_dims, "corpus_sparsity_ratio": 1 - corpus_dims / width}
    result = SetScores(metrics, np.bincount(queries.indices, minlength=width).astype(float), doc_counts,
                       queries.shape[0], corpus.docs, facts, ranking, per_query)
    result.metrics["avg_flops"] = pooled_flops([result])
    return result


def approximation_check(vectors: Encoded, data: RetrievalSet, corpus, queries, ranking: dict,
                        cfg: IndexConfig) -> dict:
    """How far an approximate search's numbers are from exact search's: on sweep_queries of the
    queries (seeded), searched exactly too, the recall@DEPTH of the approximate top DEPTH and the
    difference of each headline metric's mean (approximate − exact)."""
    picks = np.sort(np.random.default_rng(0).choice(len(vectors.query_ids), min(cfg.sweep_queries,
                                                                             len(vectors.query_ids)), replace=False))
    truth = exact_search(corpus, queries[picks], DEPTH, cfg.threads)
    picked = [vectors.query_ids[p] for p in picks]
    exact = {q: {vectors.doc_ids[j]: float(v) for j, v in zip(rows, values)} for q, (rows, values) in zip(picked, truth)}
    sample = RetrievalSet(data.corpus, {q: data.queries[q] for q in picked}, {q: data.qrels[q] for q in picked})
    approximate = per_query_values(sample, untied({q: ranking[q] for q in picked}))
    exhaustive = per_query_values(sample, untied(exact))
    found = [len(set(ranking[q]) & set(exact[q])) / max(1, len(exact[q])) for q in picked]
    return {"sample_queries": len(picks), f"recall_at_{DEPTH}": float(np.mean(found)),
            "difference": {m: float((approximate[m] - exhaustive[m]).mean()) for m in HEADLINE},
            "largest_query_difference": {m: float((approximate[m] - exhaustive[m]).abs().max()) for m in HEADLINE}}


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


def scored_model(model_dir: Path, max_seq_length: int | None, onnx: str | None, export_dir: Path):
    """The model as saved (with `onnx` "int8" or "fp32": its MLM exported to `export_dir` and run by
    ONNX Runtime), and its identity (what names its corpus shards)."""
    if onnx:
        return (onnx_encoder(model_dir, export_dir, onnx),
                model_identity(model_dir, onnx_path(export_dir, model_dir, onnx)))
    return load_encoder(model_dir, max_seq_length), model_identity(model_dir)


def corpus_workers(sharding: Sharding, model_dir: Path, max_seq_length: int | None, onnx: str | None,
                   export_dir: Path):
    """Ray workers holding the model (sharding.ray), or none (a null context) for the local backend."""
    if sharding.ray is None:
        return contextlib.nullcontext()
    from pipeline.data.ray_shards import RayWorkers

    return RayWorkers(sharding.ray, partial(scored_model, model_dir, max_seq_length, onnx, export_dir), "evaluate")


def encode_helper_shards(model_dir: Path, sets: dict[str, RetrievalSet], batch_size: int, precision: str,
                         sharding: Sharding, max_seq_length: int | None = None, onnx: str | None = None,
                         export_dir: Path = EXPORT_DIR) -> dict:
    """A helper rank's part of evaluate_model: its share of each set's corpus shards."""
    model, identity = scored_model(model_dir, max_seq_length, onnx, export_dir)
    bf16 = use_bf16(precision, model.device.type)
    return {name: encode_shards(model, data, corpus_shards(model, identity, data, batch_size, bf16, sharding),
                                batch_size, bf16, sharding)
            for name, data in sets.items()}


def evaluate_model(model_dir: Path, sets: dict[str, RetrievalSet], train: pd.DataFrame, batch_size: int,
                   max_active_dims: list[int], max_seq_length: int | None = None,
                   precision: str = "fp32", index: IndexConfig = IndexConfig(), onnx: str | None = None,
                   export_dir: Path = EXPORT_DIR, sharding: Sharding | None = None) -> dict:
    """Retrieval metrics of the model (see scored_model), and at each top-k size (each set encoded
    once), per set and pooled over the sets, plus the training triplets' accuracy where the training
    set has negatives. Corpus vectors go to `sharding`'s folder (without one, to a temporary folder)."""
    if sharding is None:
        with tempfile.TemporaryDirectory(prefix="eval-shards-") as folder:
            return evaluate_model(model_dir, sets, train, batch_size, max_active_dims, max_seq_length,
                                  precision, index, onnx, export_dir, Sharding(Path(folder)))
    from sentence_transformers.sparse_encoder.evaluation import SparseTripletEvaluator

    model, identity = scored_model(model_dir, max_seq_length, onnx, export_dir)
    per_set, sweeps, doc_dims, digests = {}, [], [], set()
    with corpus_workers(sharding, model_dir, max_seq_length, onnx, export_dir) as workers:
        # on Ray, the precision the workers encode in (their device's) is the queries' too
        bf16 = workers.agreed(runs_bf16, precision) if workers else use_bf16(precision, model.device.type)
        for name, data in sets.items():
            log.info("scoring %s%s on %s", model_dir, f" (ONNX {onnx})" if onnx else "", name)
            vectors = encode(model, identity, data, batch_size, sharding, bf16, workers)
            digests.add(vectors.corpus.digest)
            per_set[name] = retrieval_scores(vectors, data, index=index)
            doc_dims.append(vectors.corpus.document_lengths())
            # each top-k size's pooled metrics only: its rankings are not kept
            sweeps.append({k: replace(retrieval_scores(vectors, data, k, index), ranking=None, per_query=None)
                           for k in max_active_dims})
    metrics = pooled_metrics(list(per_set.values()))
    if "negative" in train:  # pairs: no triplets to check
        log.info("checking %d training triplets", len(train))
        triplets = SparseTripletEvaluator(
            train["query"].tolist(), train["positive"].tolist(), train["negative"].tolist(),
            similarity_fn_names=["dot"], batch_size=batch_size, write_csv=False)
        with splade_head.fused_head(model):  # the same vectors, without the full logits
            metrics.update({f"train_triplets_{k}": float(v) for k, v in triplets(model).items()})
    return {"metrics": metrics, "datasets": {name: scores.metrics for name, scores in per_set.items()},
            "index": {name: scores.index for name, scores in per_set.items()},
            "rankings": {name: scores.ranking for name, scores in per_set.items()},
            "per_query": {name: scores.per_query for name, scores in per_set.items()},
            "max_active_dims": {str(k): pooled_metrics([sweep[k] for sweep in sweeps])
                                for k in max_active_dims},
            "doc_active_dims": np.concatenate(doc_dims), "shard_digests": digests}


def bm25_model(sets: dict[str, RetrievalSet], depth: int = DEPTH, index: IndexConfig = IndexConfig(),
               shard_docs: int = 100_000) -> dict:
    """BM25 (bm25s' tokenizer and weights, English stop words: pipeline.retrieval.bm25) on the same
    sets, the lexical baseline, in evaluate_model's shape (pooled metrics, and per set: metrics,
    ranking, per-query values), its weights in shards of `shard_docs` documents in a temporary folder
    (TMPDIR's), searched as the models' vectors are (`index`). A document with none
    of a query's terms is not retrieved for it (bm25s filled a top 100 with arbitrary ones of score 0
    when fewer matched: on the quickstart's 200 documents, whose BM25 nDCG@10 went from 0.2983 to
    0.2934 when this replaced bm25s' own index). Its ranking metrics
    carry the models' names (dot_ndcg@10, ...) so that the rows compare column by column."""
    from pipeline.retrieval.bm25 import bm25_shards, query_vectors

    datasets, rankings, per_query = {}, {}, {}
    for name, data in sets.items():
        doc_ids = list(data.corpus)
        query_ids = judged_queries(data)
        with tempfile.TemporaryDirectory(prefix="bm25-") as shards_folder:
            log.info("BM25 on %s: weighting %d documents", name, len(doc_ids))
            shards, vocabulary = bm25_shards(partial(texts_between, data.corpus), len(doc_ids), Path(shards_folder),
                                             shard_docs, {"corpus": name})
            log.info("BM25 on %s: searching %d queries", name, len(query_ids))
            found, _ = search(shards, query_vectors([data.queries[q] for q in query_ids], vocabulary), index, depth)
        ranking = {q: {doc_ids[j]: float(s) for j, s in zip(rows, values) if s > 0}  # no query term: not retrieved
                   for q, (rows, values) in zip(query_ids, found)}
        datasets[name], per_query[name], rankings[name] = scored_ranking(data, ranking)
    return {"metrics": mean_metrics(list(datasets.values())), "datasets": datasets, "rankings": rankings,
            "per_query": per_query}


def evaluate_folder(model: Path, beir: Path, split: str, max_seq_length: int | None, batch_size: int,
                    precision: str, max_active_dims: list[int], index: IndexConfig = IndexConfig(),
                    sharding: Sharding | None = None) -> dict:
    """One model on one BEIR folder, outside the pipeline: its metrics and the seconds they took
    (read, encode, retrieve, score). With `sharding`, its corpus vectors are kept there (a rerun
    resumes from them) and ranks can share the encoding."""
    started = time.perf_counter()
    data = read_retrieval_set(beir, split)
    if sharding and sharding.rank > 0:  # a helper rank: its share of the corpus shards; rank 0 scores
        return encode_helper_shards(model, {beir.name: data}, batch_size, precision, sharding,
                                    max_seq_length)[beir.name]
    result = evaluate_model(model, {beir.name: data}, pd.DataFrame(), batch_size, max_active_dims,
                            max_seq_length, precision, index, sharding=sharding)
    return {**result["metrics"], "max_active_dims": result["max_active_dims"],
            "index": result["index"][beir.name], "seconds": time.perf_counter() - started}


def write_runs(folder: Path, rankings: dict[str, dict[str, dict]]) -> None:
    """Each model's ranking of each set (untied: best first, no two scores equal) as a TREC run file,
    <folder>/<set>/<model>.trec ("query Q0 doc rank score model", the top DEPTH), for trec_eval,
    ir-measures or ranx: they compute eval.json's numbers from it."""
    def write(tmp: Path) -> None:
        for model, sets in rankings.items():
            for dataset, ranking in sets.items():
                lines = [f"{query} Q0 {doc} {rank} {score!r} {model}\n"  # repr: every digit, read back equal
                         for query, docs in ranking.items()
                         for rank, (doc, score) in enumerate(docs.items(), 1)]
                (tmp / dataset).mkdir(exist_ok=True)
                (tmp / dataset / f"{model}.trec").write_text("".join(lines))

    replace_folder(folder, write)


def per_query_table(per_query: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """Rows (model, dataset, query_id) with each headline metric: metrics/per_query.csv."""
    return pd.concat([frame.reset_index().assign(model=model, dataset=dataset)
                      for model, sets in per_query.items() for dataset, frame in sets.items()],
                     ignore_index=True)[["model", "dataset", "query_id", *HEADLINE]]
