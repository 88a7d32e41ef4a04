"""The evaluate stage's retrieval over N synthetic documents shaped like MS MARCO SPLADE vectors.

Shape: splade-tiny's vectors of the shared MS MARCO passages (../shared/data/beir/trec-dl19-subset,
5,000 passages; its 50 queries and the 100 queries of ../shared/data/msmarco-toy-triplets), encoded
once and cached in bench/.cache/. Each synthetic document is a real passage vector perturbed: each
term kept with probability 0.8, each dropped one replaced by a term drawn by its document frequency
among the real passages with a weight drawn from the real weights, every weight scaled by a
log-normal factor (sigma 0.2). So lengths, term frequencies, weights and co-occurrence follow the
real vectors, not a uniform or Zipf law. Queries are real query vectors perturbed the same way.

Documents are written shard by shard (pipeline.retrieval.search.CorpusShards, as the evaluate stage's ranks
write them) to a temporary folder; then the stage's retrieval runs on them:
- exact: pipeline.retrieval.search.exact_search, one shard in memory at a time, one thread; then again on
  every core (--threads), a shard per thread, checked to return the same;
- blockmax rank-safe (the stage's default past exact_max_docs: every query term, heap_factor 1, the
  candidates rescored exactly), on one thread, compared with exact search's top 100;
- approximate, each index in turn: pipeline.retrieval.blockmax.BlockMaxIndex (built on every core, --threads),
  then pipeline.retrieval.search.SeismicIndex under --memory-gb (refused before building when its estimate
  does not fit); each one's query_cut / heap_factor chosen by pipeline.retrieval.search.sweep for
  --recall-target on 200 queries, then all queries searched on one thread.
Prints one JSON line: docs, peak RSS after each phase (the process's peak so far: blockmax runs
before seismic), build seconds, ms/query of exact and approximate, recall@100 of approximate against
exact.

    python bench/evaluate_scale.py --docs 2000000 [--queries 500] [--memory-gb 20] [--indexes blockmax,seismic]
    python bench/evaluate_scale.py --docs 8841823 --indexes blockmax --rank-safe-only   # MS MARCO's size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(os.environ.get("SPLADE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CACHE = {name: Path(__file__).resolve().parent / ".cache" / f"splade-tiny-msmarco-{name}.npz"
         for name in ("passages", "queries")}
KEEP, NOISE = 0.8, 0.2


@contextmanager
def stdout_to_stderr():
    """Seismic's build prints its progress on file descriptor 1: keep stdout for the JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)


def real_vectors():
    """(passages, queries): splade-tiny's vectors of the shared MS MARCO passages and queries."""
    from scipy.sparse import load_npz

    if not all(path.exists() for path in CACHE.values()):
        import pandas as pd

        from pipeline.data.sources import read_retrieval_set
        from pipeline.evaluation.scoring import to_csr
        from pipeline.modelling import splade_head
        from pipeline.modelling.encoders import load_encoder
        from pipeline.tracking.records import write_atomically

        model = load_encoder(SHARED / "models/splade-tiny", 256)
        data = read_retrieval_set(SHARED / "data/beir/trec-dl19-subset", "test")
        triplets = pd.read_csv(SHARED / "data/msmarco-toy-triplets/triplets.tsv", sep="\t", header=None)
        texts = {"passages": list(data.corpus.values()),
                 "queries": list(data.queries.values()) + triplets[0].drop_duplicates().tolist()}
        for name, side in (("passages", "document"), ("queries", "query")):
            vectors = to_csr(splade_head.encode(model, texts[name], side, 64, False, show_progress_bar=True))
            write_atomically(CACHE[name], lambda tmp: save_csr(tmp, vectors))
    return load_npz(CACHE["passages"]), load_npz(CACHE["queries"])


def save_csr(path: Path, matrix) -> None:
    from scipy.sparse import save_npz

    with path.open("wb") as handle:
        save_npz(handle, matrix)


def perturbed(rng, source, rows: int, passages):
    """`rows` vectors, each a random row of `source` perturbed (see the module's docstring): a dropped
    term's replacement drawn by its document frequency among `passages`, its weight from `source`'s."""
    from scipy.sparse import csr_matrix

    frequency = np.bincount(passages.indices, minlength=passages.shape[1]).astype(float)
    term_ids = np.flatnonzero(frequency)

    picked = source[rng.integers(0, source.shape[0], rows)].tocoo()
    keep = rng.random(picked.nnz) < KEEP
    dropped = int((~keep).sum())
    row = np.concatenate([picked.row[keep], picked.row[~keep]])
    col = np.concatenate([picked.col[keep], rng.choice(term_ids, dropped, p=frequency[term_ids] / frequency.sum())])
    data = np.concatenate([picked.data[keep], rng.choice(source.data, dropped)])
    data = (data * rng.lognormal(0.0, NOISE, len(data))).astype(np.float32)
    matrix = csr_matrix((data, (row, col)), shape=(rows, source.shape[1]))  # a repeated term: summed
    matrix.sum_duplicates()
    return matrix


def synthetic_corpus(folder: Path, docs: int, shard_docs: int, passages, seed: int):
    from pipeline.retrieval.search import CorpusShards

    corpus = CorpusShards(folder, {"synthetic": "splade-tiny msmarco", "seed": seed}, docs, passages.shape[1],
                          shard_docs)
    rng = np.random.default_rng(seed)
    for index in range(corpus.count):
        corpus.write(index, perturbed(rng, passages, len(corpus.rows(index)), passages))
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--shard-docs", type=int, default=100_000)
    parser.add_argument("--memory-gb", type=float, default=20.0, help="seismic's build budget")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--sweep-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indexes", default="blockmax,seismic", help="the approximate indexes measured, in turn")
    parser.add_argument("--rank-safe-only", action="store_true",
                        help="exact on one thread and blockmax rank-safe only (no threaded exact, no sweep)")
    parser.add_argument("--threads", type=int, default=0,
                        help="exact search's second run, blockmax's build (0: every core)")
    args = parser.parse_args()
    from pipeline.cli import StageError
    from pipeline.retrieval.blockmax import BlockMaxIndex
    from pipeline.retrieval.search import (
        ALL_TERMS,
        SeismicIndex,
        exact_search,
        recall,
        rescore,
        sweep,
    )

    passages, real_queries = real_vectors()
    result = {"docs": args.docs, "queries": args.queries, "shard_docs": args.shard_docs,
              "source": {"passages": passages.shape[0], "queries": real_queries.shape[0],
                         "passage_active_dims": round(passages.nnz / passages.shape[0], 1),
                         "query_active_dims": round(real_queries.nnz / real_queries.shape[0], 1)}}
    with tempfile.TemporaryDirectory(prefix="evaluate-scale-", dir=os.environ.get("BENCH_TMP")) as folder:
        started = time.perf_counter()
        corpus = synthetic_corpus(Path(folder), args.docs, args.shard_docs, passages, args.seed)
        queries = perturbed(np.random.default_rng(args.seed + 1), real_queries, args.queries, passages)
        postings = corpus.nnz
        result.update(generate_seconds=round(time.perf_counter() - started, 1),
                      doc_active_dims=round(postings / args.docs, 1),
                      query_active_dims=round(queries.nnz / args.queries, 1), postings=postings,
                      corpus_gb_on_disk=round(sum(corpus.path(i).stat().st_size for i in range(corpus.count)) / 2 ** 30, 2),
                      peak_rss_gb_after_generate=peak_rss_gb())

        started = time.perf_counter()
        truth = exact_search(corpus, queries, 100)
        seconds = time.perf_counter() - started
        result["exact"] = {"ms_per_query": round(1000 * seconds / args.queries, 2), "seconds": round(seconds, 1),
                           "peak_rss_gb": peak_rss_gb()}
        threads = args.threads or os.cpu_count()
        started = time.perf_counter()
        threaded = truth if args.rank_safe_only else exact_search(corpus, queries, 100, threads)
        seconds = time.perf_counter() - started
        result["exact_threads"] = None if args.rank_safe_only else {
            "threads": threads, "ms_per_query": round(1000 * seconds / args.queries, 2), "seconds": round(seconds, 1),
            "same_as_one_thread": all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                                      for a, b in zip(truth, threaded)),
            "peak_rss_gb": peak_rss_gb()}

        def approximate(build):
            started = time.perf_counter()
            try:
                with stdout_to_stderr():
                    index = build()
            except StageError as refused:
                return {"refused": str(refused)}
            facts = {"build_seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": peak_rss_gb()}
            if isinstance(index, BlockMaxIndex):
                facts["index_gb"] = round(index.nbytes / 2 ** 30, 3)
                facts["rank_safe"] = rank_safe(index)
                if args.rank_safe_only:
                    return facts
            chosen = sweep(index, corpus, queries, args.recall_target, args.sweep_queries, threads=threads)
            facts["sweep"] = {k: v for k, v in chosen.items() if k != "tried"}
            index.search_threads = 1
            started = time.perf_counter()
            found = index.search(queries, 100)
            facts.update(ms_per_query=round(1000 * (time.perf_counter() - started) / args.queries, 3),
                         recall_at_100=round(recall(found, truth), 4), peak_rss_gb_after_search=peak_rss_gb())
            if isinstance(index, BlockMaxIndex):
                facts["blocks_scored_per_query"] = round(float(index.blocks_scored.mean()), 1)
            return facts

        def rank_safe(index) -> dict:
            """The evaluate stage's default past exact_max_docs: every query term, no early stop, then
            the candidates rescored exactly; one thread. Compared with exact search's top 100."""
            index.query_cut, index.heap_factor, index.search_threads = ALL_TERMS, 1.0, 1
            started = time.perf_counter()
            found = index.search(queries, 100)
            searched = time.perf_counter() - started
            found = rescore(corpus, queries, found)
            seconds = time.perf_counter() - started
            same = [np.array_equal(np.sort(f[0]), np.sort(t[0])) for f, t in zip(found, truth)]
            # a query whose top 100 differs: the swapped documents tie with exact's 100th within the
            # weights' rounding (uint16 of the largest weight per posting)
            gaps = [float(abs(f[1][-1] - t[1][-1]) / max(abs(t[1][-1]), 1e-30)) for f, t, s in zip(found, truth, same)
                    if not s]
            return {"ms_per_query": round(1000 * seconds / args.queries, 2),
                    "search_ms_per_query": round(1000 * searched / args.queries, 2),
                    "recall_at_100": round(recall(found, truth), 6), "queries_with_exact_top_100": int(sum(same)),
                    "largest_relative_gap_at_100th": max(gaps, default=0.0),
                    "blocks_scored_per_query": round(float(index.blocks_scored.mean()), 1)}

        builds = {"blockmax": lambda: BlockMaxIndex(corpus, threads=threads),
                  "seismic": lambda: SeismicIndex(corpus, memory_gb=args.memory_gb)}
        for kind in args.indexes.split(","):
            result[kind] = approximate(builds[kind])
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
