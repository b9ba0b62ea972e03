"""Smoke test of bench/load.py on a small synthetic shard set."""

from __future__ import annotations

import re

import pytest

from tests.test_bench_dedup import load_bench


@pytest.mark.slow
def test_load_bench_reports_rates(capsys):
    bench = load_bench("load")
    assert bench.main(["--n", "600", "--synthetic", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "load_images: 600 images" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"load: load_images 600 images in [\d.]+ s \([\d,]+ img/s\), "
        r"iter_images [\d.]+ s \([\d,]+ img/s\)",
        last,
    ), last
