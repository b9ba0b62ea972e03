"""Smoke tests of bench/dedup.py, bench/dedup_scale.py and bench/dedup_margins.py on tiny
inputs (their figures are in docs/BENCHMARKS.md; these check that the scripts run, score and
report as documented)."""

from __future__ import annotations

import csv
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def photo_folder(folder: Path, n: int) -> Path:
    """n unrelated smooth random photos and a manifest.csv, like cars-sample's layout."""
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(n):
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((320, 200), Image.Resampling.BICUBIC)
        names.append(f"images/{k:05d}.jpg")
        img.save(folder / names[-1], quality=92)
    with (folder / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image"], *([name] for name in names)])
    return folder


def test_dedup_bench_scores_planted_copies(tmp_path: Path, capsys):
    bench = load_bench("dedup")
    folder = photo_folder(tmp_path / "photos", 24)
    json_path = tmp_path / "result.json"
    assert (
        bench.main(
            [
                "--images",
                str(folder),
                "--fraction",
                "0.34",
                "--skip-imagededup",
                "--workers",
                "1",
                "--json",
                str(json_path),
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"dedup: carmodels P=([\d.]+) R=([\d.]+) T=[\d.]+s, imagededup n/a, speed ratio n/a", last
    )
    assert match, last
    # 8 copies, two of each kind (mirrored ones included: flip-aware is on by default).
    assert float(match[1]) == 1.0 and float(match[2]) == 1.0
    assert '"n_planted": 8' in json_path.read_text()


def test_dedup_bench_skips_without_photos(tmp_path: Path, capsys):
    bench = load_bench("dedup")
    assert bench.main(["--images", str(tmp_path / "absent")]) == 0
    assert capsys.readouterr().out.startswith("skipped: no photos at")


def test_truth_joins_planted_and_genuine_pairs():
    bench = load_bench("dedup")
    truth = bench.truth_pairs(["a", "b", "c", "d"], {("a", "b"), ("b", "c")})
    assert truth == {("a", "b"), ("a", "c"), ("b", "c")}
    assert bench.score({("a", "b"), ("a", "d")}, truth) == (0.5, 1 / 3)


def test_dedup_scale_bench_finds_every_planted_pair(capsys):
    bench = load_bench("dedup_scale")
    assert bench.main(["--sizes", "2000,4000"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "found 20/20 planted" in lines[1] and "(= brute force)" in lines[1]
    assert "found 40/40 planted" in lines[2] and "growth n^" in lines[2]


def test_dedup_margins_bench_reports_every_copy_kind(tmp_path: Path, capsys):
    bench = load_bench("dedup_margins")
    folder = photo_folder(tmp_path / "photos", 12)
    assert bench.main(["--images", str(folder), "--limit", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("10 photos of")
    by_kind = {line.split()[0]: line for line in lines[1:-1]}
    assert set(by_kind) == set(bench.KINDS)
    # Re-encoding and mirroring keep unrelated smooth photos' copies within both checks.
    for kind in ("q60", "resize80", "mirror"):
        assert "found (both checks) 1.000" in by_kind[kind]
    assert lines[-1].startswith("hash candidates among the originals:")
    with pytest.raises(SystemExit, match="manifest.csv not found"):
        bench.main(["--images", str(tmp_path / "nowhere")])


def test_runs_are_compared_by_their_median(capsys):
    bench = load_bench("dedup")
    assert bench.median_run([(3.0, 4.0), (1.0, 2.0), (2.0, 3.5)]) == (2.0, 3.5)
    assert bench.median_run([(1.0, 1.0), (2.0, 2.0)]) == (2.0, 2.0)  # upper middle
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
