"""The evaluate stage's retrieval over N synthetic documents shaped like MS MARCO SPLADE vectors.

Shape: splade-tiny's vectors of the shared MS MARCO passages (../shared/data/beir/trec-dl19-subset,
5,000 passages; its 50 queries and the 100 queries of ../shared/data/msmarco-toy-triplets), encoded
once and cached in bench/.cache/. Two generators (--corpus), both keeping the real vectors' lengths,
term frequencies and weights rather than a uniform or Zipf law:
- mixed (the default): each document's terms are drawn from three different random real passages,
  as many as a random real passage holds, each with its own real weight scaled by a log-normal
  factor (sigma 0.2). A document shares about a third of its terms with any one of its sources, and
  two documents rarely share two sources: no clusters of near-duplicates for an index to lay into
  tight blocks (real MS MARCO has 8.8M distinct passages).
- perturbed (the earlier figures'): each document is one real passage perturbed: each term kept
  with probability 0.8, each dropped one replaced by a term drawn by its document frequency, with a
  real weight, every weight scaled as above. At 2M documents each passage is copied ~400 times:
  clusters of near-duplicates, which flatter block-max indexes.
Queries are real query vectors perturbed as in `perturbed`, for both.

Documents are written shard by shard (pipeline.retrieval.search.CorpusShards, as the evaluate stage's ranks
write them) to a temporary folder; then, on the same vectors and queries:
- exact: pipeline.retrieval.search.exact_search, one shard in memory at a time, one thread; then again on
  every core (--threads), a shard per thread, checked to return the same;
- each index of --indexes in turn, built (build seconds, the process's peak RSS from the build's
  start, the index's size), searched rank-safe where it can be, then, for each --recall-targets
  value, its settings swept (pipeline.retrieval.search.sweep, on --sweep-queries queries) for the
  fastest that reaches the target, and every query searched with them on one thread:
  - blockmax (pipeline.retrieval.blockmax.BlockMaxIndex, built on every core): rank-safe as the
    evaluate stage runs it past exact_max_docs (every query term, heap_factor 1, the candidates
    rescored exactly); swept over query_cut and heap_factor;
  - bmp (the BMP authors' engine), fed blockmax's document order, its weights in a byte as it stores
    them: rank-safe at alpha = beta = 1; swept over alpha and beta (BMP_GRID);
  - PISA through pyterrier-pisa, the same order and integer weights: its rank-safe algorithms
    (PISA_ALGORITHMS), nothing to sweep;
  - Seismic (pipeline.retrieval.search.SeismicIndex, the library's default build) under --memory-gb
    (refused before building when its estimate does not fit): swept over SEISMIC_GRID, which holds
    its guide's settings.
Prints one JSON line: the corpus, its shape, exact's ms/query, and per index its build, rank-safe
search and settings, ms/query and recall@100 against exact at each target.
    python bench/evaluate_scale.py --docs 2000000 [--queries 500] [--memory-gb 20] [--indexes blockmax,seismic]
    python bench/evaluate_scale.py --docs 8841823 --indexes blockmax --rank-safe-only --timed-queries 6980
        # MS MARCO's size, and its dev queries' number timed end to end
    python bench/evaluate_scale.py --smoke   # 3,000 documents from 200 passages, not cached (seconds)
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
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(os.environ.get("SPLADE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CACHE = {name: Path(__file__).resolve().parent / ".cache" / f"splade-tiny-msmarco-{name}.npz"
         for name in ("passages", "queries")}
KEEP, NOISE = 0.8, 0.2
# the peers' sweeps: bmp's threshold factor and share of query terms; Seismic's own search settings
# (its guide: query_cut 10, heap_factor in [0.7, 1]) inside a grid wider than blockmax's
# (bmp's grid is small: at 2M documents a setting near 1 costs it ~0.2 s/query on this machine)
BMP_GRID = {"alpha": (1.0, 0.95, 0.9, 0.8), "beta": (1.0, 0.8, 0.6)}
SEISMIC_GRID = {"query_cut": (3, 5, 8, 10, 15, 20, 30), "heap_factor": (0.6, 0.7, 0.8, 0.9, 1.0)}
PISA_ALGORITHMS = ("block_max_wand", "maxscore", "block_max_maxscore")


@contextmanager
def stdout_to_stderr():
    """Seismic's build and PISA print their progress on file descriptor 1: keep stdout for the JSON line."""
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


def reset_peak_rss() -> None:
    """Start the kernel's peak-RSS count (VmHWM) afresh, so that each index's peak is its own."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset_gb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 2 ** 20, 3)


def real_vectors(limit: int | None = None):
    """(passages, queries): splade-tiny's vectors of the shared MS MARCO passages and queries (with
    `limit`, of the first `limit` of each, encoded afresh and not cached)."""
    from scipy.sparse import load_npz

    if limit or not all(path.exists() for path in CACHE.values()):
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
        vectors = {name: to_csr(splade_head.encode(model, texts[name][:limit], side, 64, False, show_progress_bar=True))
                   for name, side in (("passages", "document"), ("queries", "query"))}
        if limit:
            return vectors["passages"], vectors["queries"]
        for name, matrix in vectors.items():
            write_atomically(CACHE[name], lambda tmp: save_csr(tmp, matrix))
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


@njit(cache=True)
def shuffled_within(starts, keys):
    """np.lexsort((keys, group)) for rows grouped at `starts` (each group's rows ordered by their keys,
    ties in place), a group at a time: the same order, 8 times faster than lexsort's sort of them all."""
    order = np.empty(len(keys), np.int64)
    for g in range(len(starts) - 1):
        lo, hi = starts[g], starts[g + 1]
        order[lo:hi] = lo + np.argsort(keys[lo:hi], kind="mergesort")
    return order


def mixed(rng, passages, rows: int):
    """`rows` vectors, each drawn from three different random passages (see the module's docstring):
    as many of their terms, without replacement, as a random passage holds, each term's weight its
    own scaled by a log-normal factor; a term two sources share keeps one entry (the weights summed)."""
    from scipy.sparse import csr_matrix

    sources = rng.integers(0, passages.shape[0], (rows, 3))
    while (clash := (sources[:, 0] == sources[:, 1]) | (sources[:, 0] == sources[:, 2])
           | (sources[:, 1] == sources[:, 2])).any():
        sources[clash] = rng.integers(0, passages.shape[0], (int(clash.sum()), 3))
    pooled = passages[sources.ravel()].tocoo()
    doc = pooled.row // 3
    starts = np.searchsorted(doc, np.arange(rows + 1))
    order = shuffled_within(starts, rng.random(pooled.nnz))  # each document's pooled terms, shuffled
    doc, col, data = doc[order], pooled.col[order], pooled.data[order]
    lengths = np.diff(passages.indptr)[rng.integers(0, passages.shape[0], rows)]
    keep = np.arange(len(doc)) - starts[doc] < lengths[doc]
    data = (data[keep] * rng.lognormal(0.0, NOISE, int(keep.sum()))).astype(np.float32)
    matrix = csr_matrix((data, (doc[keep], col[keep])), shape=(rows, passages.shape[1]))
    matrix.sum_duplicates()
    return matrix


def quantized_rows(corpus, order, scale: float):
    """(corpus row, {term id: weight / scale rounded, at least 1}) for each row of `order`: the
    integer weights the peers index. Each shard is loaded once when `order` keeps to one shard at a
    time (blockmax's order does: it reorders within shards)."""
    loaded, terms, weights, indptr = -1, None, None, None
    for row in order:
        if row // corpus.shard_docs != loaded:
            loaded = row // corpus.shard_docs
            shard = corpus.load(loaded)
            terms, indptr = shard.indices.astype(str), shard.indptr
            weights = np.maximum(1, np.rint(shard.data / scale)).astype(np.int64)
        local = row - loaded * corpus.shard_docs
        span = slice(indptr[local], indptr[local + 1])
        yield int(row), dict(zip(terms[span].tolist(), weights[span].tolist()))


class BmpPeer:
    """bmp, the BMP authors' engine (Rust, `pip install bmp`), over the corpus in `order` (blockmax's
    bisection order), each document weight in a byte (its largest weight 255), as bmp stores them.
    alpha (the threshold's factor) and beta (the share of the query's terms) are its approximations:
    both 1 search rank-safe, up to the byte weights."""

    def __init__(self, corpus, order, scale: float, folder: Path, block_size: int):
        from bmp import Indexer, Searcher

        indexer = Indexer(str(folder), bsize=block_size, compress_range=False)
        for row, terms in quantized_rows(corpus, order, scale):
            indexer.add_document(str(row), terms)
        indexer.finish()
        self.searcher, self.alpha, self.beta, self.search_threads = Searcher(str(folder)), 1.0, 1.0, 1
        self.nbytes = folder.stat().st_size

    def search(self, queries, depth: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
        found = []
        for q in range(queries.shape[0]):
            span = slice(queries.indptr[q], queries.indptr[q + 1])
            ids, scores = self.searcher.search(dict(zip(queries.indices[span].astype(str).tolist(),
                                                        queries.data[span].astype(float).tolist())),
                                               k=depth, alpha=self.alpha, beta=self.beta)
            found.append((np.array(ids, dtype=np.int64), np.array(scores, dtype=np.float32)))
        return found


class PisaPeer:
    """PISA through pyterrier-pisa (`pip install pyterrier-pisa`) over the corpus in `order`, weights
    as integers (the largest 255, as for bmp; PISA then quantizes its scores), one search thread;
    every PISA algorithm is rank-safe (up to those weights): `algorithm` picks one."""

    def __init__(self, corpus, order, scale: float, folder: Path):
        from pyterrier_pisa import PisaIndex

        self.index = PisaIndex(str(folder), stemmer="none", threads=1)
        self.index.toks_indexer(scale=1.0).index({"docno": str(row), "toks": terms}
                                                  for row, terms in quantized_rows(corpus, order, scale))
        self.algorithm, self.search_threads = "block_max_wand", 1
        # PISA compresses its quantized index at the first search (seconds at 2M): part of the build
        self.search(corpus.load(0)[:1], 1)  # a document as the query: terms the index holds
        self.nbytes = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())

    def search(self, queries, depth: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
        import pandas as pd

        frame = pd.DataFrame({"qid": [str(q) for q in range(queries.shape[0])],
                              "query_toks": [dict(zip(queries[q].indices.astype(str).tolist(),
                                                      queries[q].data.astype(float).tolist()))
                                             for q in range(queries.shape[0])]})
        hits = self.index.quantized(num_results=depth, threads=1, query_algorithm=self.algorithm,
                                    toks_scale=100.0).transform(frame)
        by_query = {qid: group.sort_values("rank") for qid, group in hits.groupby("qid")}
        return [(by_query[str(q)]["docno"].astype(np.int64).to_numpy(), by_query[str(q)]["score"].to_numpy(np.float32))
                if str(q) in by_query else (np.empty(0, np.int64), np.empty(0, np.float32))
                for q in range(queries.shape[0])]


GENERATORS = {"mixed": mixed,
              "perturbed": lambda rng, passages, rows: perturbed(rng, passages, rows, passages)}


def synthetic_corpus(folder: Path, docs: int, shard_docs: int, passages, seed: int, generator: str):
    from pipeline.retrieval.search import CorpusShards

    corpus = CorpusShards(folder, {"synthetic": f"splade-tiny msmarco {generator}", "seed": seed}, docs,
                          passages.shape[1], shard_docs)
    rng = np.random.default_rng(seed)
    for index in range(corpus.count):
        corpus.write(index, GENERATORS[generator](rng, passages, len(corpus.rows(index))))
    return corpus


def main() -> None:
    from pipeline.config import IndexConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=list(GENERATORS), default="mixed", help="the generator (see above)")
    parser.add_argument("--docs", type=int, default=2_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--shard-docs", type=int, default=100_000)
    parser.add_argument("--memory-gb", type=float, default=20.0, help="seismic's build budget")
    parser.add_argument("--recall-targets", default="0.95,0.99", help="recall@100 against exact, each swept")
    parser.add_argument("--sweep-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--indexes", default="blockmax,bmp,pisa,seismic",
                        help="the indexes measured, in turn (the peers take blockmax's document order)")
    parser.add_argument("--block-size", type=int, default=IndexConfig().block_size,
                        help="blockmax's block_size (default: the stage's, %(default)s)")
    parser.add_argument("--bmp-block-size", type=int, default=32, help="bmp's bsize (its README's)")
    parser.add_argument("--rank-safe-only", action="store_true",
                        help="exact on one thread and blockmax rank-safe only (no threaded exact, no sweep)")
    parser.add_argument("--timed-queries", type=int, default=0,
                        help="blockmax: also time rank-safe search and rescoring of this many other queries on one "
                             "thread, end to end, without exact search's comparison (MS MARCO dev has 6,980)")
    parser.add_argument("--threads", type=int, default=0,
                        help="exact search's second run, blockmax's build (0: every core)")
    parser.add_argument("--smoke", action="store_true", help="3,000 documents from 200 passages, 20 queries")
    args = parser.parse_args()
    if args.smoke:
        args.docs, args.queries, args.shard_docs, args.sweep_queries = 3_000, 20, 1_000, 10
    targets = [float(target) for target in args.recall_targets.split(",")]
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

    passages, real_queries = real_vectors(200 if args.smoke else None)
    result = {"corpus": args.corpus, "docs": args.docs, "queries": args.queries, "shard_docs": args.shard_docs,
              "source": {"passages": passages.shape[0], "queries": real_queries.shape[0],
                         "passage_active_dims": round(passages.nnz / passages.shape[0], 1),
                         "query_active_dims": round(real_queries.nnz / real_queries.shape[0], 1)}}
    with tempfile.TemporaryDirectory(prefix="evaluate-scale-", dir=os.environ.get("BENCH_TMP")) as folder:
        started = time.perf_counter()
        corpus = synthetic_corpus(Path(folder), args.docs, args.shard_docs, passages, args.seed, args.corpus)
        queries = perturbed(np.random.default_rng(args.seed + 1), real_queries, args.queries, passages)
        postings = corpus.nnz
        result.update(generate_seconds=round(time.perf_counter() - started, 1),
                      doc_active_dims=round(postings / args.docs, 1),
                      query_active_dims=round(queries.nnz / args.queries, 1), postings=postings,
                      corpus_gb_on_disk=round(sum(corpus.path(i).stat().st_size for i in range(corpus.count)) / 2 ** 30, 2),
                      peak_rss_gb_after_generate=peak_rss_gb())
        print(json.dumps(result), file=sys.stderr, flush=True)

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

        def searched(index) -> tuple[list, float]:
            """All queries on one thread: what it found, ms/query."""
            index.search_threads = 1
            started = time.perf_counter()
            with stdout_to_stderr():  # PISA logs on file descriptor 1
                found = index.search(queries, 100)
            return found, round(1000 * (time.perf_counter() - started) / args.queries, 3)

        def at_recall(index, grid: dict[str, tuple] | None = None) -> dict:
            """For each recall target, the sweep's fastest setting that reaches it on the sweep's
            queries, then every query searched with it on one thread."""
            out, tried = {}, None
            for target in targets:  # one grid search, its recalls and times reused for each target
                chosen = sweep(index, corpus, queries, target, args.sweep_queries, threads=threads, grid=grid,
                               tried=tried)
                tried = chosen["tried"]
                found, ms = searched(index)
                out[f"{target:g}"] = {"setting": {k: chosen[k] for k in grid or ("query_cut", "heap_factor")},
                                      "target_met_on_sweep": chosen["target_met"], "ms_per_query": ms,
                                      "recall_at_100": round(recall(found, truth), 4)}
                if isinstance(index, BlockMaxIndex):
                    out[f"{target:g}"]["blocks_scored_per_query"] = round(float(index.blocks_scored.mean()), 1)
            return out

        def rank_safe(index) -> dict:
            """The evaluate stage's default past exact_max_docs: every query term, no early stop, then
            the candidates rescored exactly; one thread. Compared with exact search's top 100."""
            index.query_cut, index.heap_factor = ALL_TERMS, 1.0
            started = time.perf_counter()
            found, search_ms = searched(index)
            found = rescore(corpus, queries, found)
            seconds = time.perf_counter() - started
            same = [np.array_equal(np.sort(f[0]), np.sort(t[0])) for f, t in zip(found, truth)]
            # a query whose top 100 differs: the swapped documents tie with exact's 100th within the
            # weights' rounding (uint16 of the largest weight per posting)
            gaps = [float(abs(f[1][-1] - t[1][-1]) / max(abs(t[1][-1]), 1e-30)) for f, t, s in zip(found, truth, same)
                    if not s]
            return {"ms_per_query": round(1000 * seconds / args.queries, 2), "search_ms_per_query": search_ms,
                    "recall_at_100": round(recall(found, truth), 6), "queries_with_exact_top_100": int(sum(same)),
                    "largest_relative_gap_at_100th": max(gaps, default=0.0),
                    "blocks_scored_per_query": round(float(index.blocks_scored.mean()), 1)}

        def rank_safe_timed(index, count: int) -> dict:
            """rank_safe's search and rescoring of `count` other queries, timed end to end on one thread."""
            more = perturbed(np.random.default_rng(args.seed + 2), real_queries, count, passages)
            index.query_cut, index.heap_factor, index.search_threads = ALL_TERMS, 1.0, 1
            started = time.perf_counter()
            found = index.search(more, 100)
            search_seconds = time.perf_counter() - started
            rescore(corpus, more, found)
            seconds = time.perf_counter() - started
            return {"queries": count, "seconds": round(seconds, 2), "search_seconds": round(search_seconds, 2),
                    "rescoring_seconds": round(seconds - search_seconds, 2),
                    "ms_per_query": round(1000 * seconds / count, 2)}

        def peer_rank_safe(index, **setting) -> dict:
            for name, value in setting.items():
                setattr(index, name, value)
            found, ms = searched(index)
            return {**setting, "ms_per_query": ms, "recall_at_100": round(recall(found, truth), 6)}

        def built(build) -> tuple[object, dict]:
            reset_peak_rss()
            started = time.perf_counter()
            try:
                with stdout_to_stderr():
                    index = build()
            except StageError as refused:
                return None, {"refused": str(refused)}
            facts = {"build_seconds": round(time.perf_counter() - started, 1), "build_peak_rss_gb": peak_rss_since_reset_gb(),
                     **({"index_gb": round(index.nbytes / 2 ** 30, 3)} if hasattr(index, "nbytes") else {})}
            with stdout_to_stderr():
                index.search(queries[:1], 100)  # compiled (numba) before any search is timed
            return index, facts

        order = np.arange(corpus.docs)  # the peers' document order: blockmax's, once it is built
        byte_scale = (max(float(shard.data.max()) for shard in corpus) / 255  # the peers' weights: the largest 255
                      if {"bmp", "pisa"} & set(args.indexes.split(",")) else None)
        for kind in args.indexes.split(","):
            if kind == "blockmax":
                index, facts = built(lambda: BlockMaxIndex(corpus, args.block_size, threads=threads))
                facts["block_size"] = args.block_size
                order = index.rows
                facts["rank_safe"] = rank_safe(index)
                if args.timed_queries:
                    facts["rank_safe_timed"] = rank_safe_timed(index, args.timed_queries)
                if not args.rank_safe_only:
                    facts["at_recall"] = at_recall(index)
            elif kind == "bmp":
                index, facts = built(lambda: BmpPeer(corpus, order, byte_scale, Path(folder) / "bmp", args.bmp_block_size))
                facts["block_size"] = args.bmp_block_size
                facts["rank_safe"] = peer_rank_safe(index, alpha=1.0, beta=1.0)
                if not args.rank_safe_only:
                    facts["at_recall"] = at_recall(index, BMP_GRID)
            elif kind == "pisa":
                index, facts = built(lambda: PisaPeer(corpus, order, byte_scale, Path(folder) / "pisa"))
                facts["rank_safe"] = {algorithm: peer_rank_safe(index, algorithm=algorithm)
                                      for algorithm in PISA_ALGORITHMS}
            else:
                index, facts = built(lambda: SeismicIndex(corpus, memory_gb=args.memory_gb))
                if index is not None and not args.rank_safe_only:  # it has no rank-safe mode
                    facts["at_recall"] = at_recall(index, SEISMIC_GRID)
            facts["peak_rss_gb_with_searches"] = peak_rss_since_reset_gb()  # since its build began
            result[kind] = facts
            print(json.dumps({kind: facts}), file=sys.stderr, flush=True)  # a long run that stops keeps these
            del index  # its memory back before the next one builds
    result["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
