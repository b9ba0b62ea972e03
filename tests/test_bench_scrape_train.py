"""Smoke tests of bench/scrape.py and bench/train.py on tiny synthetic inputs: the scripts run
and report in the documented format (their figures are in docs/BENCHMARKS.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_dedup import photo_folder

REPO = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


@pytest.mark.slow
def test_scrape_bench_runs_one_and_several_fetch_processes(tmp_path: Path):
    folder = photo_folder(tmp_path / "photos", 20)
    out = run_bench(
        "scrape",
        *("--images", str(folder), "--n", "300", "--skip-img2dataset", "--skip-decode-pools"),
        *("--fetch-processes", "0,2", "--json", str(tmp_path / "scrape.json")),
    )
    assert "carmodels thread pool, 2 fetch processes img/s" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"scrape: carmodels \d+ img/s, img2dataset n/a, ratio n/a, ok 300/300 vs n/a", last
    ), last
    assert (tmp_path / "scrape.json").is_file()


@pytest.mark.slow
def test_train_bench_reports_a_ratio(tmp_path: Path):
    folder = photo_folder(tmp_path / "photos", 40)
    out = run_bench(
        "train",
        *("--images", str(folder / "images"), "--rounds", "1"),
        *("--max-images", "32", "--batch-size", "8"),
    )
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"train: carmodels [\d.]+ img/s, seed loop [\d.]+ img/s, ratio [\d.]+", last
    ), last


@pytest.mark.slow
def test_scale_bench_compares_ray_with_the_local_downloader(tmp_path: Path):
    pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")
    folder = photo_folder(tmp_path / "photos", 20)
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "scale.py"), "--images", str(folder)]
        + ["--n", "200", "--repeats", "1", "--json", str(tmp_path / "scale.json")],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Exit 1 says the overhead goal was missed, which 200 URLs cannot show; the output must
    # still be identical and the report complete.
    assert completed.returncode in (0, 1), completed.stderr[-2000:]
    last = completed.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"scale: ray \d+ img/s, local \d+ img/s, overhead -?\d+%, identical yes", last
    ), last
    assert (tmp_path / "scale.json").is_file()
