"""An approximate top-k index over sparse vectors that builds shard by shard in bounded memory:
block-max pruning (BMP; Mallia, Suel, Tonellotto, SIGIR 2024).

Build, one corpus shard at a time:
- reorder the shard's documents by recursive graph bisection (Dhulipala et al., KDD 2016), so that
  documents sharing terms sit side by side;
- cut them into blocks of `block_size`; keep each document's postings (a forward index: uint16 term
  ids where the vocabulary allows, weights quantized to uint16), and for each term the blocks that hold
  it with the term's largest weight there (uint8, rounded up: an upper bound).
Memory: about 4 B per posting plus 5 B per (block, term) pair, and one shard while it is read.

Search, a query at a time: each block's upper bound is summed from its largest weights over the
query's `query_cut` largest terms (uint16 sums, rounded up); blocks are visited from the highest bound
down, their documents scored against the whole query (the query's terms looked up through a table of
the vocabulary's size, one byte per term where the query has under 256 terms: it stays in L1), and
the walk stops at the first block whose bound times `heap_factor` cannot beat the k-th best score
found (1: stops last; with every query term it is exact, up to the weights' rounding).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

BAND = 0.8  # the search takes blocks in bands of bounds within this factor of each other


@njit(cache=True, nogil=True)
def _bisection_order(indptr, indices, dims, leaf, iterations):
    """Rows in an order where each run of `leaf` rows (and each run of their halving sizes) shares
    many terms: recursive graph bisection, each half's rows swapped while it lowers the log-gap cost."""
    n = len(indptr) - 1
    order = np.arange(n)
    log2 = np.zeros(n + 3)
    for i in range(1, n + 3):
        log2[i] = math.log2(i)
    left_degree = np.zeros(dims, np.int32)
    right_degree = np.zeros(dims, np.int32)
    stack = [(0, n)]
    while len(stack) > 0:
        start, end = stack.pop()
        size = end - start
        if size <= leaf:
            continue
        blocks = (size + leaf - 1) // leaf
        middle = start + (blocks // 2) * leaf
        n_left, n_right = middle - start, end - middle
        for i in range(start, end):
            row = order[i]
            for p in range(indptr[row], indptr[row + 1]):
                if i < middle:
                    left_degree[indices[p]] += 1
                else:
                    right_degree[indices[p]] += 1
        left_gain = np.empty(n_left)
        right_gain = np.empty(n_right)
        for _ in range(iterations):
            for i in range(start, end):
                row = order[i]
                gain = 0.0
                for p in range(indptr[row], indptr[row + 1]):
                    a = left_degree[indices[p]]
                    b = right_degree[indices[p]]
                    before = a * (log2[n_left] - log2[a + 1]) + b * (log2[n_right] - log2[b + 1])
                    if i < middle:  # moving it right
                        after = (a - 1) * (log2[n_left] - log2[a]) + (b + 1) * (log2[n_right] - log2[b + 2])
                    else:
                        after = (a + 1) * (log2[n_left] - log2[a + 2]) + (b - 1) * (log2[n_right] - log2[b])
                    gain += before - after
                if i < middle:
                    left_gain[i - start] = gain
                else:
                    right_gain[i - middle] = gain
            left_rank = np.argsort(-left_gain)
            right_rank = np.argsort(-right_gain)
            swapped = 0
            for j in range(min(n_left, n_right)):
                if left_gain[left_rank[j]] + right_gain[right_rank[j]] <= 0:
                    break
                i_left, i_right = start + left_rank[j], middle + right_rank[j]
                for p in range(indptr[order[i_left]], indptr[order[i_left] + 1]):
                    left_degree[indices[p]] -= 1
                    right_degree[indices[p]] += 1
                for p in range(indptr[order[i_right]], indptr[order[i_right] + 1]):
                    right_degree[indices[p]] -= 1
                    left_degree[indices[p]] += 1
                order[i_left], order[i_right] = order[i_right], order[i_left]
                swapped += 1
            if swapped == 0:
                break
        for i in range(start, end):
            for p in range(indptr[order[i]], indptr[order[i] + 1]):
                left_degree[indices[p]] = 0
                right_degree[indices[p]] = 0
        stack.append((start, middle))
        stack.append((middle, end))
    return order


@njit(cache=True, nogil=True)
def _block_maxima(indptr, indices, weights, block_size, dims, first_row, largest):
    """(term, block, largest weight as uint8 of `largest`, rounded up) for every term of every block
    of the rows, numbered from row `first_row` of the corpus, in block order. A block cut by a shard's
    end gets entries from both shards: its bound is summed twice, still an upper bound."""
    n = len(indptr) - 1
    terms = np.empty(len(indices), np.int32)
    blocks = np.empty(len(indices), np.int32)
    maxima = np.empty(len(indices), np.float32)
    seen_in = np.full(dims, -1, np.int64)
    slot = np.zeros(dims, np.int64)
    count = 0
    for row in range(n):
        block = (first_row + row) // block_size
        for p in range(indptr[row], indptr[row + 1]):
            term = indices[p]
            if seen_in[term] != block:
                seen_in[term] = block
                slot[term] = count
                terms[count], blocks[count], maxima[count] = term, block, weights[p]
                count += 1
            elif weights[p] > maxima[slot[term]]:
                maxima[slot[term]] = weights[p]
    quantized = np.empty(count, np.uint8)
    for i in range(count):
        quantized[i] = min(255, max(0, math.ceil(maxima[i] / largest * 255)))
    return terms[:count].copy(), blocks[:count].copy(), quantized


@njit(cache=True, nogil=True)
def _push(heap_scores, heap_rows, size, score, row):
    """Into a min-heap of the best len(heap_scores) (score, row) found so far; returns its new size."""
    k = len(heap_scores)
    if size < k:  # sift up
        c = size
        while c > 0 and heap_scores[(c - 1) // 2] > score:
            heap_scores[c], heap_rows[c] = heap_scores[(c - 1) // 2], heap_rows[(c - 1) // 2]
            c = (c - 1) // 2
        heap_scores[c], heap_rows[c] = score, row
        return size + 1
    if score > heap_scores[0]:  # replace the smallest, sift down
        c = 0
        while True:
            child = 2 * c + 1
            if child >= k:
                break
            if child + 1 < k and heap_scores[child + 1] < heap_scores[child]:
                child += 1
            if heap_scores[child] >= score:
                break
            heap_scores[c], heap_rows[c] = heap_scores[child], heap_rows[child]
            c = child
        heap_scores[c], heap_rows[c] = score, row
    return size


@njit(cache=True, nogil=True)
def _walk(bound, offset, unit, heap_factor, block_size, n_docs, doc_ptr, doc_terms, doc_weights, slot, slot_weight,
          band, heap_scores, heap_rows):
    """Scores the blocks from the highest bound down until a bound (plus `offset`, in `unit`s of score) times
    heap_factor cannot beat the k-th best found; returns (heap size, blocks scored). The blocks are
    taken in bands (bounds within a factor BAND of each other, each band sorted), each band found by a
    pass over the bounds: no full sort."""
    k = len(heap_scores)
    n_blocks = len(bound)
    top = 0
    for b in range(n_blocks):
        top = max(top, bound[b])
    size, scored = 0, 0
    upper = top + 1
    lower = int(top * BAND)
    while True:
        n = 0
        for b in range(n_blocks):
            v = bound[b]
            if v >= lower and v < upper:
                band[n] = b
                n += 1
        in_band = band[:n]
        order = np.argsort(-bound[in_band].astype(np.int32))
        for i in order:
            block = in_band[i]
            if size == k and (bound[block] + offset) * unit * heap_factor <= heap_scores[0]:
                break
            scored += 1
            for doc in range(block * block_size, min(n_docs, (block + 1) * block_size)):
                score = np.float32(0.0)
                for p in range(doc_ptr[doc], doc_ptr[doc + 1]):
                    score += slot_weight[slot[doc_terms[p]]] * doc_weights[p]
                size = _push(heap_scores, heap_rows, size, score, doc)
        if lower == 0 or (size == k and (lower + offset) * unit * heap_factor <= heap_scores[0]):
            return size, scored
        upper = lower
        lower = int(lower * BAND)


@njit(cache=True, nogil=True)
def _search(q_indptr, q_indices, q_weights, query_cut, heap_factor, k, term_ptr, term_blocks, term_maxima,
            max_scale, block_size, doc_ptr, doc_terms, doc_weights, dims, out_rows, out_scores, out_scored):
    n_docs = len(doc_ptr) - 1
    n_blocks = (n_docs + block_size - 1) // block_size
    slot8 = np.zeros(dims, np.uint8)
    slot16 = np.zeros(dims, np.uint16)
    slot_weight = np.zeros(2 ** 16, np.float32)
    bound = np.zeros(n_blocks, np.uint16)
    band = np.empty(n_blocks, np.int32)
    heap_scores = np.empty(k, np.float32)
    heap_rows = np.empty(k, np.int64)
    for q in range(len(q_indptr) - 1):
        lo, hi = q_indptr[q], q_indptr[q + 1]
        by_weight = np.argsort(-q_weights[lo:hi])
        for i in range(hi - lo):
            slot_weight[i + 1] = q_weights[lo + by_weight[i]]
            if hi - lo < 256:
                slot8[q_indices[lo + by_weight[i]]] = i + 1
            else:
                slot16[q_indices[lo + by_weight[i]]] = i + 1
        bound[:] = 0
        largest = max(q_weights[lo + by_weight[0]], np.float32(1e-30)) if hi > lo else np.float32(1.0)
        for i in range(min(query_cut, hi - lo, 256)):  # uint16 bounds hold 256 terms' parts
            # a term's part of a block's bound, (query weight x block max) on a 0-254 scale, rounded up
            weight8 = min(255, max(0, math.ceil(q_weights[lo + by_weight[i]] / largest * 255)))
            term = q_indices[lo + by_weight[i]]
            for e in range(term_ptr[term], term_ptr[term + 1]):
                bound[term_blocks[e]] += (weight8 * term_maxima[e] + 255) >> 8
        unit = np.float32(largest * max_scale * 256 / 255)  # a bound's unit, in score units
        # terms past the 256th within query_cut: each adds at most its weight x the largest block max
        rest = 0.0
        for i in range(256, min(query_cut, hi - lo)):
            rest += q_weights[lo + by_weight[i]]
        offset = math.ceil(rest * 255 * max_scale / unit)
        if hi - lo < 256:
            size, scored = _walk(bound, offset, unit, heap_factor, block_size, n_docs, doc_ptr, doc_terms, doc_weights,
                                 slot8, slot_weight, band, heap_scores, heap_rows)
        else:
            size, scored = _walk(bound, offset, unit, heap_factor, block_size, n_docs, doc_ptr, doc_terms,
                                 doc_weights, slot16, slot_weight, band, heap_scores, heap_rows)
        for p in range(lo, hi):
            slot8[q_indices[p]] = 0
            slot16[q_indices[p]] = 0
        out_scored[q] = scored
        out_rows[q, :] = -1
        out_scores[q, :] = -np.inf
        out_rows[q, :size] = heap_rows[:size]
        out_scores[q, :size] = heap_scores[:size]


class BlockMaxIndex:
    """The corpus rows in block-max pruned blocks; search returns (corpus rows, scores) best first."""

    def __init__(self, corpus, block_size: int = 8, query_cut: int = 12, heap_factor: float = 1.0,
                 search_threads: int = 0, bisection_iterations: int = 5, threads: int = 0, progress: bool = True):
        """Built from the corpus's shards, `threads` at a time (0: every core); each adds a shard in memory."""
        from tqdm.auto import tqdm

        self.block_size, self.query_cut, self.heap_factor = block_size, query_cut, heap_factor
        self.search_threads, self.dims = search_threads, corpus.dims
        postings = corpus.nnz
        self.doc_ptr = np.zeros(corpus.docs + 1, np.int64)
        self.doc_terms = np.empty(postings, np.uint16 if corpus.dims <= 2 ** 16 else np.uint32)
        self.doc_weights = np.empty(postings, np.uint16)
        self.rows = np.empty(corpus.docs, np.int64)  # index position -> corpus row
        largest = max(float(np.load(corpus.path(i))["data"].max(initial=0.0)) for i in range(corpus.count)) or 1.0
        self.weight_scale = largest / 65535  # weights as uint16, linear against the largest
        self.max_scale = largest / 255  # block maxima as uint8, rounded up

        def reordered(index: int):
            shard = corpus.load(index)
            order = _bisection_order(shard.indptr, shard.indices, corpus.dims, block_size, bisection_iterations)
            shard = shard[order]
            terms, blocks, maxima = _block_maxima(shard.indptr, shard.indices, shard.data, block_size, corpus.dims,
                                                  corpus.rows(index).start, largest)
            return order, shard, (terms.astype(self.doc_terms.dtype), blocks, maxima)

        pieces, done, threads = [], 0, threads or os.cpu_count() or 1
        with ThreadPoolExecutor(threads) as pool, tqdm(total=corpus.count, desc="block-max index", unit="shard",
                                                        disable=not progress) as bar:
            pending = deque()
            for index in range(corpus.count):
                pending.append((index, pool.submit(reordered, index)))
                while len(pending) > threads or (pending and index + 1 == corpus.count):
                    at, found = pending.popleft()
                    order, shard, piece = found.result()
                    first, n, nnz = corpus.rows(at).start, shard.shape[0], shard.nnz
                    self.rows[first:first + n] = first + order
                    self.doc_ptr[first + 1:first + n + 1] = done + shard.indptr[1:]
                    self.doc_terms[done:done + nnz] = shard.indices
                    self.doc_weights[done:done + nnz] = np.rint(np.clip(shard.data, 0, largest) / self.weight_scale)
                    pieces.append(piece)
                    done += nnz
                    bar.update()
        self._invert(pieces)

    def _invert(self, pieces) -> None:
        """Each term's (block, largest weight) entries, term-major, blocks ascending."""
        counts = np.zeros(self.dims + 1, np.int64)
        for terms, _, _ in pieces:
            counts[1:] += np.bincount(terms, minlength=self.dims)
        self.term_ptr = np.cumsum(counts)
        self.term_blocks = np.empty(self.term_ptr[-1], np.int32)
        self.term_maxima = np.empty(self.term_ptr[-1], np.uint8)
        cursor = self.term_ptr[:-1].copy()
        while pieces:  # freed one by one as they are copied in
            terms, blocks, maxima = pieces.pop(0)
            order = np.argsort(terms, kind="stable")
            terms, per_term = terms[order], np.bincount(terms, minlength=self.dims)
            at = cursor[terms] + np.arange(len(terms)) - np.repeat(np.cumsum(per_term) - per_term, per_term)
            self.term_blocks[at], self.term_maxima[at] = blocks[order], maxima[order]
            cursor += per_term

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.doc_ptr, self.doc_terms, self.doc_weights, self.rows,
                                      self.term_ptr, self.term_blocks, self.term_maxima))

    def _search_part(self, queries, depth, rows, scores, scored):
        _search(queries.indptr, queries.indices, queries.data.astype(np.float32), self.query_cut,
                np.float32(self.heap_factor), depth, self.term_ptr, self.term_blocks, self.term_maxima,
                np.float32(self.max_scale / self.weight_scale), self.block_size, self.doc_ptr, self.doc_terms,
                self.doc_weights, self.dims, rows, scores, scored)

    def search(self, queries, depth: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each query's `depth` best (corpus rows, scores), best first; queries split over search_threads
        (0: every core; numba releases the GIL)."""
        queries = queries.tocsr()
        rows = np.empty((queries.shape[0], depth), np.int64)
        scores = np.empty((queries.shape[0], depth), np.float32)
        self.blocks_scored = np.empty(queries.shape[0], np.int64)  # per query: how hard it was
        threads = self.search_threads or os.cpu_count() or 1
        cuts = np.linspace(0, queries.shape[0], threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda part: self._search_part(queries[part], depth, rows[part], scores[part],
                                                         self.blocks_scored[part]),
                          [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]))
        found = []
        for q in range(queries.shape[0]):
            kept = rows[q] >= 0
            corpus_rows, best = self.rows[rows[q][kept]], scores[q][kept] * np.float32(self.weight_scale)
            order = np.lexsort((corpus_rows, -best))
            found.append((corpus_rows[order], best[order]))
        return found
