"""Smoke tests of bench/dedup.py, bench/dedup_scale.py and bench/dedup_margins.py on tiny
inputs (their figures are in docs/BENCHMARKS.md; these check that the scripts run, score and
report as documented)."""

from __future__ import annotations

import csv
import importlib.util
import json
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


#: A stand-in for an interpreter with imagededup: it answers bench/dedup.py's probe and speaks
#: its worker's line protocol (each encoding "takes" 0.5 s, each search 0.25 s, and finds the
#: pair of the first two files), so the rounds and the headline can be checked exactly.
FAKE_IMAGEDEDUP = """#!{python}
import json, os, sys
if sys.argv[2] == "import imagededup.methods":
    sys.exit(0)
folder, thresholds = sys.argv[3], json.loads(sys.argv[4])
names = sorted(os.listdir(folder))[:2]
for command in sys.stdin:
    if command.strip() == "encode":
        print("some library chatter")
        print(json.dumps({{"seconds": 0.5, "cpu_seconds": 0.9}}), flush=True)
        continue
    runs = [
        {{"threshold": t, "search_s": 0.25, "search_cpu_s": 0.25, "pairs": [names]}}
        for t in thresholds
    ]
    print(json.dumps({{"runs": runs}}), flush=True)
    break
"""


def test_dedup_bench_rounds_against_imagededup(tmp_path: Path, capsys):
    bench = load_bench("dedup")
    folder = photo_folder(tmp_path / "photos", 12)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_IMAGEDEDUP.format(python=sys.executable))
    fake.chmod(0o755)
    json_path = tmp_path / "result.json"
    argv = ["--images", str(folder), "--fraction", "0.34", "--workers", "1", "--repeats", "3"]
    argv += ["--thresholds", "6,8", "--imagededup-python", str(fake), "--json", str(json_path)]
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(json_path.read_text())
    ours = [seconds for seconds, _ in result["carmodels"]["runs"]]
    expected = [0.75 / seconds for seconds in ours]  # one ratio per round, in order
    assert result["round_speed_ratios"] == pytest.approx(expected)
    assert result["speed_ratio"] == pytest.approx(sorted(expected)[1])
    assert result["imagededup"]["encode_runs"] == [[0.5, 0.9]] * 3
    assert result["imagededup"]["best"]["threshold"] == 6  # equal F1: the lower threshold
    assert last.endswith(f"speed ratio {result['speed_ratio']:.2f}")


def test_dedup_bench_reports_a_broken_imagededup(tmp_path: Path):
    bench = load_bench("dedup")
    folder = photo_folder(tmp_path / "photos", 6)
    fake = tmp_path / "fake-python"
    probe_ok = "if sys.argv[2] == 'import imagededup.methods': sys.exit(0)"
    fake.write_text(f"#!{sys.executable}\nimport sys\n{probe_ok}\nsys.exit('no GPU here')\n")
    fake.chmod(0o755)
    argv = ["--images", str(folder), "--workers", "1", "--repeats", "1"]
    with pytest.raises(SystemExit, match="imagededup run with .* failed(?s:.*)no GPU here"):
        bench.main([*argv, "--imagededup-python", str(fake)])


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
