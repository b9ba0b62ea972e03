"""Tests for building car shards from the incremental dedup's index over several partitions:
each photo read from its own partition's raw folder (whose shard names repeat in every
partition), the same shards as from deduplicating all the photos in one folder, and bad input.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from carmodels.dedup import PARTITION_COLUMN, DedupConfig, deduplicate, deduplicate_incremental
from carmodels.errors import InputError, MissingInputError
from carmodels.shards import (
    REJECTS_FILE,
    SUMMARY_FILE,
    build_shards,
    data_version_of,
    iter_images,
    load_images,
    shard_files,
    split_row_groups,
)
from tests.test_shards import _config, car_photo, read_shards, write_raw_shard

DEDUP = DedupConfig(workers=1)


def _photos(seeds: range) -> dict[str, bytes | None]:
    return {f"https://cars.example/{k:02d}.jpg": car_photo(k) for k in seeds}


def _smaller(seed: int) -> bytes:
    """A smaller, re-encoded repost of ``car_photo(seed)``: a near duplicate."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(car_photo(seed))).resize((210, 135)).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


@pytest.fixture()
def raw_root(tmp_path: Path) -> Path:
    """``raw/p1`` and ``raw/p2``, each with shards ``raw-00000`` and ``raw-00001`` (the same
    names, other photos): 20 distinct cars, plus in p2 a byte-identical copy of a p1 car and a
    smaller repost of one of its own."""
    raw = tmp_path / "raw"
    write_raw_shard(raw / "p1" / "raw-00000.parquet", _photos(range(0, 6)))
    write_raw_shard(raw / "p1" / "raw-00001.parquet", _photos(range(6, 10)))
    write_raw_shard(
        raw / "p2" / "raw-00000.parquet",
        {
            **_photos(range(10, 16)),
            "https://mirror.example/02-copy.jpg": car_photo(2),
            "https://mirror.example/11-small.jpg": _smaller(11),
        },
    )
    write_raw_shard(raw / "p2" / "raw-00001.parquet", _photos(range(16, 20)))
    return raw


def _partitioned_unique(raw: Path, out: Path) -> pd.DataFrame:
    """Deduplicate p1, then p1 and p2 (a second, incremental run); the kept images."""
    deduplicate_incremental({"p1": raw / "p1"}, out, DEDUP)
    result = deduplicate_incremental({"p1": raw / "p1", "p2": raw / "p2"}, out, DEDUP)
    assert result.partitions_unchanged == ("p1",) and result.partitions_new == ("p2",)
    assert (result.n_input, result.n_kept) == (22, 20)
    return pd.read_parquet(result.unique_path)


def _same_shards(ours: Path, theirs: Path) -> None:
    pd.testing.assert_frame_equal(read_shards(ours), read_shards(theirs))
    pd.testing.assert_frame_equal(
        pd.read_parquet(ours / REJECTS_FILE), pd.read_parquet(theirs / REJECTS_FILE)
    )


def test_every_kept_image_of_both_partitions_is_sharded_once(raw_root: Path, tmp_path: Path):
    unique = _partitioned_unique(raw_root, tmp_path / "unique")
    assert set(unique[PARTITION_COLUMN]) == {"p1", "p2"}
    assert set(unique["raw_shard"]) == {"raw-00000.parquet", "raw-00001.parquet"}

    # The storage layout's raw/ folder, holding raw/<partition>/ (what the CLI passes).
    result = build_shards(tmp_path / "unique", raw_root, tmp_path / "shards", _config())
    table = read_shards(tmp_path / "shards")
    assert result.n_input == result.n_written == len(table) == 20
    assert result.rejects_by_reason == {}
    assert not table["sha256"].duplicated().any()
    assert set(table["sha256"]) == set(unique["sha256"])
    partition_of = unique.set_index("sha256")[PARTITION_COLUMN]
    assert partition_of.loc[table["sha256"]].value_counts().to_dict() == {"p1": 10, "p2": 10}
    # Where a photo was is not listing metadata: the shards have the columns of one folder's.
    assert PARTITION_COLUMN not in table.columns
    assert list(table.columns[-2:]) == ["make", "year"]

    # The partitions as passed to the dedup (a mapping, or folders named by their name) give
    # the same shards.
    for name, raw in {
        "mapping": {"p1": raw_root / "p1", "p2": raw_root / "p2", "unused": tmp_path / "x"},
        "folders": [raw_root / "p2", raw_root / "p1"],
    }.items():
        build_shards(tmp_path / "unique", raw, tmp_path / name, _config())
        _same_shards(tmp_path / name, tmp_path / "shards")


def test_one_run_over_all_partitions_shards_like_deduplicate_of_one_folder(
    raw_root: Path, tmp_path: Path
):
    """One incremental run decides like ``deduplicate`` over every photo (no URL is in two
    partitions); the shards then hold the same rows in the same order, by (url, sha256),
    however the raw shards laid them out."""
    partitions = {"p1": raw_root / "p1", "p2": raw_root / "p2"}
    deduplicate_incremental(partitions, tmp_path / "unique", DEDUP)
    build_shards(tmp_path / "unique", partitions, tmp_path / "shards", _config())

    merged = tmp_path / "merged"
    merged.mkdir()
    for k, shard in enumerate(sorted(raw_root.glob("p*/raw-*.parquet"))):
        shutil.copy(shard, merged / f"raw-{k:05d}.parquet")
    deduplicate(merged, tmp_path / "unique-flat", DEDUP)
    build_shards(tmp_path / "unique-flat", merged, tmp_path / "shards-flat", _config())

    _same_shards(tmp_path / "shards", tmp_path / "shards-flat")
    assert torch.equal(load_images(tmp_path / "shards"), load_images(tmp_path / "shards-flat"))
    # The order: by url (the copy of car 2 in p2 is a dropped duplicate).
    urls = read_shards(tmp_path / "shards")["url"].tolist()
    assert urls == sorted(_photos(range(20)))


def test_each_partition_sharded_on_its_own_reads_as_one_set(raw_root: Path, tmp_path: Path):
    """``build_shards(..., partition=P)`` into ``<shards>/<P>/``: each needs only its own
    raw folder, and the parent folder reads as the union of the partitions' shards."""
    unique = _partitioned_unique(raw_root, tmp_path / "unique")
    shards = tmp_path / "shards"
    away = tmp_path / "away"
    away.mkdir()
    results = {}
    for name, other in (("p1", "p2"), ("p2", "p1")):
        shutil.move(raw_root / other, away / other)  # the other partition's photos are gone
        results[name] = build_shards(
            tmp_path / "unique", raw_root, shards / name, _config(), partition=name
        )
        shutil.move(away / other, raw_root / other)
    kept = unique[PARTITION_COLUMN].value_counts().to_dict()
    for name, result in results.items():
        assert result.n_input == result.n_written == kept[name]
        assert set(read_shards(shards / name)["sha256"]) == set(
            unique.loc[unique[PARTITION_COLUMN] == name, "sha256"]
        )

    # The parent: partitions by name, each as its own folder reads.
    assert shard_files(shards) == shard_files(shards / "p1") + shard_files(shards / "p2")
    together = load_images(shards)
    assert len(together) == 20
    assert torch.equal(
        together, torch.cat([load_images(shards / "p1"), load_images(shards / "p2")])
    )
    assert sum(len(batch) for batch in iter_images(shards, batch_size=7)) == 20
    groups, side = split_row_groups(shards)
    assert sum(g.n_images for g in groups) == 20 and side == (128, 128)
    version = data_version_of(shards)
    assert version not in (data_version_of(shards / "p1"), data_version_of(shards / "p2"))

    # A hidden folder (a build's runs) or one never committed is not a partition's shards.
    for leftover in (shards / ".runs-g0001", shards / "p3"):
        leftover.mkdir()
        shutil.copy(shard_files(shards / "p1")[0], leftover / "car-g0001-00000.parquet")
    assert data_version_of(shards) == version and len(load_images(shards)) == 20
    # Rebuilding one partition in place changes the union's version only through its bytes.
    build_shards(tmp_path / "unique", raw_root, shards / "p1", _config(), partition="p1")
    assert data_version_of(shards) == version


def test_a_parent_folder_without_partition_folders_keeps_its_errors(tmp_path: Path):
    empty = tmp_path / "shards"
    (empty / "p1").mkdir(parents=True)  # a partition folder never committed
    with pytest.raises(MissingInputError, match=r"holds no car-\*\.parquet files"):
        load_images(empty)
    with pytest.raises(MissingInputError, match="No shards at"):
        data_version_of(tmp_path / "nowhere")


# --------------------------------------------------------------------------- bad input


def test_a_partition_is_refused_for_an_index_without_partitions_or_kept_images(
    raw_root: Path, tmp_path: Path
):
    raw = tmp_path / "flat"
    write_raw_shard(raw / "raw-00000.parquet", _photos(range(3)))
    deduplicate(raw, tmp_path / "unique-flat", DEDUP)
    with pytest.raises(InputError) as caught:
        build_shards(
            tmp_path / "unique-flat", raw, tmp_path / "flat-shards", _config(), partition="p1"
        )
    assert "indexes one raw folder" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "flat-shards").exists()

    _partitioned_unique(raw_root, tmp_path / "unique")
    out = tmp_path / "shards" / "p1"
    build_shards(tmp_path / "unique", raw_root, out, _config(), partition="p1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError) as caught:
        build_shards(tmp_path / "unique", raw_root, out, _config(), partition="p3")
    message = str(caught.value)
    assert "Partition 'p3' has no kept images" in message and "p1, p2" in message
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The partition asked for must have its raw folder.
    shutil.rmtree(raw_root / "p1")
    with pytest.raises(MissingInputError, match=r"Partition 'p1' .* has no raw folder"):
        build_shards(tmp_path / "unique", raw_root, out, _config(), partition="p1")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_partition_without_its_raw_folder_is_refused_before_anything_is_written(
    raw_root: Path, tmp_path: Path
):
    _partitioned_unique(raw_root, tmp_path / "unique")
    out = tmp_path / "shards"
    build_shards(tmp_path / "unique", raw_root, out, _config())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    moved = raw_root.parent / "elsewhere"
    shutil.move(raw_root / "p2", moved)
    with pytest.raises(InputError) as caught:
        build_shards(tmp_path / "unique", raw_root, out, _config())
    message = str(caught.value)
    assert isinstance(caught.value, MissingInputError) and "\n" not in message
    assert "Partition 'p2'" in message and str(raw_root / "p2") in message
    assert "pass the partitions' raw folders" in message

    # A mapping that leaves the partition out, or names a folder without raw shards.
    with pytest.raises(InputError, match=r"Partition 'p2' .* not among the partitions given"):
        build_shards(tmp_path / "unique", {"p1": raw_root / "p1"}, out, _config())
    (raw_root / "p2").mkdir()
    with pytest.raises(InputError, match=r"Partition 'p2' .*No raw-\*\.parquet files in .*p2"):
        build_shards(tmp_path / "unique", raw_root, out, _config())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # The fix the first error names: the partition's folder, where it now is.
    partitions = {"p1": raw_root / "p1", "p2": moved}
    assert build_shards(tmp_path / "unique", partitions, out, _config()).n_written == 20


def test_a_lost_raw_shard_of_a_partition_is_a_reject_naming_the_partition(
    raw_root: Path, tmp_path: Path
):
    _partitioned_unique(raw_root, tmp_path / "unique")
    (raw_root / "p2" / "raw-00001.parquet").unlink()
    result = build_shards(tmp_path / "unique", raw_root, tmp_path / "shards", _config())
    assert result.n_written == 16 and result.rejects_by_reason == {"missing_source": 4}
    details = set(pd.read_parquet(tmp_path / "shards" / REJECTS_FILE)["detail"])
    assert details == {
        f"no ok row with this sha256 in raw-00001.parquet of partition 'p2' ({raw_root / 'p2'})"
    }


def test_partitions_are_refused_for_the_index_of_one_raw_folder(tmp_path: Path):
    raw = tmp_path / "raw"
    write_raw_shard(raw / "raw-00000.parquet", _photos(range(3)))
    deduplicate(raw, tmp_path / "unique", DEDUP)
    with pytest.raises(InputError, match="indexes one raw folder.*pass that folder"):
        build_shards(tmp_path / "unique", {"raw": raw}, tmp_path / "shards", _config())
    assert not (tmp_path / "shards").exists()


def test_a_listing_column_named_partition_of_one_folder_stays_listing_metadata(tmp_path: Path):
    """``deduplicate`` passes a manifest's ``partition`` column through; without the
    incremental record beside the index, one folder is read as ever and the column is kept."""
    raw = tmp_path / "raw"
    shard = raw / "raw-00000.parquet"
    write_raw_shard(shard, _photos(range(3)))
    table = pq.read_table(shard)
    pq.write_table(table.append_column(PARTITION_COLUMN, pa.array(["north"] * 3)), shard)
    deduplicate(raw, tmp_path / "unique", DEDUP)
    result = build_shards(tmp_path / "unique", raw, tmp_path / "shards", _config())
    assert result.n_written == 3 and (tmp_path / "shards" / SUMMARY_FILE).exists()
    assert set(read_shards(tmp_path / "shards")[PARTITION_COLUMN]) == {"north"}


def test_the_cli_builds_one_partition_into_its_own_folder(
    raw_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from carmodels.cli import main

    data = tmp_path
    kept = _partitioned_unique(raw_root, data / "unique")
    assert main(["--data", str(data), "shard", "--partition", "p2", "--min-side", "16"]) == 0
    rows = read_shards(data / "shards" / "p2")
    assert set(rows["url"]) == set(kept.loc[kept[PARTITION_COLUMN] == "p2", "url"])
    assert f"-> {data / 'shards' / 'p2'}" in capsys.readouterr().out
