"""Near-duplicate detection: carmodels' ``deduplicate`` against imagededup's PHash.

Plants near duplicates of a fraction (default 10%) of the photos in ``--images DIR`` (default
``../shared/data/cars-sample``, a folder with a ``manifest.csv`` whose ``image`` column names
the files), then runs both tools on the same folder of files and scores them against the
planted pairs.

Planted copies: each chosen photo gets one copy, the kinds taken in turn (so about a quarter
each), every copy a new JPEG:

- ``q60``: re-encoded at JPEG quality 60;
- ``resize80``: resized to 80% of each side (Lanczos) and back to the original size (q95);
- ``crop3``: 3% of the width and of the height cut away, 1.5% on each side (q95);
- ``mirror``: mirrored left to right (q95), found only with the flip-aware search (on by
  default in carmodels; imagededup has no such option, so it misses these by design).

Scoring is over pairs of files. Truth: two files are duplicates when they are linked through
planted pairs and *genuine duplicates of the original sample* (Stanford Cars holds a few photos
twice, some mirrored). A pair of originals is counted as genuine when their greyscale 64x64
renderings (the better of as-is and mirrored) differ by at most ``GENUINE_MAX_MAD`` grey
levels on average: a far stricter test than either tool's, which holds only for the same
photograph (inspected: the pairs it accepts on cars-sample are the same shot re-encoded or
mirrored, see docs/BENCHMARKS.md). Truth pairs are all pairs within a connected component.
Predicted pairs: carmodels' clusters (every pair of members, as the clusters are what it drops);
imagededup's ``find_duplicates`` pairs (it does not chain them). Precision = true predicted
pairs / predicted pairs; recall = true predicted pairs / truth pairs.

Timing, warm page cache, both tools with 2 workers, in ``--repeats`` rounds (default 5): a
round is one run of each tool, back to back, the one going first alternating. Each round gives
a speed ratio and the headline is their median: on this shared 2-core machine single runs
varied by a quarter from one to the next, and the two tools' runs drifted apart when all of
one's ran before all of the other's. Each tool's first run is its interpreter's cold run:

- carmodels: ``deduplicate`` on a raw shard (the downloader's output, what the pipeline
  deduplicates), written before each run from the files with the downloader's own
  ``RawShardWriter``; that writing is timed too and reported beside it (the ratio counting it
  on carmodels' side is printed on the line before the last), but the headline compares the
  two tools from the input each one's download step leaves: raw shards for carmodels, image
  files for imagededup. ``deduplicate`` runs with ``DedupConfig()`` (phash, threshold 10,
  flip-aware, colour check) into a fresh output folder, so nothing comes from its hash cache;
  this includes writing ``unique.parquet``, ``clusters.parquet`` and the contact sheet;
- imagededup: ``PHash().encode_images(dir)`` + ``find_duplicates(encoding_map=...)`` in a fresh
  interpreter (``--imagededup-python``, default this one), timed inside around those calls
  only (imports and interpreter start-up do not count). Its ``max_distance_threshold`` is swept
  (``--thresholds``) on the last encodings, and its best F1 is the one reported, with the
  median encoding time plus that threshold's search time.

The last line is
``dedup: carmodels P=.. R=.. T=..s, imagededup P=.. R=.. T=..s, speed ratio R``
(speed ratio = imagededup time / carmodels time). imagededup is not a project dependency; put
it beside the project with ``.venv/bin/pip install --no-deps imagededup scikit-learn joblib
threadpoolctl cloudpickle narwhals`` (its other dependencies, torch included, are already
there), or in a venv of its own passed with ``--imagededup-python``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carmodels.dedup import CLUSTERS_FILE, DedupConfig, deduplicate  # noqa: E402
from carmodels.scrape.raw import RawShardWriter, local_photo_row, raw_schema  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "cars-sample"
KINDS = ("q60", "resize80", "crop3", "mirror")
#: Largest mean absolute grey-level difference (0-255, 64x64, best of as-is and mirrored) for
#: two photos of the original sample to count as the same photograph.
GENUINE_MAX_MAD = 6.0
DEFAULT_THRESHOLDS = "4,6,8,10,12"

#: imagededup's side, in an interpreter of its own that stays up for the whole benchmark:
#: each "encode" line on stdin times one ``encode_images``; "search" sweeps the thresholds
#: over the last encodings and ends it. One JSON line answers each command.
IMAGEDEDUP_WORKER = """
import json, resource, sys, time
from imagededup.methods import PHash
def cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
folder, thresholds, workers = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
phash = PHash(verbose=False)
encodings = None
for command in sys.stdin:
    if command.strip() == "encode":
        started, started_cpu = time.perf_counter(), cpu()
        encodings = phash.encode_images(image_dir=folder, num_enc_workers=workers)
        answer = {"seconds": time.perf_counter() - started, "cpu_seconds": cpu() - started_cpu}
        print(json.dumps(answer), flush=True)
        continue
    runs = []
    for threshold in thresholds:
        started, started_cpu = time.perf_counter(), cpu()
        found = phash.find_duplicates(
            encoding_map=encodings, max_distance_threshold=threshold, num_dist_workers=workers
        )
        search_s, search_cpu_s = time.perf_counter() - started, cpu() - started_cpu
        pairs = sorted({tuple(sorted((a, b))) for a, bs in found.items() for b in bs})
        runs.append(
            {"threshold": threshold, "search_s": search_s, "search_cpu_s": search_cpu_s,
             "pairs": pairs}
        )
    print(json.dumps({"runs": runs}), flush=True)
    break
"""


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------- planting


def plant_copy(img: Image.Image, kind: str) -> tuple[Image.Image, int]:
    """The near-duplicate of ``img`` of one kind, and the JPEG quality to save it at."""
    width, height = img.size
    if kind == "q60":
        return img, 60
    if kind == "resize80":
        small = img.resize((round(width * 0.8), round(height * 0.8)), Image.Resampling.LANCZOS)
        return small.resize((width, height), Image.Resampling.LANCZOS), 95
    if kind == "crop3":
        dx, dy = round(width * 0.015), round(height * 0.015)
        return img.crop((dx, dy, width - dx, height - dy)), 95
    if kind == "mirror":
        return ImageOps.mirror(img), 95
    raise ValueError(f"unknown copy kind {kind!r}; choose from {KINDS}")


@dataclass(frozen=True)
class Planted:
    folder: Path
    files: list[str]
    #: (original file, copy file, kind)
    pairs: list[tuple[str, str, str]]


def plant(images: Path, folder: Path, fraction: float, seed: int) -> Planted:
    """Copy the photos of ``images`` into ``folder`` and add planted near duplicates."""
    with (images / "manifest.csv").open(newline="") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    if not names:
        raise SystemExit(f"{images / 'manifest.csv'} lists no images")
    folder.mkdir(parents=True)
    files = []
    for name in names:
        target = folder / Path(name).name
        shutil.copyfile(images / name, target)
        files.append(target.name)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=round(len(files) * fraction), replace=False))
    pairs = []
    for k, index in enumerate(chosen):
        original = files[index]
        kind = KINDS[k % len(KINDS)]
        with Image.open(folder / original) as source:
            copy, quality = plant_copy(ImageOps.exif_transpose(source).convert("RGB"), kind)
        copy_name = f"copy-{kind}-{Path(original).stem}.jpg"
        copy.save(folder / copy_name, format="JPEG", quality=quality)
        files.append(copy_name)
        pairs.append((original, copy_name, kind))
    return Planted(folder, files, pairs)


def genuine_pairs(folder: Path, originals: list[str], candidates: set[tuple[str, str]]) -> set:
    """Those ``candidates`` (pairs of original files) that are the same photograph."""
    cache: dict[str, np.ndarray] = {}

    def grey(name: str) -> np.ndarray:
        if name not in cache:
            with Image.open(folder / name) as img:
                small = img.convert("L").resize((64, 64), Image.Resampling.BOX)
                cache[name] = np.asarray(small, dtype=np.float32)
        return cache[name]

    original_set = set(originals)
    same = set()
    for a, b in candidates:
        if a in original_set and b in original_set:
            x, y = grey(a), grey(b)
            mad = min(np.abs(x - y).mean(), np.abs(x - y[:, ::-1]).mean())
            if mad <= GENUINE_MAX_MAD:
                same.add((a, b))
    return same


def truth_pairs(files: list[str], links: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """All pairs inside the connected components of ``links``."""
    parent = {f: f for f in files}

    def root(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    for a, b in links:
        parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(root(f), []).append(f)
    return {
        tuple(sorted(pair))
        for members in groups.values()
        for pair in itertools.combinations(members, 2)
    }


def recall_by_kind(predicted: set, planted: list[tuple[str, str, str]]) -> dict[str, float]:
    """Share of the planted pairs of each copy kind that were predicted."""
    found: dict[str, list[bool]] = {}
    for original, copy, kind in planted:
        found.setdefault(kind, []).append(tuple(sorted((original, copy))) in predicted)
    return {kind: sum(hits) / len(hits) for kind, hits in found.items()}


def _kinds_text(recalls: dict[str, float]) -> str:
    return ", ".join(f"{kind} {recall:.2f}" for kind, recall in recalls.items())


def score(predicted: set, truth: set) -> tuple[float, float]:
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(truth) if truth else 1.0
    return precision, recall


# --------------------------------------------------------------------------- the two tools


@dataclass(frozen=True)
class CarmodelsRun:
    """One timed carmodels run: writing the raw shard, then ``deduplicate`` (wall, CPU s)."""

    shard_s: float
    shard_cpu_s: float
    dedup_s: float
    dedup_cpu_s: float
    pairs: frozenset


def run_carmodels(folder: Path, files: list[str], work: Path, workers: int) -> CarmodelsRun:
    """Files -> raw shard -> ``deduplicate``, each step timed; the predicted pairs from the
    clusters."""
    raw_dir, out_dir = work / "raw", work / "unique"
    for path in (raw_dir, out_dir):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    started, started_cpu = time.perf_counter(), cpu_seconds()
    # The downloader's own shard writer (same columns, encodings and compression), one shard.
    writer = RawShardWriter(raw_dir, raw_schema([]), 0, max_rows=len(files) + 1, max_bytes=2**62)
    fetched_at = datetime.now(UTC)
    for name in files:
        writer.add(local_photo_row(name, (folder / name).read_bytes(), fetched_at))
    writer.flush()
    shard_s, shard_cpu_s = time.perf_counter() - started, cpu_seconds() - started_cpu
    started, started_cpu = time.perf_counter(), cpu_seconds()
    deduplicate(raw_dir, out_dir, DedupConfig(workers=workers))
    dedup_s, dedup_cpu_s = time.perf_counter() - started, cpu_seconds() - started_cpu
    members = pq.read_table(out_dir / CLUSTERS_FILE, columns=["cluster_id", "url"]).to_pandas()
    predicted = frozenset(
        tuple(sorted(pair))
        for _, group in members.groupby("cluster_id")
        for pair in itertools.combinations(group["url"], 2)
    )
    return CarmodelsRun(shard_s, shard_cpu_s, dedup_s, dedup_cpu_s, predicted)


class ImagededupSession:
    """imagededup in a fresh interpreter (``IMAGEDEDUP_WORKER``), driven one encoding at a
    time so that its runs interleave with carmodels' runs."""

    def __init__(self, python: str, folder: Path, thresholds: list[int], workers: int) -> None:
        self.python = python
        # A file, not a pipe: a full pipe would block it. Closed by search() or close().
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        command = [python, "-c", IMAGEDEDUP_WORKER, str(folder), json.dumps(thresholds)]
        self._process = subprocess.Popen(
            [*command, str(workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def _ask(self, command: str) -> dict:
        assert self._process.stdin is not None and self._process.stdout is not None
        try:
            self._process.stdin.write(command + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # it died: reported below
        for line in self._process.stdout:  # imagededup or its libraries may print too
            if line.startswith("{"):
                return json.loads(line)
        self._process.wait()
        self._stderr.seek(0)
        raise SystemExit(
            f"imagededup run with {self.python} failed (is imagededup installed there? see "
            f"this script's docstring):\n{self._stderr.read()[-2000:]}"
        )

    def encode(self) -> tuple[float, float]:
        """One timed ``encode_images``: wall and CPU seconds."""
        answer = self._ask("encode")
        return answer["seconds"], answer["cpu_seconds"]

    def search(self) -> list[dict]:
        """The threshold sweep over the last encodings; the session ends."""
        runs = self._ask("search")["runs"]
        self._process.wait()
        self._stderr.close()
        return runs

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def has_imagededup(python: str) -> bool:
    try:
        probe = subprocess.run(
            [python, "-c", "import imagededup.methods"], capture_output=True, text=True
        )
    except OSError:  # no such interpreter
        return False
    return probe.returncode == 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of photos copied")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes for both tools")
    parser.add_argument(
        "--thresholds", default=DEFAULT_THRESHOLDS, help="imagededup max_distance_threshold sweep"
    )
    parser.add_argument(
        "--imagededup-python", default=sys.executable, help="a Python with imagededup installed"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds of one timed run of each tool (the first cold, the others warm); the "
        "median of the rounds' speed ratios is the headline",
    )
    parser.add_argument("--skip-imagededup", action="store_true", help="carmodels alone")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    if not (args.images / "manifest.csv").exists():
        print(
            f"skipped: no photos at {args.images} (needs a manifest.csv; ../shared is absent in "
            "a fresh clone, pass --images DIR)"
        )
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> int:
    planted = plant(args.images, work / "photos", args.fraction, args.seed)
    n_originals = len(planted.files) - len(planted.pairs)
    originals = planted.files[:n_originals]
    print(
        f"{n_originals} photos + {len(planted.pairs)} planted copies "
        f"({', '.join(KINDS)} in turn), {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f}"
    )

    thresholds = [int(t) for t in args.thresholds.split(",")]
    session = None
    if args.skip_imagededup:
        pass
    elif has_imagededup(args.imagededup_python):
        session = ImagededupSession(
            args.imagededup_python, planted.folder, thresholds, args.workers
        )
    else:
        print(f"imagededup not importable with {args.imagededup_python}: carmodels alone")
    # Rounds: one run of each tool, back to back (which goes first alternates), so that both
    # see the same state of this shared machine; each round gives one speed ratio.
    runs, encode_runs = [], []
    try:
        for round_index in range(args.repeats):
            if session is not None and round_index % 2:
                encode_runs.append(session.encode())
            runs.append(run_carmodels(planted.folder, planted.files, work, args.workers))
            if session is not None and not round_index % 2:
                encode_runs.append(session.encode())
        theirs = None if session is None else {"encode_runs": encode_runs, "runs": session.search()}
    finally:
        if session is not None:
            session.close()
    if any(run.pairs != runs[0].pairs for run in runs):
        raise SystemExit("carmodels found different pairs in repeated runs: not deterministic")
    ours = set(runs[0].pairs)
    our_runs = [(run.dedup_s, run.dedup_cpu_s) for run in runs]
    with_shard_runs = [
        (run.shard_s + run.dedup_s, run.shard_cpu_s + run.dedup_cpu_s) for run in runs
    ]
    ours_s, ours_cpu_s = median_run(our_runs)
    with_shard_s, with_shard_cpu_s = median_run(with_shard_runs)

    # Genuine duplicates among the originals: checked only where a tool proposed a pair.
    proposed = set(ours)
    if theirs:
        proposed |= {tuple(p) for run in theirs["runs"] for p in run["pairs"]}
    genuine = genuine_pairs(planted.folder, originals, proposed)
    planted_links = {tuple(sorted((a, b))) for a, b, _ in planted.pairs}
    truth = truth_pairs(planted.files, planted_links | genuine)
    print(f"truth: {len(truth)} pairs ({len(genuine)} genuine pairs among the originals)")
    for a, b in sorted(genuine):
        print(f"  genuine: {a} {b}")

    precision, recall = score(ours, truth)
    our_kinds = recall_by_kind(ours, planted.pairs)
    missed = sorted(truth - ours)
    false = sorted(ours - truth)
    print(
        f"carmodels: {len(ours)} pairs, P={precision:.3f} R={recall:.3f}, {ours_s:.2f} s "
        f"({ours_cpu_s:.2f} s CPU; median of {_runs_text(our_runs)}; with the raw shard's "
        f"writing {with_shard_s:.2f} s, median of {_runs_text(with_shard_runs)}); "
        f"recall by kind: {_kinds_text(our_kinds)}; false pairs: {false[:5]}"
    )
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "n_photos": n_originals,
        "n_planted": len(planted.pairs),
        "n_truth_pairs": len(truth),
        "genuine_pairs": sorted(genuine),
        "carmodels": {
            "precision": precision,
            "recall": recall,
            "seconds": ours_s,
            "cpu_seconds": ours_cpu_s,
            "runs": our_runs,
            "with_shard_write_seconds": with_shard_s,
            "with_shard_write_cpu_seconds": with_shard_cpu_s,
            "with_shard_write_runs": with_shard_runs,
            "pairs": len(ours),
            "recall_by_kind": our_kinds,
            "missed": missed,
            "false": false,
        },
    }
    if theirs is None:
        print(
            f"dedup: carmodels P={precision:.3f} R={recall:.3f} T={ours_s:.2f}s, "
            "imagededup n/a, speed ratio n/a"
        )
        _write_json(args.json, result)
        return 0

    encode_s, encode_cpu_s = median_run(theirs["encode_runs"])
    print(f"imagededup encode: {encode_s:.2f} s, median of {_runs_text(theirs['encode_runs'])}")
    scored = []
    for run in theirs["runs"]:
        pairs = {tuple(p) for p in run["pairs"]}
        p, r = score(pairs, truth)
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        kinds = recall_by_kind(pairs, planted.pairs)
        total = encode_s + run["search_s"]
        total_cpu = encode_cpu_s + run["search_cpu_s"]
        scored.append(
            {
                "threshold": run["threshold"],
                "precision": p,
                "recall": r,
                "f1": f1,
                "seconds": total,
                "cpu_seconds": total_cpu,
                "search_s": run["search_s"],
                "pairs": len(pairs),
                "recall_by_kind": kinds,
            }
        )
        print(
            f"imagededup threshold {run['threshold']:2d}: {len(pairs)} pairs, P={p:.3f} "
            f"R={r:.3f} F1={f1:.3f}, {encode_s:.2f} s encode + "
            f"{run['search_s']:.2f} s search ({total_cpu:.2f} s CPU); "
            f"recall by kind: {_kinds_text(kinds)}"
        )
    best = max(scored, key=lambda s: (s["f1"], -s["threshold"]))
    round_ratios = [
        (encode + best["search_s"]) / ours
        for (encode, _), (ours, _) in zip(theirs["encode_runs"], our_runs, strict=True)
    ]
    ratio = float(np.median(round_ratios))
    print(
        "speed ratio of each round (imagededup encode + search / carmodels): "
        + ", ".join(f"{r:.2f}" for r in round_ratios)
        + f"; median {ratio:.2f} (ratio of the median times: {best['seconds'] / ours_s:.2f})"
    )
    result["imagededup"] = {
        "encode_s": encode_s,
        "encode_runs": theirs["encode_runs"],
        "runs": scored,
        "best": best,
    }
    result["speed_ratio"] = ratio
    result["round_speed_ratios"] = round_ratios
    result["cpu_ratio"] = best["cpu_seconds"] / ours_cpu_s
    result["speed_ratio_with_shard_write"] = best["seconds"] / with_shard_s
    print(
        f"CPU seconds (user + system, all processes): carmodels {ours_cpu_s:.2f}, imagededup "
        f"{best['cpu_seconds']:.2f}, ratio {result['cpu_ratio']:.2f}"
    )
    print(
        f"speed ratio counting the raw shard's writing on carmodels' side: "
        f"{result['speed_ratio_with_shard_write']:.2f} ({with_shard_s:.2f} s)"
    )
    _write_json(args.json, result)
    print(
        f"dedup: carmodels P={precision:.3f} R={recall:.3f} T={ours_s:.2f}s, "
        f"imagededup P={best['precision']:.3f} R={best['recall']:.3f} T={best['seconds']:.2f}s, "
        f"speed ratio {ratio:.2f}"
    )
    return 0


def median_run(runs: list) -> tuple[float, float]:
    """The run of median wall time (wall and CPU seconds); the upper middle of an even count."""
    seconds, cpu_s = sorted(runs)[len(runs) // 2]
    return float(seconds), float(cpu_s)


def _runs_text(runs: list) -> str:
    return ", ".join(f"{seconds:.2f}" for seconds, _ in runs) + " s"


def _write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
