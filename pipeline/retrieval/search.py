"""Each query's best documents by dot product over sparse vectors, for corpora up to MS MARCO's 8.8M
passages in bounded memory.

The corpus is held on disk as shards of sparse vectors (CorpusShards: scipy CSR rows, `npz`), written
by the encoding ranks; nothing here holds a second full copy of it.
exact: a shard at a time, scipy sparse products against that shard's term-major copy (an inverted
index: one row of postings per dimension), a block of queries at a time, merged into a running top-k:
what the stock evaluator ranks, without its dense (queries x documents) product; evaluate.index.threads
shards at once (scipy releases the GIL). Memory: a shard per thread.
blockmax: pipeline.retrieval.blockmax's block-max pruned index, built shard by shard in a few bytes per posting
(the default past exact_max_docs): rank-safe with every query term and no early stop (the default
settings), approximate with a query_cut or a heap_factor below 1; its candidates rescored exactly.
seismic: approximate, a learned-sparse inverted index (pyseismic-lsr: pruned, clustered posting lists
with summaries), fed shard by shard; its build takes 28 B per posting; its candidates rescored exactly.
An approximate index's build must fit evaluate.index.memory_gb (checked before it starts: kind auto
then searches exactly), and its search parameters can be chosen by a sweep against exact on a sample
of queries. Measured by bench/evaluate_scale.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.cli import StageError
from pipeline.config import IndexConfig
from pipeline.data.shards import ShardFiles
from pipeline.runtime import resident_gb

log = logging.getLogger(__name__)

# an approximate index's build peaks at about this many bytes per posting of the corpus, plus a fixed
# part (bench/evaluate_scale.py, splade-tiny-shaped vectors; seismic: +1.15 GB at 200k documents, 25M
# postings, +6.7 GB at 2M documents, 254M postings; blockmax in blocks of 4, without near-duplicates:
# a 14.6 GB peak at 8.8M documents, 1.11G postings, from a process that held up to 1.9 GB before)
BUILD_BYTES_PER_POSTING = {"seismic": 28, "blockmax": 13}
BUILD_FIXED_BYTES = 2 ** 29
MACHINE_SHARE = 0.75  # evaluate.index.memory_gb null: the share of this machine's memory a build may take
# the search parameters the sweep tries, cheapest first (a query's largest terms, pruning: 1 least);
# denser near 1, where recall@100 0.95 falls at 2M documents (0.92 with 16 terms: 0.955, 0.9: 0.93)
SWEEP_QUERY_CUTS = (5, 8, 12, 16, 20, 30)
SWEEP_HEAP_FACTORS = (0.8, 0.9, 0.92, 0.95, 1.0)
ALL_TERMS = 2 ** 20  # a query_cut past any query's length: every term searched
FINALISTS = 3  # the fastest settings that reach the target, timed three times more before one is chosen


class CorpusShards(ShardFiles):
    """A corpus's vectors, `shard_docs` documents per shard file, in document order; `key` says what
    determines them (model, documents, settings). Iterating loads one shard at a time."""

    def __init__(self, folder: Path, key: dict, docs: int, dims: int, shard_docs: int):
        super().__init__(folder, {**key, "docs": docs, "dims": dims, "shard_docs": shard_docs},
                         max(1, -(-docs // shard_docs)), ".npz")
        self.docs, self.dims, self.shard_docs = docs, dims, shard_docs

    def rows(self, index: int) -> range:
        return range(index * self.shard_docs, min(self.docs, (index + 1) * self.shard_docs))

    def write(self, index: int, vectors) -> None:
        from scipy.sparse import save_npz

        from pipeline.tracking.records import write_atomically

        if vectors.shape[0] != len(self.rows(index)):
            raise ValueError(f"shard {index} holds rows {self.rows(index)}, not {vectors.shape[0]}")
        def save(tmp: Path) -> None:
            with tmp.open("wb") as handle:  # a file object: savez would append .npz to a bare name
                save_npz(handle, vectors.tocsr(), compressed=False)

        write_atomically(self.path(index), save)  # a killed rank leaves no half-written shard

    def load(self, index: int):
        from scipy.sparse import load_npz

        return load_npz(self.path(index)).tocsr()

    def __iter__(self):
        return (self.load(i) for i in range(self.count))

    def document_lengths(self) -> np.ndarray:
        """Each document's active dimensions, read from the shards' row offsets only."""
        return np.concatenate([np.diff(np.load(self.path(i))["indptr"]) for i in range(self.count)])

    @property
    def nnz(self) -> int:
        """Postings in the whole corpus."""
        return int(self.document_lengths().sum())


def shard_top(shard, queries, depth: int, max_cells: int = 2 ** 23) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores): each query's `depth` best rows of one shard (fewer when it is smaller), unsorted.
    Memory: one block of dense scores (max_cells, 16 bytes each with its argpartition) besides the
    results, whatever the number of queries."""
    by_dimension = shard.T.tocsr()  # once per shard: one row of postings per dimension
    depth = min(depth, shard.shape[0])
    block = max(1, max_cells // max(1, shard.shape[0]))  # a block's dense scores stay under max_cells
    rows = np.empty((queries.shape[0], depth), dtype=np.int64)
    scores = np.empty((queries.shape[0], depth), dtype=np.float32)
    for start in range(0, queries.shape[0], block):
        dense = (queries[start:start + block] @ by_dimension).toarray()
        best = np.argpartition(-dense, depth - 1, axis=1)[:, :depth]
        # copied out: a slice kept as it is would keep the block's whole argpartition alive
        rows[start:start + len(best)] = best
        scores[start:start + len(best)] = np.take_along_axis(dense, best, axis=1)
    return rows, scores


def exact_search(corpus, queries, depth: int = 100, threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(document rows, scores) of each query's `depth` best, best first, in query order: the corpus's
    shards scored `threads` at a time (scipy's products release the GIL; 0: every core), each shard's
    best merged into a running top-k in shard order, so the result does not depend on `threads`.
    Memory: `threads` shards and the one being read."""
    best_rows = np.zeros((queries.shape[0], 0), dtype=np.int64)
    best_scores = np.zeros((queries.shape[0], 0), dtype=np.float32)

    def merge(offset: int, found) -> None:
        nonlocal best_rows, best_scores
        rows, scores = found.result()
        best_rows = np.concatenate([best_rows, rows + offset], axis=1)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        if best_rows.shape[1] > depth:
            keep = np.argpartition(-best_scores, depth - 1, axis=1)[:, :depth]
            best_rows, best_scores = (np.take_along_axis(m, keep, axis=1) for m in (best_rows, best_scores))

    threads = threads or os.cpu_count() or 1
    pending, offset = deque(), 0
    with ThreadPoolExecutor(threads) as pool:
        for shard in corpus:  # read here while the workers score the shards before it
            pending.append((offset, pool.submit(shard_top, shard, queries, depth)))
            offset += shard.shape[0]
            if len(pending) == threads:
                merge(*pending.popleft())
        while pending:
            merge(*pending.popleft())
    order = np.lexsort((best_rows, -best_scores), axis=1) if best_rows.size else best_rows
    return list(zip(np.take_along_axis(best_rows, order, axis=1), np.take_along_axis(best_scores, order, axis=1)))


def machine_memory_gb() -> float:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def over_budget(kind: str, corpus, memory_gb: float | None) -> str | None:
    """Why the `kind` index's build (estimated from the corpus's postings) would not fit in memory_gb
    (None: MACHINE_SHARE of this machine's memory) beside what the process holds now (its resident
    memory: models, ids, vectors), or None."""
    postings = corpus.nnz
    build = BUILD_BYTES_PER_POSTING[kind] * postings + BUILD_FIXED_BYTES
    held = resident_gb() * 2 ** 30
    if memory_gb is None:
        machine = machine_memory_gb()
        budget, named = MACHINE_SHARE * machine, f"null: {MACHINE_SHARE:g} of this machine's {machine:.1f} GB"
    else:
        budget, named = memory_gb, f"{memory_gb:g} GB"
    if build + held <= budget * 2 ** 30:
        return None
    return (f"the {kind} index of {corpus.docs:,} documents ({postings:,} postings) needs about "
            f"{build / 2 ** 30:.1f} GB to build (measured: {BUILD_BYTES_PER_POSTING[kind]} B per posting and "
            f"0.5 GB) beside the {held / 2 ** 30:.1f} GB this process holds, {(build + held) / 2 ** 30:.1f} GB "
            f"in all, over evaluate.index.memory_gb ({named})")


def refuse(too_big: str) -> StageError:
    """The error an explicit approximate kind stops with when its build would not fit."""
    return StageError(f"{too_big}. Raise evaluate.index.memory_gb on a machine that has it, or set "
                      "evaluate.index.kind: exact (streamed shard by shard: a shard per thread in memory, slower)")


class SeismicIndex:
    """Seismic over the corpus rows; components are dimension ids, documents their row numbers."""

    def __init__(self, corpus, query_cut: int = 20, heap_factor: float = 0.8, search_threads: int = 0,
                 memory_gb: float | None = None):
        try:
            from seismic import SeismicDataset
            from seismic import SeismicIndex as Index
        except ImportError:
            raise StageError("evaluate.index seismic needs pyseismic-lsr: pip install -e '.[scale]' "
                             "(or set evaluate.index: exact)") from None
        too_big = over_budget("seismic", corpus, memory_gb)
        if too_big:
            raise refuse(too_big)
        dataset = SeismicDataset(dim=corpus.dims)
        for offset, shard in zip(range(0, corpus.docs, corpus.shard_docs), corpus):
            shard.sort_indices()  # seismic wants increasing components within a row
            dataset.add_documents_by_id([str(offset + row) for row in range(shard.shape[0])],
                                        shard.indices.astype(np.int64), shard.data.astype(np.float32),
                                        shard.indptr.astype(np.int64))
        self.index = Index.build_from_dataset(dataset)  # on every core
        self.query_cut, self.heap_factor, self.search_threads = query_cut, heap_factor, search_threads

    def search(self, queries, depth: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
        from seismic import get_seismic_string

        text = get_seismic_string()
        spans = [slice(queries.indptr[q], queries.indptr[q + 1]) for q in range(queries.shape[0])]
        results = self.index.batch_search(
            np.array([str(q) for q in range(queries.shape[0])], dtype=text),
            [queries.indices[s].astype(str).astype(text) for s in spans],
            [queries.data[s].astype(np.float32) for s in spans],
            k=depth, query_cut=self.query_cut, heap_factor=self.heap_factor, num_threads=self.search_threads)
        by_query = {hits[0][0]: hits for hits in results if hits}  # results come in no set query order
        found = []
        for q in range(queries.shape[0]):
            hits = sorted(by_query.get(str(q), []), key=lambda hit: -hit[1])
            found.append((np.array([int(doc) for _, _, doc in hits], dtype=np.int64),
                          np.array([score for _, score, _ in hits], dtype=np.float32)))
        return found


def recall(found: list[tuple[np.ndarray, np.ndarray]], truth: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean fraction of each query's exact top-k that `found` has."""
    return float(np.mean([len(np.intersect1d(f, t)) / max(1, len(t)) for (f, _), (t, _) in zip(found, truth)]))


def sweep(index, corpus, queries, target: float, sample: int, depth: int = 100,
          seed: int = 0, threads: int = 1, grid: dict[str, tuple] | None = None,
          tried: list[dict] | None = None) -> dict:
    """An approximate index's search parameters (`grid`: each attribute's values, every combination
    tried; by default blockmax's or seismic's query_cut and heap_factor) chosen on `sample` of the
    queries: of the settings whose recall@depth against exact reaches `target`, the fastest (one
    thread, the fastest of two runs; the FINALISTS fastest timed again, in turns); when none does,
    the most accurate. Leaves them set on the index and returns what was tried and chosen.
    `tried`: an earlier sweep's, on the same index, queries and sample, for another target: its
    recalls and times are reused rather than the grid searched again."""
    grid = grid or {"query_cut": SWEEP_QUERY_CUTS, "heap_factor": SWEEP_HEAP_FACTORS}
    picks = np.sort(np.random.default_rng(seed).choice(queries.shape[0], min(sample, queries.shape[0]),
                                                       replace=False))
    probe = queries[picks]

    def timed(setting: dict, runs: int):
        """The setting's ms/query: the fastest of `runs` (a shared machine's noise is one-sided)."""
        for name in grid:
            setattr(index, name, setting[name])
        index.search_threads = 1
        for _ in range(runs):
            started = time.perf_counter()
            found = index.search(probe, depth)
            ms = 1000 * (time.perf_counter() - started) / len(picks)
            setting["ms_per_query"] = min(setting.get("ms_per_query", ms), ms)
        return found

    if tried is None:
        truth = exact_search(corpus, probe, depth, threads)
        tried = []
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values))
            setting[f"recall_at_{depth}"] = recall(timed(setting, 2), truth)
            tried.append(setting)
    meeting = [t for t in tried if t[f"recall_at_{depth}"] >= target]
    finalists = sorted(meeting, key=lambda t: t["ms_per_query"])[:FINALISTS]
    for _ in range(3 if len(finalists) > 1 else 0):  # in turns, so that a burst of noise slows them alike
        for setting in finalists:
            timed(setting, 1)
    chosen = (min(meeting, key=lambda t: t["ms_per_query"]) if meeting
              else max(tried, key=lambda t: (t[f"recall_at_{depth}"], -t["ms_per_query"])))
    for name in grid:
        setattr(index, name, chosen[name])
    index.search_threads = 0
    return {**chosen, "recall_target": target, "target_met": bool(meeting), "sample_queries": len(picks),
            "tried": tried}


def index_kind(cfg: IndexConfig, docs: int) -> str:
    """exact, blockmax or seismic; auto: exact up to cfg.exact_max_docs documents, blockmax past it
    (search() also checks its memory)."""
    if cfg.kind != "auto":
        return cfg.kind
    return "exact" if docs <= cfg.exact_max_docs else "blockmax"


def rescore(corpus, queries, found: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each query's candidates with their exact dot products, best first (ties by row): an index
    scores with its quantized weights, the metrics read what exact search and the stock evaluator
    score. One shard in memory at a time."""
    owner = np.repeat(np.arange(len(found)), [len(rows) for rows, _ in found])
    rows = np.concatenate([rows for rows, _ in found]) if found else np.empty(0, np.int64)
    scores = np.zeros(len(rows), np.float32)
    for index, shard in enumerate(corpus):
        first = index * corpus.shard_docs
        here = np.flatnonzero((rows >= first) & (rows < first + shard.shape[0]))
        if len(here):
            products = shard[rows[here] - first].multiply(queries[owner[here]])
            scores[here] = np.asarray(products.sum(axis=1), dtype=np.float32).ravel()
    out, start = [], 0
    for candidates, _ in found:
        mine = slice(start, start + len(candidates))
        order = np.lexsort((rows[mine], -scores[mine]))
        out.append((rows[mine][order], scores[mine][order]))
        start += len(candidates)
    return out


def search(corpus, queries, cfg: IndexConfig, depth: int = 100) -> tuple[list, dict]:
    """Each query's `depth` best (rows, scores), and what found them (eval.json's "index": the kind,
    whether it is rank-safe, the build and the settings)."""
    kind, facts = index_kind(cfg, corpus.docs), {}
    too_big = None if kind == "exact" else over_budget(kind, corpus, cfg.memory_gb)
    if too_big and cfg.kind == "auto":  # auto: what fits; an explicit approximate kind is refused instead
        log.warning("evaluate.index auto: exact search (a shard per thread in memory, slower) instead of %s: %s",
                    kind, too_big)
        kind, facts = "exact", {f"{kind}_skipped": too_big}
    elif too_big:
        raise refuse(too_big)
    if kind == "exact":
        return exact_search(corpus, queries, depth, cfg.threads), {"kind": "exact", "rank_safe": True, **facts}
    log.info("building the %s index over %d documents", kind, corpus.docs)
    started = time.perf_counter()
    query_cut = cfg.query_cut or ALL_TERMS
    if kind == "seismic":
        index = SeismicIndex(corpus, query_cut, cfg.heap_factor)  # its budget: checked above
    else:
        from pipeline.retrieval.blockmax import BlockMaxIndex

        index = BlockMaxIndex(corpus, cfg.block_size, query_cut, cfg.heap_factor, threads=cfg.threads)
    facts = {"kind": kind, "rank_safe": cfg.rank_safe(kind), "build_seconds": time.perf_counter() - started,
             "query_cut": cfg.query_cut, "heap_factor": cfg.heap_factor}
    if kind == "blockmax":
        facts.update(block_size=cfg.block_size, index_gb=index.nbytes / 2 ** 30)
    if cfg.recall_target is not None:
        facts.update(sweep(index, corpus, queries, cfg.recall_target, cfg.sweep_queries, depth, threads=cfg.threads))
    log.info("searching the %s index", kind)
    return rescore(corpus, queries, index.search(queries, depth)), facts
