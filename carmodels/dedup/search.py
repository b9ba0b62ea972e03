"""Exact near-neighbour search over 64-bit hashes: every pair within a Hamming threshold.

``find_near_duplicates`` finds the pairs with a multi-index search whose tables
(``search_masks``) are planned per call by a cost model: pure numpy (and pandas for the
result), with no images, files or configuration, so that bench/dedup_scale.py can time it
alone up to 10^6 hashes and the tests can compare it with brute force.
``find_near_duplicates_between`` searches the same tables for the pairs between two sets
only (an incremental run's new photos against the kept ones).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from carmodels.dedup.config import HASH_BITS
from carmodels.parallel import map_in_threads


def _band_layout(n_bands: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of ``n_bands`` contiguous bit bands covering ``bits`` bits."""
    base, extra = divmod(bits, n_bands)
    layout, shift = [], 0
    for band in range(n_bands):
        width = base + (1 if band < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


#: Cost model of the search, per hash and table (key, sort, gathers) and per candidate pair
#: (distance check, and locating the close ones: shorter keys make candidates closer), in
#: the same unit. Fitted to timings of every plan at 10^3 to 3 * 10^5 random hashes
#: (threshold 10): with these weights the model picks the fastest plan at each size.
_COST_PER_HASH_TABLE = 1.0
_COST_PER_CANDIDATE = 2.0
#: Parts whose covering would need more tables than this are not considered.
_MAX_TABLES_PER_PART = 1024


def _covering_masks(shift: int, width: int, tolerance: int) -> list[int]:
    """Bit masks inside one part such that two hashes differing in at most ``tolerance`` of
    the part's bits agree exactly on at least one mask (Pagh's covering LSH, SODA 2016).

    Each bit position i of the part gets a nonzero vector m(i) of GF(2)^(tolerance + 1); mask v
    (one per nonzero v) holds the positions with <m(i), v> = 1. The <= tolerance positions
    where two hashes differ span at most ``tolerance`` dimensions, so some nonzero v is
    orthogonal to all of them and its mask avoids them all: no false negative, by
    construction. The vectors are spread so that every mask holds about half the part (all
    nonzero vectors in turn when the part is wide enough; else first those with the lowest
    coordinate set, which every v but that coordinate's splits evenly). tolerance 0 is the
    classic multi-index band: one mask, the whole part.
    """
    dims = tolerance + 1
    nonzero = list(range(1, 2**dims))
    if width < len(nonzero):
        nonzero = [u for u in nonzero if u & 1] + [u for u in nonzero if not u & 1]
    vectors = [nonzero[k % len(nonzero)] for k in range(width)]
    masks = []
    for v in range(1, 2**dims):
        mask = 0
        for k, u in enumerate(vectors):
            if (u & v).bit_count() % 2:
                mask |= 1 << (shift + k)
        masks.append(mask)
    return masks


def _plan_masks(threshold: int, bits: int, n_parts: int) -> list[int] | None:
    """The masks of ``n_parts`` parts (see ``search_masks``); None if a part needs too many."""
    spare = threshold - n_parts + 1  # sum of the parts' tolerances
    if spare < 0 or n_parts > bits:
        raise ValueError(f"{n_parts} parts cannot cover threshold {threshold} on {bits} bits")
    base, extra = divmod(spare, n_parts)
    layout = _band_layout(n_parts, bits)  # wider parts first: they take the extra tolerance
    tolerances = [base + (1 if k < extra else 0) for k in range(n_parts)]
    if any(2 ** (t + 1) - 1 > _MAX_TABLES_PER_PART for t in tolerances):
        return None
    return [
        mask
        for (shift, width), tolerance in zip(layout, tolerances, strict=True)
        for mask in _covering_masks(shift, width, tolerance)
    ]


@functools.cache
def search_masks(
    threshold: int, bits: int, n_hashes: int, n_pairs: int | None = None
) -> tuple[int, ...]:
    """The tables of the exact search: bit masks such that any two hashes within ``threshold``
    bits of each other agree exactly on at least one mask.

    The hash is split into P parts; by the general pigeonhole principle, two hashes within
    ``threshold`` differ in at most t_j bits of some part j whenever the t_j sum to
    ``threshold - P + 1``, and each part is covered for its t_j by ``_covering_masks``. P =
    threshold + 1 is classic multi-index hashing (every t_j = 0, each part one table); fewer
    parts give more tables but longer keys. Longer keys matter as the count grows: with
    threshold 10 and 64 bits, the 11 bands of 5-6 bits put any two of 10^6 random hashes in
    a common bucket with probability ~1/5, about 10^11 candidate pairs, while 2 parts of 32
    bits (t = 5 and 4) give 94 tables of 16-bit keys and ~7 * 10^8 candidates. P is chosen
    per call by the cost model above for ``n_hashes`` uniformly random hashes (real hashes
    cluster, which adds candidates to every plan alike). ``n_pairs`` is how many pairs the
    search weighs (default: all pairs of the ``n_hashes``; a search between two sets weighs
    only the pairs across them, so fewer, shorter-keyed tables can pay).
    """
    best: tuple[float, tuple[int, ...]] | None = None
    pairs = n_hashes * (n_hashes - 1) / 2 if n_pairs is None else n_pairs
    for n_parts in range(1, min(threshold + 1, bits) + 1):
        masks = _plan_masks(threshold, bits, n_parts)
        if masks is None or not all(masks):
            continue
        candidates = sum(pairs * 2.0 ** -mask.bit_count() for mask in masks)
        cost = len(masks) * n_hashes * _COST_PER_HASH_TABLE + candidates * _COST_PER_CANDIDATE
        if best is None or cost < best[0]:
            best = (cost, tuple(masks))
    assert best is not None  # n_parts = threshold + 1 (tolerance 0) always qualifies
    return best[1]


def _popcount(values: np.ndarray) -> np.ndarray:
    return np.bitwise_count(values).astype(np.int64)


#: Odd 64-bit multiplier (2^64 / golden ratio): its top bits hash a masked key.
_KEY_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


#: Hashes per block when checking runs: bounds a block's arrays to under 1 MB, which stay in
#: the CPU's L2 cache across its offsets (2^14 to 2^22 timed within 5% of each other at 10^6
#: hashes, so memory decided).
_BLOCK_ELEMENTS = 1 << 15


def _close_pairs_in_table(
    hashes: np.ndarray, mask: int, threshold: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs (i < j) of ``hashes`` equal on ``mask`` and within ``threshold`` bits, and how
    many candidate pairs were checked.

    Hashes with equal masked bits must end up next to each other. Sorting one uint64 per hash
    (a hash of the masked bits in the high bits, the index in the low bits) is several times
    faster than an argsort; two different keys that share the hashed bits only add candidates,
    and every candidate is checked on the full hash, so the result stays exact. Equal keys form
    runs, and every pair inside a run is a candidate (``_close_pairs_in_runs``).
    """
    n = len(hashes)
    index_bits = np.uint64(max(1, (n - 1).bit_length()))
    # In place: at 10^6 hashes each pass over the keys costs about as much as the sort.
    packed = np.bitwise_and(hashes, np.uint64(mask))
    packed *= _KEY_MULTIPLIER
    packed >>= index_bits  # keep the top key bits, make room for the index
    packed <<= index_bits
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & ((np.uint64(1) << index_bits) - np.uint64(1))).astype(np.int64)
    packed >>= index_bits  # the sorted keys
    sorted_hashes = hashes[order]
    starts = np.flatnonzero(np.r_[True, packed[1:] != packed[:-1]])
    lengths = np.diff(np.r_[starts, n])
    left_parts, right_parts = [], []
    n_candidates = 0
    for length in np.unique(lengths[lengths > 1]).tolist():
        run_starts = starts[lengths == length]
        n_candidates += len(run_starts) * length * (length - 1) // 2
        left, right = _close_pairs_in_runs(sorted_hashes, run_starts, length, threshold)
        left_parts.append(order[left])
        right_parts.append(order[right])
    if not left_parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, n_candidates
    left = np.concatenate(left_parts)
    right = np.concatenate(right_parts)
    return np.minimum(left, right), np.maximum(left, right), n_candidates


def _close_pairs_in_runs(
    sorted_hashes: np.ndarray, run_starts: np.ndarray, length: int, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Close pairs (sorted positions) inside runs that all have ``length`` hashes.

    The runs are laid out as columns (``length`` rows, one column per run) and member k is
    checked against member (k + d) mod ``length`` for d = 1 .. length // 2: every pair exactly
    once (at d = length / 2 only the first half of the rows, which the second half repeats).
    Each step is two numpy calls over a contiguous block, with no index array per candidate;
    close pairs are rare, so they are looked for only in a step whose minimum is close. Any
    length works in bounded memory (a block holds at least one run): runs of ~150 at 10^7
    random hashes, or thousands when many photos share one hash.
    """
    half = length // 2
    rows = np.r_[np.arange(length), np.arange(half)]  # row k + d of a column: member (k + d) % L
    columns = max(1, _BLOCK_ELEMENTS // length)
    left_parts, right_parts = [], []
    for first in range(0, len(run_starts), columns):
        block_starts = run_starts[first : first + columns]
        cyclic = sorted_hashes[rows[:, None] + block_starts]  # (length + half, runs)
        xor = np.empty((length, len(block_starts)), dtype=np.uint64)
        bit_counts = np.empty(xor.shape, dtype=np.uint8)
        for d in range(1, half + 1):
            k = length if 2 * d < length else half
            np.bitwise_xor(cyclic[d : d + k], cyclic[:k], out=xor[:k])
            np.bitwise_count(xor[:k], out=bit_counts[:k])
            if bit_counts[:k].min() > threshold:
                continue
            member, run = np.divmod(np.flatnonzero(bit_counts[:k] <= threshold), xor.shape[1])
            left_parts.append(block_starts[run] + member)
            right_parts.append(block_starts[run] + (member + d) % length)
    if not left_parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(left_parts), np.concatenate(right_parts)


#: Below this many hashes a table takes under a millisecond: threads would cost more than
#: they overlap.
_SEARCH_THREADS_MIN_HASHES = 20_000


@dataclass
class SearchStats:
    """What one search did: tables (masks) sorted and candidate pairs checked."""

    tables: int = 0
    candidates: int = 0


def _union_over_tables(
    pairs_in_table: Callable[[int], tuple[np.ndarray, np.ndarray, int]],
    masks: Sequence[int],
    n_right: int,
    stats: SearchStats | None,
    threads: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs ``(i, j)`` that ``pairs_in_table(mask)`` finds in any table, each once.

    A close pair agrees on several masks, so tables repeat pairs: each is coded as one int64,
    ``i * n_right + j``, to drop the repeats with one ``np.unique``.
    """
    found = [np.empty(0, dtype=np.int64)]
    for i, j, n_candidates in map_in_threads(pairs_in_table, masks, threads):
        found.append(i * n_right + j)
        if stats is not None:
            stats.tables += 1
            stats.candidates += n_candidates
    return np.divmod(np.unique(np.concatenate(found)), n_right)


def _within_threshold(
    hashes: np.ndarray,
    threshold: int,
    bits: int,
    masks: Iterable[int] | None = None,
    stats: SearchStats | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of ``hashes`` within ``threshold`` bits, and their distances.

    Candidates are the pairs equal on some mask of ``search_masks`` (or ``masks``), checked
    with a popcount; exact, as every close pair shares at least one mask's bits. Tables are
    scanned in ``workers`` threads (the sort and the checks release the GIL).
    """
    n = len(hashes)
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    masks = search_masks(threshold, bits, n) if masks is None else masks
    threads = workers if n >= _SEARCH_THREADS_MIN_HASHES else 1
    i, j = _union_over_tables(
        lambda mask: _close_pairs_in_table(hashes, mask, threshold), list(masks), n, stats, threads
    )
    return i, j, _popcount(hashes[i] ^ hashes[j])


def _cross_pairs_in_table(
    left: np.ndarray, right: np.ndarray, mask: int, threshold: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs (a of ``left``, b of ``right``) equal on ``mask`` and within ``threshold`` bits,
    and how many candidate pairs (equal on ``mask``) were checked.

    Only ``right`` (the new photos: the smaller side) is sorted, into buckets by a hash of its
    masked bits (2 to 4 buckets per hash); each ``left`` hash (a kept photo) then finds its
    bucket with one lookup, so a table costs a few passes over ``left`` plus a sort of
    ``right``, and no pair inside one side is ever a candidate. Most ``left`` hashes land in
    an empty bucket and go no further; pairs that only share a bucket are dropped before they
    count as candidates.
    """
    mask_value = np.uint64(mask)
    bucket_bits = max(1, len(right).bit_length() + 1)
    shift = np.uint64(64 - bucket_bits)

    def buckets(hashes: np.ndarray) -> np.ndarray:
        # In place after the first pass: at 10^6 kept hashes these passes are the table's cost.
        keys = np.bitwise_and(hashes, mask_value)
        keys *= _KEY_MULTIPLIER
        keys >>= shift
        return keys.view(np.int64)  # < 2^bucket_bits: the same bits as an index

    right_buckets = buckets(right)
    order = np.argsort(right_buckets, kind="stable")
    sizes = np.bincount(right_buckets, minlength=1 << bucket_bits)
    starts = np.cumsum(sizes) - sizes
    left_buckets = buckets(left)
    hits = np.flatnonzero(sizes[left_buckets])  # left hashes whose bucket is not empty
    left_parts, right_parts = [], []
    n_candidates = 0
    for first in range(0, len(hits), _BLOCK_ELEMENTS):  # bounds the candidate arrays
        rows = hits[first : first + _BLOCK_ELEMENTS]
        bucket = left_buckets[rows]
        counts = sizes[bucket]
        total = int(counts.sum())
        a = np.repeat(rows, counts)
        # The k-th right hash of a left hash's bucket, in bucket order.
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        b = order[np.repeat(starts[bucket], counts) + offsets]
        same_key = ((left[a] ^ right[b]) & mask_value) == 0
        a, b = a[same_key], b[same_key]
        n_candidates += len(a)
        close = _popcount(left[a] ^ right[b]) <= threshold
        left_parts.append(a[close])
        right_parts.append(b[close])
    if not left_parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, n_candidates
    return np.concatenate(left_parts), np.concatenate(right_parts), n_candidates


def _cross_within_threshold(
    left: np.ndarray,
    right: np.ndarray,
    threshold: int,
    masks: Sequence[int],
    stats: SearchStats | None,
    workers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a of ``left``, b of ``right``) within ``threshold`` bits, and their distances:
    exact for the same reason as ``_within_threshold``, over the same tables."""
    if not len(left) or not len(right):
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    threads = workers if len(left) + len(right) >= _SEARCH_THREADS_MIN_HASHES else 1
    a, b = _union_over_tables(
        lambda mask: _cross_pairs_in_table(left, right, mask, threshold),
        masks,
        len(right),
        stats,
        threads,
    )
    return a, b, _popcount(left[a] ^ right[b])


def _pairs_frame(i: np.ndarray, j: np.ndarray, distance: np.ndarray) -> pd.DataFrame:
    """Columns ``i, j, distance``, one row per pair at its smallest distance (a pair found
    both directly and through a mirror image keeps the closer one)."""
    frame = pd.DataFrame({"i": i.astype(np.int64), "j": j.astype(np.int64), "distance": distance})
    frame = frame.groupby(["i", "j"], as_index=False, sort=True)["distance"].min()
    return frame.astype({"distance": np.int64})


def find_near_duplicates(
    hashes: np.ndarray,
    threshold: int,
    flipped_hashes: np.ndarray | None = None,
    bits: int = HASH_BITS,
    stats: SearchStats | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Pairs of hashes within ``threshold`` Hamming distance: columns ``i < j, distance``.

    With ``flipped_hashes`` (the hashes of the mirror images), a pair also matches when one
    photo is close to the other's mirror image; ``distance`` is the smaller of the two.
    Exact (equal to brute force) and close to n log n for random hashes: see
    ``search_masks``; bench/dedup_scale.py times it up to 10^6 hashes. ``stats``, when given,
    is filled with the number of tables and candidate pairs. ``workers`` threads scan the
    tables (from 20,000 hashes; ~1.6x faster with 2 at 10^6 hashes, where memory bandwidth
    rather than the cores limits it).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if flipped_hashes is None:
        i, j, distance = _within_threshold(hashes, threshold, bits, stats=stats, workers=workers)
    else:
        flipped_hashes = np.ascontiguousarray(flipped_hashes, dtype=np.uint64)
        if flipped_hashes.shape != hashes.shape:
            raise ValueError("flipped_hashes must have the same shape as hashes")
        # Search originals and mirrors together; a stacked index k >= n is the mirror of k - n.
        a, b, distance = _within_threshold(
            np.concatenate([hashes, flipped_hashes]), threshold, bits, stats=stats, workers=workers
        )
        mirror_a, mirror_b = a >= n, b >= n
        a, b = a % n, b % n
        # Mirror vs mirror repeats original vs original; a photo vs its own mirror is no pair.
        keep = ~(mirror_a & mirror_b) & (a != b)
        i, j = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        distance = distance[keep]
    return _pairs_frame(i, j, distance)


def find_near_duplicates_between(
    known: np.ndarray,
    new: np.ndarray,
    threshold: int,
    known_flipped: np.ndarray | None = None,
    new_flipped: np.ndarray | None = None,
    bits: int = HASH_BITS,
    stats: SearchStats | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Pairs of a ``known`` hash and a ``new`` one within ``threshold`` Hamming distance:
    columns ``i`` (into ``known``), ``j`` (into ``new``), ``distance``.

    What an incremental run needs: new photos against the hashes already kept, without
    comparing the kept ones with each other again (pairs inside ``new`` are
    ``find_near_duplicates``' job). Same tables and the same mirror rule as
    ``find_near_duplicates`` (give both flipped arrays or neither), and exact like it; a table
    sorts only ``new`` and looks each known hash up in it, so a run costs about
    len(known) * log len(new) per table plus the candidates, which all cross the two sets.
    """
    known = np.ascontiguousarray(known, dtype=np.uint64)
    new = np.ascontiguousarray(new, dtype=np.uint64)
    if (known_flipped is None) != (new_flipped is None):
        raise ValueError("give both known_flipped and new_flipped, or neither")
    masks = search_masks(threshold, bits, len(known) + len(new), len(known) * len(new))
    a, b, distance = _cross_within_threshold(known, new, threshold, masks, stats, workers)
    if known_flipped is not None and new_flipped is not None:
        known_flipped = np.ascontiguousarray(known_flipped, dtype=np.uint64)
        new_flipped = np.ascontiguousarray(new_flipped, dtype=np.uint64)
        if known_flipped.shape != known.shape or new_flipped.shape != new.shape:
            raise ValueError("flipped hashes must have the shapes of the hashes they mirror")
        # A known mirror against a new original, and a known original against a new mirror
        # (mirror against mirror repeats original against original).
        mirror_a, mirror_b, mirror_distance = _cross_within_threshold(
            known_flipped, new, threshold, masks, stats, workers
        )
        other_a, other_b, other_distance = _cross_within_threshold(
            known, new_flipped, threshold, masks, stats, workers
        )
        a = np.concatenate([a, mirror_a, other_a])
        b = np.concatenate([b, mirror_b, other_b])
        distance = np.concatenate([distance, mirror_distance, other_distance])
    return _pairs_frame(a, b, distance)


__all__ = [
    "HASH_BITS",
    "SearchStats",
    "find_near_duplicates",
    "find_near_duplicates_between",
    "search_masks",
]
