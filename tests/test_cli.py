"""The `carmodels` command line: each stage usable without Dagster, chained through --data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from carmodels.cli import build_parser, main
from carmodels.demo import DemoServer
from tests.conftest import SEED_MANIFEST, requires_seed_manifest

COMMANDS = ["scrape", "dedup", "shard", "train", "evaluate", "generate", "demo-server"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: carmodels {command}" in capsys.readouterr().out


def test_scrape_help_states_the_library_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from carmodels.scrape import ScrapeConfig

    with pytest.raises(SystemExit):
        main(["scrape", "--help"])
    # The options are made from ScrapeConfig's fields (carmodels.options): help and default.
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"over all hosts (default: {ScrapeConfig.concurrency})" in help_text
    assert f"connection pool per host) (default: {ScrapeConfig.per_host_limit})" in help_text


def test_parser_lists_every_command() -> None:
    help_text = build_parser().format_help()
    for command in COMMANDS:
        assert command in help_text


@requires_seed_manifest
def test_dry_run_counts_the_seed_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scrape", "--manifest", str(SEED_MANIFEST), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12214 distinct valid image URLs in 12426 rows" in out
    assert "cdnblob.carvana.io" in out


def test_missing_manifest_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv"
    assert main(["scrape", "--manifest", str(missing), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err


def test_train_without_shards_names_the_command_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--data", str(tmp_path), "train", "--preset", "tiny", "--epochs", "1"]) == 2
    assert "carmodels shard" in capsys.readouterr().err


@pytest.mark.slow
def test_stages_chain_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", str(tmp_path / "data")]
    with DemoServer(n_listings=40) as server:
        manifest = tmp_path / "manifest.csv"
        server.catalog.manifest_frame(server.base_url).to_csv(manifest, index=False)
        assert main([*data, "scrape", "--manifest", str(manifest), "--allow-private-networks"]) == 0
        # Running again resumes: nothing left to fetch.
        assert main([*data, "scrape", "--manifest", str(manifest), "--allow-private-networks"]) == 0
    assert "fetched 0" in capsys.readouterr().out

    raw = pd.concat(pd.read_parquet(p) for p in (tmp_path / "data" / "raw").glob("*.parquet"))
    assert raw["url"].is_unique
    assert (raw["outcome"] == "ok").sum() > 30

    assert main([*data, "dedup"]) == 0
    assert main([*data, "shard"]) == 0
    assert main([*data, "train", "--preset", "tiny", "--epochs", "1", "--batch-size", "16"]) == 0
    assert main([*data, "evaluate", "--n-samples", "32"]) == 0
    metrics = json.loads((tmp_path / "data" / "eval" / "metrics.json").read_text())
    assert metrics["n_generated"] == 32

    designs = tmp_path / "designs"
    assert main([*data, "generate", "--n", "4", "--seed", "3", "--out", str(designs)]) == 0
    pngs = sorted(designs.glob("design-*.png"))
    assert len(pngs) == 4
    with Image.open(pngs[0]) as image:
        assert image.size == (128, 128)


def test_restore_eval_accepts_finetune_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Setting --finetune-steps once raised "multiple values for keyword argument"; now the
    # command gets as far as the (missing) checkpoint and says so.
    missing = tmp_path / "missing.pt"
    args = ["restore-eval", "--checkpoint", str(missing), "--finetune-steps", "5"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().err
