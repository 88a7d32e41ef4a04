"""An approximate top-k index over sparse vectors that builds shard by shard in bounded memory:
block-max pruning (BMP; Mallia, Suel, Tonellotto, SIGIR 2024).

Build, one corpus shard at a time:
- reorder the shard's documents by recursive graph bisection (Dhulipala et al., KDD 2016), so that
  documents sharing terms sit side by side;
- cut them into blocks of `block_size` (4) and lay each block out block-inverted: its terms (entries:
  uint16 term ids where the vocabulary allows, and how many of its documents hold each), and each
  entry's postings (the document's place in the block, its weight quantized to uint16);
- for each term, its largest weight in each block that holds it (uint8, rounded up: an upper
  bound): a list of (block, weight) for a term in under a tenth of the blocks, a byte per block for
  the others (at most twice its list, and summed in one sequential pass).
Memory: 3 B per posting plus 3 B per (block, term) entry and its block maximum (5 B in a list, or a
byte per block); about 10 B per posting in blocks of 4 on MS MARCO-shaped vectors without
near-duplicates (0.86 entries per posting), and a shard per build thread while it is laid out.

Search, a query at a time: each block's upper bound is summed from its largest weights over the
query's `query_cut` largest terms (uint16 sums of each term's (query weight x block max) on 0-255
scales, shifted right by as few bits as let the query's terms sum in 16 bits and rounded up);
blocks are visited from the highest bound down, in tiers (the chunks of CHUNK blocks sorted by their
largest bound: the first tier the blocks of the FIRST_CHUNKS highest chunks down to the lowest of
those chunks' largest bounds, each next tier twice the chunks; each ordered by a counting sort),
their documents scored against the whole query from the block's entries of the query's terms (found
through a table of the vocabulary's size, one byte per term where the query has under 256 terms),
and the walk stops at the first block whose bound times `heap_factor` cannot beat the k-th best
score found (1: stops last; with every query term it is exact, up to the weights' rounding).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

AHEAD = 8  # blocks: the walk matches a block's entries this many blocks before it scores it (see _walk)
RING = 16  # blocks whose matched entries are held: a power of two over AHEAD
DENSE_SHARE = 10  # a term in at least 1/DENSE_SHARE of the blocks keeps a byte per block, not a list
CHUNK = 64  # blocks per largest bound kept, so that a tier's pass skips the chunks below it
FIRST_CHUNKS = 256  # the first tier's chunks (the highest); each tier after takes twice the chunks before it


@intrinsic
def _prefetch(typingctx, array, index):
    """Asks the CPU for array[index]'s cache line without waiting for it (llvm.prefetch): the blocks'
    memory is read in a known order, each block a few scattered cache misses."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        pointer = cgutils.get_item_pointer(context, builder, array_type,
                                           context.make_array(array_type)(context, builder, args[0]), [args[1]])
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])  # read, keep, data
        return context.get_dummy_value()
    return types.void(array, index), codegen



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
def _block_layout(indptr, indices, weights, block_size, dims, largest):
    """One shard's rows (in their block order) cut into blocks of `block_size` rows, block-inverted:
    - entries: each block's terms in first-seen order, with how many of its rows hold each and the
      largest weight there (uint8 of `largest`, rounded up: an upper bound); `block_entries` where each
      block's entries end;
    - postings, entry by entry, at the block's own positions of the rows' postings: the row's place in
      the block and its weight (uint16 of `largest`, rounded to nearest)."""
    n = len(indptr) - 1
    n_blocks = (n + block_size - 1) // block_size
    entry_terms = np.empty(len(indices), np.int32)
    entry_counts = np.zeros(len(indices), np.uint8)
    entry_largest = np.zeros(len(indices), np.float32)
    block_entries = np.zeros(n_blocks + 1, np.int64)
    post_docs = np.empty(len(indices), np.uint8)
    post_weights = np.empty(len(indices), np.uint16)
    seen_in = np.full(dims, -1, np.int64)
    entry_of = np.empty(dims, np.int64)
    widest = 0  # the most postings a block has: at most that many entries
    for block in range(n_blocks):
        widest = max(widest, indptr[min(n, (block + 1) * block_size)] - indptr[block * block_size])
    cursor = np.empty(widest, np.int64)  # where each of a block's entries' next posting goes
    count = 0
    for block in range(n_blocks):
        first_row, end_row = block * block_size, min(n, (block + 1) * block_size)
        first_entry = count
        for row in range(first_row, end_row):
            for p in range(indptr[row], indptr[row + 1]):
                term = indices[p]
                if seen_in[term] != block:
                    seen_in[term], entry_of[term], entry_terms[count] = block, count, term
                    count += 1
                e = entry_of[term]
                entry_counts[e] += 1
                entry_largest[e] = max(entry_largest[e], weights[p])
        block_entries[block + 1] = count
        at = indptr[first_row]
        for e in range(first_entry, count):
            cursor[e - first_entry] = at
            at += entry_counts[e]
        for row in range(first_row, end_row):
            for p in range(indptr[row], indptr[row + 1]):
                c = entry_of[indices[p]] - first_entry
                post_docs[cursor[c]] = row - first_row
                post_weights[cursor[c]] = round(min(max(weights[p], 0.0), largest) / largest * 65535)
                cursor[c] += 1
    maxima = np.empty(count, np.uint8)
    for e in range(count):
        maxima[e] = min(255, max(0, math.ceil(entry_largest[e] / largest * 255)))
    return (entry_terms[:count].copy(), entry_counts[:count].copy(), maxima, block_entries, post_docs,
            post_weights)


@njit(cache=True, nogil=True)
def _invert(entry_terms, entry_maxima, block_entries, dims):
    """Term-major, each term's largest weight in each block that holds it: for a term in under
    1/DENSE_SHARE of the blocks, a list of (block, largest weight), blocks ascending, from
    term_ptr[term]; for the others, a row of `dense` (row dense_row[term]) with a byte per block (0: not
    there), at most twice the memory of its list, summed in one vectorized pass instead of a scatter."""
    n_blocks = len(block_entries) - 1
    per_term = np.zeros(dims, np.int64)
    for e in range(len(entry_terms)):
        per_term[entry_terms[e]] += 1
    dense_row = np.full(dims, -1, np.int64)
    n_dense = 0
    for term in range(dims):
        if per_term[term] * DENSE_SHARE >= n_blocks and per_term[term] > 0:
            dense_row[term] = n_dense
            n_dense += 1
            per_term[term] = 0
    term_ptr = np.zeros(dims + 1, np.int64)
    term_ptr[1:] = np.cumsum(per_term)
    term_blocks = np.empty(term_ptr[-1], np.int32)
    term_maxima = np.empty(term_ptr[-1], np.uint8)
    dense = np.zeros((n_dense, n_blocks), np.uint8)
    at = term_ptr[:-1].copy()
    for block in range(n_blocks):
        for e in range(block_entries[block], block_entries[block + 1]):
            term = entry_terms[e]
            if dense_row[term] >= 0:
                dense[dense_row[term], block] = entry_maxima[e]
            else:
                term_blocks[at[term]], term_maxima[at[term]] = block, entry_maxima[e]
                at[term] += 1
    return term_ptr, term_blocks, term_maxima, dense_row, dense


@njit(cache=True, nogil=True, inline="always")  # inlined: a call would count references on each array
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


@njit(cache=True, nogil=True, inline="always")
def _prefetch_range(array, lo, hi):
    """Asks for array[lo:hi], a cache line (64 bytes) at a time."""
    for i in range(lo, hi, max(1, 64 // array.itemsize)):
        _prefetch(array, i)
    if hi > lo:
        _prefetch(array, hi - 1)


@njit(cache=True, nogil=True, inline="always")
def _match(block, block_entries, block_posts, entry_terms, entry_counts, post_docs, post_weights, slot, matched, r):
    """A block's entries of the query's terms (found through `slot`: 0 for the others) into matched[r]:
    (slot, first posting, end), each one's postings asked for; returns how many."""
    n, p = 0, block_posts[block]
    for e in range(np.uint64(block_entries[block]), np.uint64(block_entries[block + 1])):  # unsigned: no wraparound
        s = slot[entry_terms[e]]
        if s != 0:
            matched[r, n, 0], matched[r, n, 1], matched[r, n, 2] = s, p, p + entry_counts[e]
            _prefetch(post_docs, p)
            _prefetch(post_weights, p)
            n += 1
        p += entry_counts[e]
    return n


@njit(cache=True, nogil=True, inline="always")
def _score(block, n, matched, r, block_docs, post_docs, post_weights, slot_weight, scores, heap_scores, heap_rows,
           size):
    """Scores a block's rows from its n entries in matched[r] into the heap; returns the heap's size."""
    rows = block_docs[block + 1] - block_docs[block]
    scores[:rows] = 0
    for i in range(n):
        weight = slot_weight[matched[r, i, 0]]
        for q in range(matched[r, i, 1], matched[r, i, 2]):
            scores[post_docs[q]] += weight * post_weights[q]
    for d in range(rows):
        size = _push(heap_scores, heap_rows, size, scores[d], block_docs[block] + d)
    return size


@njit(cache=True, nogil=True, inline="always")
def _part(weight16, maximum, round16, shift16):
    """A term's part of a block's bound, (query weight x block max + round) >> shift, in 16 bits
    (255 x 255 + 255 fits) so that it vectorizes widest."""
    return np.uint16(np.uint16(weight16 * np.uint16(maximum)) + round16) >> shift16


@njit(cache=True, nogil=True, inline="always")
def _add_rows(dense, rows, weights, bound, round16, shift16):
    """bound += each dense row's part, four rows in one pass where it can (the bounds, larger than the
    cache past a few million documents, read and written once per four terms: 1.5 times faster). The
    shift is a constant where this is inlined: a variable one does not vectorize."""
    i = 0
    while i + 4 <= len(rows):
        row1, row2, row3, row4 = dense[rows[i]], dense[rows[i + 1]], dense[rows[i + 2]], dense[rows[i + 3]]
        weight1, weight2, weight3, weight4 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
        for b in range(len(bound)):
            bound[b] += (_part(weight1, row1[b], round16, shift16) + _part(weight2, row2[b], round16, shift16)
                         + _part(weight3, row3[b], round16, shift16) + _part(weight4, row4[b], round16, shift16))
        i += 4
    for j in range(i, len(rows)):
        row, weight = dense[rows[j]], weights[j]
        for b in range(len(bound)):
            bound[b] += _part(weight, row[b], round16, shift16)


@njit(cache=True, nogil=True)
def _bounds(dense, dense_rows, dense_weights, term_blocks, term_maxima, sparse_at, sparse_end, sparse_weights, shift,
            bound, chunk_max):
    """Every block's bound over the query's terms (dense rows and sparse lists, each part
    (weight x block max + 2^shift - 1) >> shift, shift 4-8), and each CHUNK's largest."""
    bound[:] = 0
    if shift == 4:
        _add_rows(dense, dense_rows, dense_weights, bound, np.uint16(15), np.uint16(4))
    elif shift == 5:
        _add_rows(dense, dense_rows, dense_weights, bound, np.uint16(31), np.uint16(5))
    elif shift == 6:
        _add_rows(dense, dense_rows, dense_weights, bound, np.uint16(63), np.uint16(6))
    elif shift == 7:
        _add_rows(dense, dense_rows, dense_weights, bound, np.uint16(127), np.uint16(7))
    else:
        _add_rows(dense, dense_rows, dense_weights, bound, np.uint16(255), np.uint16(8))
    for i in range(len(sparse_at)):
        weight = sparse_weights[i]
        for e in range(sparse_at[i], sparse_end[i]):
            bound[term_blocks[e]] += (weight * term_maxima[e] + (1 << shift) - 1) >> shift
    for c in range(len(chunk_max)):
        largest = np.uint16(0)
        for b in range(c * CHUNK, min(len(bound), (c + 1) * CHUNK)):
            largest = max(largest, bound[b])
        chunk_max[c] = largest


@njit(cache=True, nogil=True)
def _walk(bound, chunk_max, chunk_order, offset, threshold, block_docs, block_entries, block_posts, entry_terms, entry_counts, post_docs,
          post_weights, slot, slot_weight, counts, tier, order, matched, n_matched, scores, heap_scores, heap_rows):
    """Scores the blocks from the highest bound down until a bound (plus `offset`; x threshold: its unit
    in score units x heap_factor) cannot beat the k-th best found; returns (heap size, blocks scored).
    The blocks are taken in tiers: the chunks of CHUNK bounds ordered by their largest (a counting
    sort), a tier is the blocks in the first FIRST_CHUNKS chunks (then twice as many as the tier
    before) down to the lowest of those chunks' largest bounds, found by a pass over those chunks and
    ordered by a counting sort (a count per bound value); so the first tiers pass over a few chunks,
    not every chunk that reaches half the highest bound. A pipeline, so that each block's cache misses overlap the
    work on the blocks before it: its offsets are asked for 3 x AHEAD blocks before it is scored, its
    entries 2 x AHEAD before, and AHEAD before, its entries of the query's terms are matched (held in
    a ring of RING blocks) and their postings asked for."""
    k = len(heap_scores)
    size, scored = 0, 0
    n_chunks = len(chunk_max)
    if n_chunks == 0:
        return size, scored
    top = np.int64(chunk_max.max())
    counts[:top + 2] = 0  # the chunks by their largest bound, highest first (a counting sort)
    for c in range(n_chunks):
        counts[top - chunk_max[c] + 1] += 1
    for v in range(1, top + 2):
        counts[v] += counts[v - 1]
    for c in range(n_chunks):
        v = top - chunk_max[c]
        chunk_order[counts[v]] = c
        counts[v] += 1
    upper, reach = top, 0  # the tier: bounds in [floor, upper], in the first `reach` chunks of chunk_order
    while upper >= 0:
        reach = min(n_chunks, max(FIRST_CHUNKS, 2 * reach))
        floor = min(np.int64(chunk_max[chunk_order[reach - 1]]), upper) if reach < n_chunks else 0
        while reach < n_chunks and chunk_max[chunk_order[reach]] >= floor:
            reach += 1
        n = 0
        for i in range(reach):
            c = chunk_order[i]
            for b in range(c * CHUNK, min(len(bound), (c + 1) * CHUNK)):  # no branch: kept or overwritten
                tier[n] = b
                n += np.int64(floor <= bound[b]) & np.int64(bound[b] <= upper)
        counts[:upper - floor + 2] = 0
        for i in range(n):
            counts[upper - bound[tier[i]] + 1] += 1  # the highest bounds first
        for v in range(1, upper - floor + 2):  # counts[v]: where bound upper - v starts in `order`
            counts[v] += counts[v - 1]
        for i in range(n):
            v = upper - bound[tier[i]]
            order[counts[v]] = tier[i]
            counts[v] += 1
        for j in range(-2 * AHEAD, n):  # j < 0: the pipeline filling
            if j + 3 * AHEAD < n:
                ahead = order[j + 3 * AHEAD]
                _prefetch(block_entries, ahead)
                _prefetch(block_entries, ahead + 1)
                _prefetch(block_posts, ahead)
                _prefetch(block_docs, ahead)
                _prefetch(block_docs, ahead + 1)
            if j + 2 * AHEAD < n:
                ahead = order[j + 2 * AHEAD]
                _prefetch_range(entry_terms, block_entries[ahead], block_entries[ahead + 1])
                _prefetch_range(entry_counts, block_entries[ahead], block_entries[ahead + 1])
            if 0 <= j + AHEAD < n:
                r = (j + AHEAD) % RING
                n_matched[r] = _match(order[j + AHEAD], block_entries, block_posts, entry_terms, entry_counts,
                                      post_docs, post_weights, slot, matched, r)
            if j < 0:
                continue
            block = order[j]
            if size == k and (bound[block] + offset) * threshold <= heap_scores[0]:
                return size, scored
            scored += 1
            size = _score(block, n_matched[j % RING], matched, j % RING, block_docs, post_docs, post_weights,
                          slot_weight, scores, heap_scores, heap_rows, size)
        upper = floor - 1
    return size, scored


@njit(cache=True, nogil=True)
def _search(q_indptr, q_indices, q_weights, query_cut, heap_factor, k, term_ptr, term_blocks, term_maxima, dense_row,
            dense, max_scale, block_docs, block_entries, block_posts, entry_terms, entry_counts, post_docs,
            post_weights, dims, out_rows, out_scores, out_scored):
    n_blocks = len(block_docs) - 1
    slot8 = np.zeros(dims, np.uint8)
    slot16 = np.zeros(dims, np.uint16)
    slot_weight = np.zeros(2 ** 16, np.float32)  # slot 0: not a query term
    bound = np.zeros(n_blocks, np.uint16)
    chunk_max = np.zeros((n_blocks + CHUNK - 1) // CHUNK, np.uint16)
    chunk_order = np.empty(len(chunk_max), np.int64)
    dense_rows, dense_weights = np.empty(256, np.int64), np.empty(256, np.uint16)
    sparse_at, sparse_end, sparse_weights = np.empty(256, np.int64), np.empty(256, np.int64), np.empty(256, np.int64)
    counts = np.zeros(2 ** 16 + 1, np.int64)
    tier = np.empty(n_blocks, np.int64)
    order = np.empty(n_blocks, np.int64)
    longest = 0
    for q in range(len(q_indptr) - 1):
        longest = max(longest, q_indptr[q + 1] - q_indptr[q])
    matched = np.empty((RING, longest, 3), np.int64)  # blocks' entries of the query's terms: slot, postings
    n_matched = np.zeros(RING, np.int64)
    scores = np.zeros(256, np.float32)
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
        largest = max(q_weights[lo + by_weight[0]], np.float32(1e-30)) if hi > lo else np.float32(1.0)
        bounded = min(query_cut, hi - lo, 256)  # uint16 bounds hold 256 terms' parts
        # a term's part of a block's bound: (query weight x block max), each on a 0-255 scale, >> shift,
        # rounded up; the shift as small as lets `bounded` parts sum in 16 bits (8 for 256 terms)
        shift = 4
        while bounded * ((255 * 255 + (1 << shift) - 1) >> shift) > 65535:
            shift += 1
        n_dense, n_sparse = 0, 0
        for i in range(bounded):
            weight8 = min(255, max(0, math.ceil(q_weights[lo + by_weight[i]] / largest * 255)))
            term = q_indices[lo + by_weight[i]]
            if dense_row[term] >= 0:
                dense_rows[n_dense], dense_weights[n_dense] = dense_row[term], weight8
                n_dense += 1
            elif term_ptr[term + 1] > term_ptr[term]:
                sparse_at[n_sparse], sparse_end[n_sparse] = term_ptr[term], term_ptr[term + 1]
                sparse_weights[n_sparse] = weight8
                n_sparse += 1
        _bounds(dense, dense_rows[:n_dense], dense_weights[:n_dense], term_blocks, term_maxima,
                sparse_at[:n_sparse], sparse_end[:n_sparse], sparse_weights[:n_sparse], shift, bound, chunk_max)
        unit = np.float32(largest * max_scale * (1 << shift) / 255)  # a bound's unit, in score units
        # terms past the 256th within query_cut: each adds at most its weight x the largest block max
        rest = 0.0
        for i in range(256, min(query_cut, hi - lo)):
            rest += q_weights[lo + by_weight[i]]
        offset = math.ceil(rest * 255 * max_scale / unit)
        threshold = unit * heap_factor
        if hi - lo < 256:  # (two calls: numba types the two tables apart)
            size, scored = _walk(bound, chunk_max, chunk_order, offset, threshold, block_docs, block_entries, block_posts, entry_terms,
                                 entry_counts, post_docs, post_weights, slot8, slot_weight, counts, tier, order,
                                 matched, n_matched, scores, heap_scores, heap_rows)
        else:
            size, scored = _walk(bound, chunk_max, chunk_order, offset, threshold, block_docs, block_entries, block_posts, entry_terms,
                                 entry_counts, post_docs, post_weights, slot16, slot_weight, counts, tier, order,
                                 matched, n_matched, scores, heap_scores, heap_rows)
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

    def __init__(self, corpus, block_size: int = 4, query_cut: int = 12, heap_factor: float = 1.0,
                 search_threads: int = 0, bisection_iterations: int = 5, threads: int = 0, progress: bool = True):
        """Built from the corpus's shards, `threads` at a time (0: every core); each adds a shard in memory."""
        from tqdm.auto import tqdm

        if not 0 < block_size <= 255:
            raise ValueError(f"block_size {block_size}: a block's rows are counted in one byte (1-255)")
        self.query_cut, self.heap_factor = query_cut, heap_factor
        self.search_threads, self.dims = search_threads, corpus.dims
        postings, largest = 0, 0.0
        for i in range(corpus.count):  # weights are quantized against the corpus's largest
            data = np.load(corpus.path(i))["data"]
            postings, largest = postings + len(data), max(largest, float(data.max(initial=0.0)))
        largest = largest or 1.0
        self.weight_scale = largest / 65535  # posting weights as uint16, linear against the largest
        self.max_scale = largest / 255  # blocks' largest weights as uint8, rounded up
        shard_blocks = [-(-len(corpus.rows(i)) // block_size) for i in range(corpus.count)]
        n_blocks = sum(shard_blocks)
        self.rows = np.empty(corpus.docs, np.int64)  # index position -> corpus row
        self.block_docs = np.zeros(n_blocks + 1, np.int64)  # where each block's rows start
        self.block_posts = np.zeros(n_blocks + 1, np.int64)  # and its postings
        self.post_docs = np.empty(postings, np.uint8)
        self.post_weights = np.empty(postings, np.uint16)
        term_type = np.uint16 if corpus.dims <= 2 ** 16 else np.uint32

        def laid_out(index: int):
            shard = corpus.load(index)
            order = _bisection_order(shard.indptr, shard.indices, corpus.dims, block_size, bisection_iterations)
            shard = shard[order]
            terms, counts, maxima, block_entries, post_docs, post_weights = _block_layout(
                shard.indptr, shard.indices, shard.data, block_size, corpus.dims, largest)
            piece = (terms.astype(term_type), counts, maxima, block_entries)
            return order, shard.indptr, piece, post_docs, post_weights

        pieces, done, block, threads = [], 0, 0, threads or os.cpu_count() or 1
        with ThreadPoolExecutor(threads) as pool, tqdm(total=corpus.count, desc="block-max index", unit="shard",
                                                        disable=not progress) as bar:
            pending = deque()
            for index in range(corpus.count):
                pending.append((index, pool.submit(laid_out, index)))
                while len(pending) > threads or (pending and index + 1 == corpus.count):
                    at, found = pending.popleft()
                    order, indptr, piece, post_docs, post_weights = found.result()
                    first, n, blocks = corpus.rows(at).start, len(order), shard_blocks[at]
                    self.rows[first:first + n] = first + order
                    starts = np.minimum(np.arange(1, blocks + 1) * block_size, n)
                    self.block_docs[block + 1:block + blocks + 1] = first + starts
                    self.block_posts[block + 1:block + blocks + 1] = done + indptr[starts]
                    self.post_docs[done:done + len(post_docs)] = post_docs
                    self.post_weights[done:done + len(post_docs)] = post_weights
                    pieces.append(piece)
                    done, block = done + len(post_docs), block + blocks
                    bar.update()
        # the blocks' entries, one array each, the shards' pieces freed as they are copied in
        entries = sum(len(piece[0]) for piece in pieces)
        self.entry_terms, self.entry_counts = np.empty(entries, term_type), np.empty(entries, np.uint8)
        maxima, self.block_entries = np.empty(entries, np.uint8), np.zeros(n_blocks + 1, np.int64)
        done, block = 0, 0
        while pieces:
            terms, counts, piece_maxima, block_entries = pieces.pop(0)
            self.entry_terms[done:done + len(terms)], self.entry_counts[done:done + len(terms)] = terms, counts
            maxima[done:done + len(terms)] = piece_maxima
            self.block_entries[block + 1:block + len(block_entries)] = done + block_entries[1:]
            done, block = done + len(terms), block + len(block_entries) - 1
        self.term_ptr, self.term_blocks, self.term_maxima, self.dense_row, self.dense = _invert(
            self.entry_terms, maxima, self.block_entries, corpus.dims)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (
            self.rows, self.block_docs, self.block_posts, self.block_entries, self.post_docs, self.post_weights,
            self.entry_terms, self.entry_counts, self.term_ptr, self.term_blocks, self.term_maxima, self.dense_row,
            self.dense))

    def _search_part(self, queries, depth, rows, scores, scored):
        _search(queries.indptr, queries.indices, queries.data.astype(np.float32), self.query_cut,
                np.float32(self.heap_factor), depth, self.term_ptr, self.term_blocks, self.term_maxima,
                self.dense_row, self.dense, np.float32(self.max_scale / self.weight_scale), self.block_docs,
                self.block_entries, self.block_posts, self.entry_terms, self.entry_counts, self.post_docs,
                self.post_weights, self.dims, rows, scores, scored)

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
