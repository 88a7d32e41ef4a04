"""Retrieval past the size where brute force is comfortable: 1M synthetic SPLADE-like documents.

Documents and queries are sparse vectors over BERT's 30,522 term ids with realistic SPLADE
statistics: term ids Zipf-distributed (a few terms in most documents, most terms rare), about 150
active dimensions per document and 25 per query, log-normal weights. Each query takes most of its
terms from one document (as a real query shares terms with what it looks for) and the rest at random.

Two ways to get each query's top 100 by dot product:
- exact: the evaluation stage's brute force (scipy sparse products, pipeline.retrieval.ExactIndex);
- seismic: the stage's learned-sparse inverted index (pipeline.retrieval.SeismicIndex over
  pyseismic-lsr), approximate; built on every core, searched on --threads (exact uses one).
Prints one JSON line: for each, build seconds, ms/query, memory of the index, and seismic's
recall@100 against exact.

    python bench/retrieval_scale.py [--docs 1000000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCABULARY = 30522
TERM_ID_OF_RANK = np.random.default_rng(1).permutation(VOCABULARY).astype(np.int32)  # which id is frequent: arbitrary


def zipf_terms(rng, rows: int, draws: int, exponent: float) -> list[np.ndarray]:
    """Each row's distinct term ids from `draws` Zipf-weighted draws (a frequent term repeats)."""
    weights = 1 / np.arange(1, VOCABULARY + 1) ** exponent
    picks = rng.choice(VOCABULARY, size=(rows, draws), p=weights / weights.sum())  # frequency ranks
    picks.sort(axis=1)
    distinct = np.ones_like(picks, dtype=bool)
    distinct[:, 1:] = picks[:, 1:] != picks[:, :-1]
    return [row[keep] for row, keep in zip(picks, distinct)]


def synthetic_collection(docs: int, queries: int, seed: int = 0, exponent: float = 1.0,
                         doc_draws: int = 235, query_own_terms: int = 18, query_random_terms: int = 8):
    """(documents, queries) as CSR matrices of float32 weights."""
    from scipy.sparse import csr_matrix

    rng = np.random.default_rng(seed)
    rows, chunk = [], 100_000
    for start in range(0, docs, chunk):
        rows += zipf_terms(rng, min(chunk, docs - start), doc_draws, exponent)
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    ranks = np.concatenate(rows)
    documents = csr_matrix((term_weights(rng, ranks), TERM_ID_OF_RANK[ranks], indptr), shape=(docs, VOCABULARY))

    query_rows = []
    for target, noise in zip(rng.integers(0, docs, size=queries),
                             zipf_terms(rng, queries, query_random_terms, exponent)):
        own = rows[target]
        query_rows.append(np.union1d(rng.choice(own, size=min(query_own_terms, len(own)), replace=False), noise))
    q_indptr = np.concatenate([[0], np.cumsum([len(r) for r in query_rows])])
    q_ranks = np.concatenate(query_rows)
    return documents, csr_matrix((term_weights(rng, q_ranks), TERM_ID_OF_RANK[q_ranks], q_indptr),
                                 shape=(queries, VOCABULARY))


def term_weights(rng, ranks: np.ndarray) -> np.ndarray:
    """Log-normal weights that grow with a term's rarity, as SPLADE learns (frequent terms weigh
    little): about 0.3 for the most frequent terms, about 2 for the rarest."""
    rarity = np.log1p(ranks) / np.log(VOCABULARY)
    return (rng.lognormal(mean=0.0, sigma=0.4, size=len(ranks)) * (0.3 + 1.7 * rarity)).astype(np.float32)


def csr_bytes(matrix) -> int:
    return matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_search(index, queries, depth: int) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    found = [rows for rows, _ in index.search(queries, depth)]
    return found, round(1000 * (time.perf_counter() - started) / queries.shape[0], 3)


def exact_top(documents, queries, depth: int) -> tuple[list[np.ndarray], dict]:
    from pipeline.retrieval import ExactIndex

    started = time.perf_counter()
    index = ExactIndex(documents)  # the inverted index: one row of postings per term
    built = time.perf_counter() - started
    found, ms = timed_search(index, queries, depth)
    return found, {"build_seconds": round(built, 2), "ms_per_query": ms, "index_mb": round(index.nbytes / 2 ** 20, 1)}


def seismic_top(documents, queries, depth: int, query_cut: int, heap_factor: float,
                threads: int) -> tuple[list[np.ndarray], dict]:
    from pipeline.retrieval import SeismicIndex

    rss_before = peak_rss_mb()
    started = time.perf_counter()
    index = SeismicIndex(documents, query_cut, heap_factor, search_threads=threads)
    built = time.perf_counter() - started
    found, ms = timed_search(index, queries, depth)
    return found, {"build_seconds": round(built, 2), "ms_per_query": ms, "search_threads": threads,
                   "query_cut": query_cut, "heap_factor": heap_factor,
                   # the index itself is not sized by the library: the process's peak memory grew by
                   "index_build_peak_rss_growth_mb": round(peak_rss_mb() - rss_before, 1)}


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--query-cut", type=int, default=20, help="seismic: query terms used")
    parser.add_argument("--heap-factor", type=float, default=0.8, help="seismic: pruning (1: least)")
    parser.add_argument("--threads", type=int, default=1, help="seismic: search threads")
    args = parser.parse_args()

    started = time.perf_counter()
    documents, queries = synthetic_collection(args.docs, args.queries)
    data = {"docs": args.docs, "queries": args.queries, "generate_seconds": round(time.perf_counter() - started, 1),
            "doc_active_dims": round(float(np.diff(documents.indptr).mean()), 1),
            "query_active_dims": round(float(np.diff(queries.indptr).mean()), 1),
            "collection_mb": round(csr_bytes(documents) / 2 ** 20, 1)}
    truth, exact = exact_top(documents, queries, args.depth)
    found, seismic = seismic_top(documents, queries, args.depth, args.query_cut, args.heap_factor, args.threads)
    seismic["recall_at_100"] = round(recall(found, truth), 4)
    print(json.dumps({**data, "exact": exact, "seismic": seismic,
                      "speedup": round(exact["ms_per_query"] / seismic["ms_per_query"], 2)}))


if __name__ == "__main__":
    main()
