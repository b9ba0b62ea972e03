"""Scale of the near-duplicate search: ``carmodels.dedup.find_near_duplicates`` alone.

For each size n (default 10^4, 10^5, 10^6) draws n uniformly random 64-bit hashes and plants
neighbours: for 1% of them (n / 100 disjoint pairs) one hash is replaced by a copy of another
with 1 to ``--threshold`` bits flipped (uniformly many, at random positions). Then it times
``find_near_duplicates(hashes, threshold, workers=...)``, the entry point ``deduplicate``
calls (tables, candidate checks, deduplication of pairs, the result frame), and prints one
line per size:

``n=1000000: 3.27 s (5.88 s CPU), 94 tables, 6.49e+08 candidates, found 10000/10000 planted +
5085 other pairs, growth n^1.07 (CPU n^1.09; n log n: n^1.08)``

"growth" is the exponent k in time ~ n^k from the previous size, from wall time and from the
process's CPU time (steadier on a shared machine); n log n would give
1 + log(log n2 / log n1) / log(n2 / n1). The found pairs are checked: every planted pair
must be there and every reported pair within the threshold; at the smallest size (<= 20,000
hashes) the result is compared with brute force. Random hashes are the hard case for the
search (no structure to exploit); uniformly random pairs fall within 10 bits with
probability ~10^-8, so 10^6 hashes also hold ~5,000 chance pairs ("other pairs").
``--flip`` searches the way ``deduplicate`` does with flip-aware on: n/2 photos with random
mirror-image hashes, i.e. n hashes searched together.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import write_report  # noqa: E402

from carmodels.dedup import DedupConfig, SearchStats, find_near_duplicates  # noqa: E402

BRUTE_FORCE_MAX = 20_000


def planted_hashes(n: int, threshold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random hashes and the (source, copy) index pairs planted within ``threshold``."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    n_pairs = max(1, n // 100)
    chosen = rng.choice(n, size=2 * n_pairs, replace=False)
    sources, copies = chosen[:n_pairs], chosen[n_pairs:]
    flips = np.zeros(n_pairs, dtype=np.uint64)
    for k, count in enumerate(rng.integers(1, threshold + 1, size=n_pairs)):
        for bit in rng.choice(64, size=count, replace=False):
            flips[k] |= np.uint64(1) << np.uint64(bit)
    hashes[copies] = hashes[sources] ^ flips
    pairs = np.stack([np.minimum(sources, copies), np.maximum(sources, copies)], axis=1)
    return hashes, pairs


def brute_force(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    found = set()
    for start in range(0, len(hashes), 1000):
        block = hashes[start : start + 1000]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, :])
        rows, columns = np.nonzero(distance <= threshold)
        rows = rows + start
        found |= {(int(a), int(b)) for a, b in zip(rows, columns, strict=True) if a < b}
    return found


def run_size(n: int, threshold: int, flip: bool, seed: int, workers: int) -> dict:
    if flip:
        # n hashes searched: n / 2 photos and their mirror images (random, like the photos).
        hashes, planted = planted_hashes(n // 2, threshold, seed)
        mirrors = np.random.default_rng(seed + 1).integers(0, 2**64, n // 2, dtype=np.uint64)
    else:
        hashes, planted = planted_hashes(n, threshold, seed)
        mirrors = None
    stats = SearchStats()
    started, started_cpu = time.perf_counter(), time.process_time()
    pairs = find_near_duplicates(hashes, threshold, mirrors, stats=stats, workers=workers)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    got = set(zip(pairs["i"].tolist(), pairs["j"].tolist(), strict=True))
    found = sum((int(a), int(b)) in got for a, b in planted)
    if len(pairs) and pairs["distance"].max() > threshold:
        raise SystemExit(f"n={n}: a reported pair is farther than {threshold} bits")
    exact = None
    if not flip and n <= BRUTE_FORCE_MAX:
        exact = got == brute_force(hashes, threshold)
        if not exact:
            raise SystemExit(f"n={n}: the search differs from brute force")
    return {
        "n": n,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "tables": stats.tables,
        "candidates": stats.candidates,
        "planted": len(planted),
        "found_planted": found,
        "pairs": len(pairs),
        "equals_brute_force": exact,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="hash counts")
    parser.add_argument("--threshold", type=int, default=DedupConfig.threshold)
    parser.add_argument("--flip", action="store_true", help="half photos, half mirror hashes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=DedupConfig.workers,
        help="threads scanning the tables (default: DedupConfig.workers, as deduplicate does)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    if any(n < 200 for n in sizes):
        parser.error("--sizes: each size must be at least 200 hashes")
    if args.workers < 1:
        parser.error("--workers: must be at least 1")

    print(
        f"find_near_duplicates, threshold {args.threshold}, random 64-bit hashes"
        f"{' (half mirror images)' if args.flip else ''}, {args.workers} thread(s), "
        f"{os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    results = []
    for n in sizes:
        result = run_size(n, args.threshold, args.flip, args.seed, args.workers)
        growth = ""
        if results:
            previous = results[-1]
            ratio = n / previous["n"]
            k = math.log(result["seconds"] / previous["seconds"]) / math.log(ratio)
            k_cpu = math.log(result["cpu_seconds"] / previous["cpu_seconds"]) / math.log(ratio)
            reference = 1 + math.log(math.log(n) / math.log(previous["n"])) / math.log(ratio)
            result["growth_exponent"] = k
            result["growth_exponent_cpu"] = k_cpu
            growth = f", growth n^{k:.2f} (CPU n^{k_cpu:.2f}; n log n: n^{reference:.2f})"
        results.append(result)
        print(
            f"n={n}: {result['seconds']:.2f} s ({result['cpu_seconds']:.2f} s CPU), "
            f"{result['tables']} tables, "
            f"{result['candidates']:.2e} candidates, found {result['found_planted']}/"
            f"{result['planted']} planted + {result['pairs'] - result['found_planted']} other "
            f"pairs{' (= brute force)' if result['equals_brute_force'] else ''}{growth}",
            flush=True,
        )
    if args.json:
        write_report(args.json, args, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
