"""Bad input on the command line: one line on stderr naming the input, exit 2, no traceback.

Each case builds a small broken input in tmp_path and runs ``carmodels.cli.main``; a traceback
is only for bugs (and for ``--debug``). A failed command must leave earlier outputs as they
were.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import carmodels.dedup
from carmodels.cli import main
from carmodels.errors import InputError, MissingInputError
from carmodels.models import get_preset
from carmodels.shards import load_images
from carmodels.storage import StorageInputError, StorageRoot
from carmodels.train import TrainConfig, load_checkpoint, train
from tests.conftest import write_blocky_shards

SIZE = 32
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def jpeg(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """A smooth random photo: distinct seeds are not duplicates of each other."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(low).resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_raw(folder: Path, photos: dict[str, bytes]) -> Path:
    """A raw shard with the columns dedup and shard read, every row fetched ok."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "url": list(photos),
            "outcome": ["ok"] * len(photos),
            "image_bytes": pa.array(list(photos.values()), pa.binary()),
            "sha256": [hashlib.sha256(data).hexdigest() for data in photos.values()],
            "fetched_at": [T0 + timedelta(seconds=k) for k in range(len(photos))],
        }
    )
    pq.write_table(table, folder / "raw-00000.parquet")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny, two-step) checkpoint to break in various ways."""
    root = tmp_path_factory.mktemp("cli-errors")
    write_blocky_shards(root / "shards", ["train"] * 16, size=SIZE, seed=1)
    config = TrainConfig(
        preset="tiny", image_size=SIZE, epochs=1, batch_size=8, max_steps_per_epoch=2, device="cpu"
    )
    result = train(root / "shards", root / "run", config)
    assert result.checkpoint_path is not None
    return result.checkpoint_path


@dataclass
class Inputs:
    """Where a case puts its broken input; ``checkpoint`` is a good one to start from."""

    root: Path
    checkpoint: Path

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            path.write_text(text)
        else:
            path.write_bytes(text)
        return path

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path


#: A case builds its input and returns (argv, text the one error line must contain).
Case = Callable[[Inputs], tuple[list[str], str]]


def _manifest(text: str, name: str = "manifest.csv") -> Case:
    def case(inputs: Inputs) -> tuple[list[str], str]:
        path = inputs.file(name, text)
        return ["scrape", "--manifest", str(path), "--dry-run"], str(path)

    return case


def _missing_manifest(inputs: Inputs) -> tuple[list[str], str]:
    return ["scrape", "--manifest", str(inputs.root / "nope.csv"), "--dry-run"], "nope.csv"


def _no_source(inputs: Inputs) -> tuple[list[str], str]:
    return ["scrape"], "--manifest FILE or --start-url"


def _dedup_out_under_a_file(inputs: Inputs) -> tuple[list[str], str]:
    raw = write_raw(inputs.root / "raw", {"https://a.example/1.jpg": jpeg(1)})
    blocker = inputs.file("blocker", "a regular file")
    return ["dedup", "--raw", str(raw), "--out", str(blocker / "unique")], str(blocker)


def _scrape_out_under_a_file(inputs: Inputs) -> tuple[list[str], str]:
    manifest = inputs.file("m.csv", "url\nhttps://a.example/x.jpg\n")
    blocker = inputs.file("blocker", "a regular file")
    argv = ["--data", str(inputs.root / "data"), "scrape", "--manifest", str(manifest)]
    return [*argv, "--out", str(blocker / "raw")], str(blocker)


def _generate_out_under_a_file(inputs: Inputs) -> tuple[list[str], str]:
    blocker = inputs.file("blocker", "a regular file")
    argv = ["generate", "--checkpoint", str(inputs.checkpoint), "--n", "1"]
    return [*argv, "--out", str(blocker / "designs")], str(blocker)


def _generate_from(make: Callable[[Inputs], Path]) -> Case:
    def case(inputs: Inputs) -> tuple[list[str], str]:
        path = make(inputs)
        return ["generate", "--checkpoint", str(path), "--out", str(inputs.root / "g")], str(path)

    return case


def _truncated_checkpoint(inputs: Inputs) -> Path:
    data = inputs.checkpoint.read_bytes()
    return inputs.file("truncated.pt", data[: len(data) // 2])


def _text_checkpoint(inputs: Inputs) -> Path:
    return inputs.file("notes.pt", "not a checkpoint\n")


def _foreign_checkpoint(inputs: Inputs) -> Path:
    path = inputs.root / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    return path


def _incomplete_checkpoint(inputs: Inputs) -> Path:
    state = load_checkpoint(inputs.checkpoint)
    del state["generator"]
    path = inputs.root / "incomplete.pt"
    torch.save(state, path)
    return path


def _shard_from_empty_unique(inputs: Inputs) -> tuple[list[str], str]:
    unique = inputs.folder("unique")
    raw = write_raw(inputs.root / "raw", {"https://a.example/1.jpg": jpeg(1)})
    argv = ["shard", "--unique", str(unique), "--raw", str(raw)]
    return [*argv, "--out", str(inputs.root / "shards")], str(unique)


def _shard_from_corrupt_unique(inputs: Inputs) -> tuple[list[str], str]:
    unique = inputs.file("unique/unique.parquet", b"PAR1 cut short")
    raw = write_raw(inputs.root / "raw", {"https://a.example/1.jpg": jpeg(1)})
    argv = ["shard", "--unique", str(unique.parent), "--raw", str(raw)]
    return [*argv, "--out", str(inputs.root / "shards")], str(unique)


def _train_on(make: Callable[[Inputs], Path], expected: str | None = None) -> Case:
    def case(inputs: Inputs) -> tuple[list[str], str]:
        shards = make(inputs)
        argv = ["train", "--shards", str(shards), "--out", str(inputs.root / "run")]
        return [*argv, "--preset", "tiny", "--epochs", "1"], expected or str(shards)

    return case


def _evaluate_on(make: Callable[[Inputs], Path]) -> Case:
    def case(inputs: Inputs) -> tuple[list[str], str]:
        shards = make(inputs)
        argv = ["evaluate", "--checkpoint", str(inputs.checkpoint), "--shards", str(shards)]
        argv += ["--out", str(inputs.root / "eval"), "--no-fid", "--n-samples", "4"]
        return argv, str(shards)

    return case


def _empty_shards(inputs: Inputs) -> Path:
    return inputs.folder("shards")


def _corrupt_shards(inputs: Inputs) -> Path:
    return inputs.file("shards/car-00000.parquet", b"PAR1 cut short").parent


def _other_schema_version(inputs: Inputs) -> Path:
    shards = write_blocky_shards(inputs.root / "shards", ["train"] * 16, size=SIZE)
    summary = {"schema_version": 99, "shards": ["car-00000.parquet"]}
    (shards / "summary.json").write_text(json.dumps(summary))
    return shards


def _only_val_images(inputs: Inputs) -> Path:
    return write_blocky_shards(inputs.root / "shards", ["val"] * 4, size=SIZE)


def _dedup_missing_raw(inputs: Inputs) -> tuple[list[str], str]:
    raw = inputs.root / "nowhere"
    return ["dedup", "--raw", str(raw), "--out", str(inputs.root / "unique")], "carmodels scrape"


def _dedup_corrupt_raw(inputs: Inputs) -> tuple[list[str], str]:
    shard = inputs.file("raw/raw-00000.parquet", b"PAR1 cut short")
    return ["dedup", "--raw", str(shard.parent), "--out", str(inputs.root / "unique")], str(shard)


def _data_root(url: str) -> Case:
    def case(inputs: Inputs) -> tuple[list[str], str]:
        return ["--data", url, "dedup"], url

    return case


CASES: dict[str, Case] = {
    "manifest-without-url-column": _manifest("make,link\nAudi,a.example/x.jpg\n"),
    "manifest-with-only-a-header": _manifest("url\n"),
    "manifest-empty-file": _manifest(""),
    "manifest-without-usable-urls": _manifest("url\nnot a url\n"),
    "manifest-malformed-csv": _manifest('url,make\n"https://a.example/x.jpg,Audi\n'),
    "manifest-malformed-jsonl": _manifest('{"url": "https://a.example/x.jpg"\n', "m.jsonl"),
    "manifest-unknown-suffix": _manifest("url\n", "manifest.xlsx"),
    "manifest-missing": _missing_manifest,
    "scrape-without-source": _no_source,
    "scrape-out-under-a-file": _scrape_out_under_a_file,
    "dedup-out-under-a-file": _dedup_out_under_a_file,
    "generate-out-under-a-file": _generate_out_under_a_file,
    "checkpoint-truncated": _generate_from(_truncated_checkpoint),
    "checkpoint-text-file": _generate_from(_text_checkpoint),
    "checkpoint-foreign-dict": _generate_from(_foreign_checkpoint),
    "checkpoint-incomplete": _generate_from(_incomplete_checkpoint),
    "checkpoint-missing": _generate_from(lambda inputs: inputs.root / "missing.pt"),
    "dedup-missing-raw": _dedup_missing_raw,
    "dedup-corrupt-raw": _dedup_corrupt_raw,
    "shard-empty-unique-folder": _shard_from_empty_unique,
    "shard-corrupt-unique": _shard_from_corrupt_unique,
    "train-empty-shards-folder": _train_on(_empty_shards),
    "train-corrupt-shards": _train_on(_corrupt_shards),
    "train-other-schema-version": _train_on(_other_schema_version),
    "train-no-train-split": _train_on(_only_val_images, "split 'train'"),
    "train-unknown-preset": lambda inputs: (["train", "--preset", "huge"], "huge"),
    "evaluate-empty-shards-folder": _evaluate_on(_empty_shards),
    "evaluate-corrupt-shards": _evaluate_on(_corrupt_shards),
    "evaluate-other-schema-version": _evaluate_on(_other_schema_version),
    "storage-unknown-protocol": _data_root("foo://bucket/x"),
    "storage-url-without-bucket": _data_root("memory://"),
    "storage-remote-root": _data_root("memory://bucket/x"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it(
    name: str, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = CASES[name](Inputs(tmp_path, checkpoint))
    capsys.readouterr()  # whatever building the input printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith("carmodels "), err
    assert expected in lines[0], err
    assert "Traceback" not in err
    assert "carmodels download" not in err  # no such command


def test_debug_shows_the_exception(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(MissingInputError, match="nope.csv"):
        main(["--debug", "scrape", "--manifest", missing, "--dry-run"])
    # After the command too: that is where people add it when a command has just failed.
    with pytest.raises(MissingInputError, match="nope.csv"):
        main(["scrape", "--manifest", missing, "--dry-run", "--debug"])
    assert capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(carmodels.dedup, "deduplicate", broken)
    write_raw(tmp_path / "raw", {"https://a.example/1.jpg": jpeg(1)})
    with pytest.raises(KeyError, match="a bug"):
        main(["--data", str(tmp_path), "dedup"])


def _contents(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


def test_failed_shard_leaves_the_previous_shards_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = {f"https://a.example/{k}.jpg": jpeg(k) for k in range(4)}
    photos["https://a.example/tiny.jpg"] = jpeg(9, (40, 30))
    write_raw(tmp_path / "raw", photos)
    data = ["--data", str(tmp_path)]
    assert main([*data, "dedup"]) == 0
    assert main([*data, "shard", "--face", "none", "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "too_small" in out  # the shard stage's rejects, by reason
    shards = tmp_path / "shards"
    before, images = _contents(shards), load_images(shards)

    # Every photo rejected: committing that would leave nothing to train on.
    assert main([*data, "shard", "--face", "none", "--min-side", "100000"]) == 2
    assert "nothing in" in capsys.readouterr().err
    assert _contents(shards) == before

    # A damaged dedup output: refused before a single shard is written.
    (tmp_path / "unique" / "unique.parquet").write_bytes(b"PAR1 cut short")
    assert main([*data, "shard", "--face", "none"]) == 2
    assert "unique.parquet" in capsys.readouterr().err
    assert _contents(shards) == before
    assert torch.equal(load_images(shards), images)


def test_dedup_prints_what_it_could_not_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = {"https://a.example/1.jpg": jpeg(1), "https://a.example/bad.jpg": b"\xff\xd8 no"}
    write_raw(tmp_path / "raw", photos)
    assert main(["--data", str(tmp_path), "dedup"]) == 0
    out = capsys.readouterr().out
    assert "1 undecodable" in out
    assert "decode_error" in out


def test_library_raises_input_errors() -> None:
    # What the Dagster layer relies on: the same errors, as InputError, without the CLI.
    with pytest.raises(InputError, match="Unknown model preset 'huge'"):
        get_preset("huge")
    with pytest.raises(StorageInputError, match="'foo' is not a protocol"):
        StorageRoot.parse("foo://bucket/x")
    with pytest.raises(InputError, match="names no bucket"):
        StorageRoot.parse("memory://")
