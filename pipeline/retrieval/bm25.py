"""BM25 as sparse vectors, a shard of documents at a time, so that the lexical baseline runs on MS
MARCO's 8.8M passages in bounded memory: bm25s' own tokenizer (English stop words) and its scoring
at its defaults (Lucene's idf and term weight, k1 1.5, b 0.75), the weights bm25s.BM25 computes, but
written to disk as CorpusShards and searched by pipeline.retrieval.search instead of bm25s holding
every document's token list (some 3 GB of Python lists at 8.8M) and its whole matrix.
Memory: the vocabulary, each document's length, and one shard of tokens; the texts are read a shard
at a time (`texts(start, stop)`) in two passes (document frequencies and lengths, then weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix

from pipeline.retrieval.search import CorpusShards
from pipeline.runtime import import_bm25s

STOPWORDS = "en"


def tokens(texts: list[str]) -> list[list[str]]:
    """Each text's tokens as bm25s tokenizes them (lower case, words of two or more characters, no stop words)."""
    return import_bm25s().tokenize(texts, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def token_ids(texts: list[str], vocabulary: dict[str, int], grow: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, lengths): the texts' token ids, concatenated, and each text's number of tokens; with
    `grow`, unseen tokens join the vocabulary, otherwise they are dropped."""
    ids, lengths = [], []
    for document in tokens(texts):
        known = [vocabulary.setdefault(t, len(vocabulary)) for t in document] if grow else \
            [vocabulary[t] for t in document if t in vocabulary]
        ids += known
        lengths.append(len(known))
    return np.array(ids, dtype=np.int64), np.array(lengths, dtype=np.int64)


def term_counts(ids: np.ndarray, lengths: np.ndarray, width: int) -> csr_matrix:
    """One row per text: how often each token id occurs in it."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    counts = csr_matrix((np.ones(len(ids), np.float32), (rows, ids)), shape=(len(lengths), width))
    counts.sum_duplicates()
    return counts


def bm25_shards(texts: Callable[[int, int], list[str]], docs: int, folder: Path, shard_docs: int,
                key: dict) -> tuple[CorpusShards, dict[str, int]]:
    """The documents' BM25 weights, in shards of `shard_docs` under `folder` (named by `key`, which
    says which documents), and the vocabulary that numbers their dimensions."""
    bm25s = import_bm25s()
    defaults = bm25s.BM25()  # bm25s' defaults, so that its numbers and these stay the same
    tfc = bm25s.scoring._select_tfc_scorer(defaults.method)
    idf_of = bm25s.scoring._select_idf_scorer(defaults.idf_method)
    vocabulary: dict[str, int] = {}
    lengths = np.zeros(docs, np.int64)
    frequencies = np.zeros(0, np.int64)
    starts = range(0, docs, shard_docs)
    for start in starts:  # pass 1: the vocabulary, each token's document frequency, each document's length
        ids, shard_lengths = token_ids(texts(start, min(docs, start + shard_docs)), vocabulary, grow=True)
        lengths[start:start + len(shard_lengths)] = shard_lengths
        present = term_counts(ids, shard_lengths, len(vocabulary))
        frequencies = np.concatenate([frequencies, np.zeros(len(vocabulary) - len(frequencies), np.int64)])
        frequencies += np.bincount(present.indices, minlength=len(vocabulary))
    # as bm25s computes them: idf in float32 from Python floats, the mean length in float64
    idf = np.array([idf_of(int(df), N=docs) if df else 0.0 for df in frequencies], dtype=np.float32)
    average = lengths.mean() if docs else math.nan
    shards = CorpusShards(folder, {**key, "bm25": [defaults.method, defaults.k1, defaults.b]}, docs,
                          len(vocabulary), shard_docs)
    for index, start in enumerate(starts):  # pass 2: each shard's weights
        ids, shard_lengths = token_ids(texts(start, min(docs, start + shard_docs)), vocabulary, grow=False)
        counts = term_counts(ids, shard_lengths, len(vocabulary))
        document_length = np.repeat(lengths[start:start + len(shard_lengths)], np.diff(counts.indptr))
        weights = idf[counts.indices] * tfc(tf_array=counts.data, l_d=document_length, l_avg=average,
                                             k1=defaults.k1, b=defaults.b, delta=defaults.delta)
        shards.write(index, csr_matrix((weights.astype(np.float32), counts.indices, counts.indptr),
                                       shape=counts.shape))
    return shards, vocabulary


def query_vectors(texts: list[str], vocabulary: dict[str, int]) -> csr_matrix:
    """Each query's token counts over the corpus's vocabulary (bm25s sums a repeated token's weight
    once per occurrence; tokens the corpus lacks are dropped)."""
    ids, lengths = token_ids(texts, vocabulary, grow=False)
    return term_counts(ids, lengths, len(vocabulary))
