"""Each query's best documents by dot product over sparse vectors (scipy CSR rows).

exact: scipy sparse products against a term-major copy of the corpus (an inverted index: one row
of postings per dimension), a block of queries at a time; what the stock evaluator ranks, without
its dense (queries x documents) product.
seismic: a learned-sparse inverted index (pyseismic-lsr: pruned, clustered posting lists with
summaries), approximate, for corpora where brute force takes too long (MS MARCO's 8.8M passages).
Measured by bench/retrieval_scale.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.cli import StageError
from pipeline.config import IndexConfig


class ExactIndex:
    kind = "exact"

    def __init__(self, corpus, max_cells: int = 2 ** 23):
        self.by_dimension = corpus.T.tocsr()  # built once: a transpose per search would cost as much
        self.docs = corpus.shape[0]
        self.max_cells = max_cells  # a block's dense score matrix (plus argpartition's indices) stays under this

    @property
    def nbytes(self) -> int:
        matrix = self.by_dimension
        return matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes

    def search(self, queries, depth: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(document rows, scores) of each query's `depth` best, best first, in query order."""
        depth = min(depth, self.docs)
        block = max(1, self.max_cells // self.docs)
        for start in range(0, queries.shape[0], block):
            scores = (queries[start:start + block] @ self.by_dimension).toarray()
            best = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            best_scores = np.take_along_axis(scores, best, axis=1)
            order = np.argsort(-best_scores, axis=1, kind="stable")
            yield from zip(np.take_along_axis(best, order, axis=1), np.take_along_axis(best_scores, order, axis=1))


class SeismicIndex:
    """Seismic over the corpus rows; components are dimension ids, documents their row numbers."""

    kind = "seismic"

    def __init__(self, corpus, query_cut: int = 20, heap_factor: float = 0.8, search_threads: int = 0):
        try:
            from seismic import SeismicDataset, SeismicIndex as Index
        except ImportError:
            raise StageError("evaluate.index seismic needs pyseismic-lsr: pip install -e '.[scale]' "
                             "(or set evaluate.index: exact)") from None
        corpus = corpus.tocsr(copy=True)
        corpus.sort_indices()  # seismic wants increasing components within a row
        dataset = SeismicDataset(dim=corpus.shape[1])
        dataset.add_documents_by_id([str(row) for row in range(corpus.shape[0])], corpus.indices.astype(np.int64),
                                    corpus.data.astype(np.float32), corpus.indptr.astype(np.int64))
        self.index = Index.build_from_dataset(dataset)  # on every core
        self.query_cut, self.heap_factor, self.search_threads = query_cut, heap_factor, search_threads

    def search(self, queries, depth: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from seismic import get_seismic_string

        text = get_seismic_string()
        spans = [slice(queries.indptr[q], queries.indptr[q + 1]) for q in range(queries.shape[0])]
        results = self.index.batch_search(
            np.array([str(q) for q in range(queries.shape[0])], dtype=text),
            [queries.indices[s].astype(str).astype(text) for s in spans],
            [queries.data[s].astype(np.float32) for s in spans],
            k=depth, query_cut=self.query_cut, heap_factor=self.heap_factor, num_threads=self.search_threads)
        by_query = {hits[0][0]: hits for hits in results if hits}  # results come in no set query order
        for q in range(queries.shape[0]):
            hits = sorted(by_query.get(str(q), []), key=lambda hit: -hit[1])
            yield (np.array([int(doc) for _, _, doc in hits], dtype=np.int64),
                   np.array([score for _, score, _ in hits], dtype=np.float32))


def index_kind(cfg: IndexConfig, docs: int) -> str:
    """exact or seismic; auto: exact up to cfg.exact_max_docs documents."""
    if cfg.kind != "auto":
        return cfg.kind
    return "exact" if docs <= cfg.exact_max_docs else "seismic"


def build_index(corpus, cfg: IndexConfig) -> ExactIndex | SeismicIndex:
    if index_kind(cfg, corpus.shape[0]) == "exact":
        return ExactIndex(corpus)
    return SeismicIndex(corpus, cfg.query_cut, cfg.heap_factor)
