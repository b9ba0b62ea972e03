"""bench/train_options.py --rescore: verdicts of saved results, whichever judge scored them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench_dedup import load_bench

SAVED_WITH_TYPE_FD = Path(__file__).parents[1] / "docs/bench-results/2026-11-28-train-options.json"


def saved_runs(metric: str) -> dict:
    """Two seeds of the baseline (raw and EMA) and of DiffAugment (EMA), scored on ``metric``."""
    values = {
        ("baseline", "raw"): (40.0, 42.0),
        ("baseline", "ema"): (30.0, 31.0),
        ("diffaugment", "ema"): (20.0, 21.0),
    }
    runs = [
        {
            "variant": variant,
            "seed": seed,
            "weights": weights,
            "metrics": {metric: fds[seed], "pixel_fd_16": 5.0 - seed},
            "train_s": 1.0,
        }
        for (variant, weights), fds in values.items()
        for seed in (0, 1)
    ]
    return {"variants": {"baseline": {}, "diffaugment": {}}, "runs": runs}


@pytest.mark.parametrize("metric", ["judge_fd", "type_fd"])
def test_rescore_compares_on_the_judge_the_runs_were_scored_with(
    tmp_path: Path, metric: str, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(saved_runs(metric)))
    assert load_bench("train_options").main(["--rescore", str(saved)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"train options: ema better ({metric} 41.0 -> 30.5), "
        f"diffaugment better ({metric} 30.5 -> 20.5)"
    )


def test_rescore_of_the_committed_result_matches_its_page(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 2026-11-28 result predates the validated judge: it holds type_fd."""
    assert load_bench("train_options").main(["--rescore", str(SAVED_WITH_TYPE_FD)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    page = (Path(__file__).parents[1] / "docs/benchmarks/train-options.md").read_text()
    assert last.startswith("train options: ema better (type_fd 44.3 -> 32.4)")
    assert " ".join(last.split()[:6]) in " ".join(page.split())
