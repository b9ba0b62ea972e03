"""The `carmodels` command line: each stage usable without Dagster, chained through --data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from carmodels.cli import build_parser, main
from carmodels.demo import DemoServer
from carmodels.options import add_dataclass_options, field_default, field_help
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


#: "default: ..." or "default with --finetune: ..." in an option's help.
_STATES_A_DEFAULT = re.compile(r"\bdefault\b[^:()]*:")


def _option_sources() -> dict[str, tuple[type, ...]]:
    """The config dataclasses each command makes options from (`add_dataclass_options`)."""
    from carmodels.dedup import DedupConfig
    from carmodels.demo.server import DemoServerConfig
    from carmodels.evaluate import EvalConfig
    from carmodels.generate import GenerateConfig
    from carmodels.metrics.fid import FidConfig
    from carmodels.restoration_eval import RestorationEvalConfig
    from carmodels.restore import RestoreConfig
    from carmodels.scrape import ScrapeConfig
    from carmodels.shards import ImagingConfig, ShardConfig
    from carmodels.train import TrainConfig

    return {
        "scrape": (ScrapeConfig,),
        "dedup": (DedupConfig,),
        "shard": (ImagingConfig, ShardConfig),
        "train": (TrainConfig,),
        "evaluate": (EvalConfig, FidConfig),
        "generate": (GenerateConfig,),
        "restore": (RestoreConfig,),
        "restore-eval": (RestorationEvalConfig, RestoreConfig),
        "demo-server": (DemoServerConfig,),
    }


def _constant_defaults() -> dict[tuple[str, str], object]:
    """Options whose help names a library constant's value (rendered from the constant)."""
    from carmodels.restore import DEFAULT_FINETUNE_STEPS
    from carmodels.scrape import DEFAULT_MAX_PAGES

    return {
        ("scrape", "max_pages"): DEFAULT_MAX_PAGES,
        ("restore", "finetune_steps"): DEFAULT_FINETUNE_STEPS,
        ("restore-eval", "finetune_steps"): DEFAULT_FINETUNE_STEPS,
    }


def _rendered_from_a_field(action: argparse.Action, sources: tuple[type, ...]) -> bool:
    """Whether ``action``'s help is `add_dataclass_options`'s for a field of ``sources``:
    the field's help, then the field's default."""
    for cls in sources:
        if action.dest not in {f.name for f in dataclasses.fields(cls)}:
            continue
        try:
            text = field_help(cls, action.dest)
        except AttributeError:  # a field without help is not an option
            continue
        # The field's help itself must not state the default: the options add it.
        assert not _STATES_A_DEFAULT.search(text), f"{cls.__name__}.{action.dest}: {text!r}"
        default = field_default(cls, action.dest)
        shown = "''" if default == "" else str(default)
        if action.help == f"{text.replace('%', '%%')} (default: {shown})":
            return True
    return False


def test_no_option_help_restates_a_default_by_hand() -> None:
    """Every default an option's help states comes from its one source: the field of the
    library's config dataclass (rendered by `add_dataclass_options`), argparse's own
    ``%(default)s``, a library constant, or the storage layout under ``--data``."""
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sources, constants = _option_sources(), _constant_defaults()
    parsers = {"": parser, **commands.choices}
    assert set(commands.choices) <= set(sources), "a new command: add it to _option_sources"
    hand_written = []
    for command, command_parser in parsers.items():
        for action in command_parser._actions:
            help_text = action.help or ""
            if not _STATES_A_DEFAULT.search(help_text) or "%(default)s" in help_text:
                continue
            if "DATA" in help_text:  # a path of the storage layout, not a setting
                continue
            if (command, action.dest) in constants:
                assert str(constants[command, action.dest]) in help_text
                continue
            if not _rendered_from_a_field(action, sources.get(command, ())):
                hand_written.append(f"carmodels {command} {action.option_strings}: {help_text}")
    assert not hand_written, "\n".join(hand_written)


def test_the_check_catches_a_default_written_by_hand() -> None:
    from carmodels.evaluate import EvalConfig

    parser = argparse.ArgumentParser()
    by_hand = parser.add_argument("--n-samples", type=int, help="images to score (default: 256)")
    assert _STATES_A_DEFAULT.search(by_hand.help or "")
    assert not _rendered_from_a_field(by_hand, (EvalConfig,))
    generated = argparse.ArgumentParser()
    add_dataclass_options(generated, EvalConfig, ["n_samples"])
    assert _rendered_from_a_field(generated._actions[-1], (EvalConfig,))


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
