"""Tests for carmodels.dedup's incremental dedup across partitions: the search of new photos
against kept ones, the equivalence with deduplicating everything at once (and its documented
differences), what a run re-does, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from carmodels.dedup import (
    PARTITION_COLUMN,
    RECORD_FILE,
    DedupConfig,
    IncrementalDedupResult,
    SearchStats,
    deduplicate,
    deduplicate_incremental,
    find_near_duplicates_between,
    incremental,
    stage,
)
from carmodels.dedup.cluster import _cluster
from carmodels.dedup.record import MEMBER_COLUMNS, empty_members
from carmodels.dedup.search import search_masks
from carmodels.dedup.stage import _near_pairs
from carmodels.errors import InputError, MissingInputError, ShardsError
from tests.test_dedup import jpeg, photo, write_raw_shard

CONFIG = DedupConfig(workers=1)
BIG = photo(1, (360, 240))


def _partition(root: Path, name: str, rows: list[dict], shard: int = 0) -> Path:
    write_raw_shard(root / "raw" / name / f"raw-{shard:05d}.parquet", rows)
    return root / "raw" / name


@pytest.fixture()
def parts(tmp_path: Path) -> dict[str, Path]:
    """Three partitions whose duplicates either stay inside one partition or tie a new photo
    directly to an earlier kept one that is also the best of its cluster: the data on which
    incremental and all-at-once dedup must agree exactly."""
    nine = photo(9, (300, 200))
    return {
        "p1": _partition(
            tmp_path,
            "p1",
            [
                {"url": "https://a.example/big.jpg", "data": jpeg(BIG)},
                {"url": "https://b.example/small.jpg", "data": jpeg(BIG.resize((240, 160)), 60)},
                {"url": "https://c.example/copy.jpg", "data": jpeg(BIG)},
                {"url": "https://d.example/mirror.jpg", "data": jpeg(BIG.transpose(0))},
                {"url": "https://e.example/other.jpg", "data": jpeg(photo(2))},
                {"url": "https://e.example/broken.jpg", "data": b"\xff\xd8 not a jpeg"},
            ],
        ),
        "p2": _partition(
            tmp_path,
            "p2",
            [
                {"url": "https://f.example/nine.jpg", "data": jpeg(nine)},
                {"url": "https://f.example/nine-small.jpg", "data": jpeg(nine.resize((150, 100)))},
                # A smaller repost of p1's kept photo: joins its cluster, as at once.
                {"url": "https://f.example/repost.jpg", "data": jpeg(BIG.resize((300, 200)), 70)},
                {"url": "https://f.example/ten.jpg", "data": jpeg(photo(10))},
            ],
        ),
        "p3": _partition(
            tmp_path,
            "p3",
            [
                {"url": "https://g.example/eleven.jpg", "data": jpeg(photo(11))},
                {"url": "https://g.example/twelve.jpg", "data": jpeg(photo(12))},
                # Byte-identical to p1's other.jpg: an exact duplicate across partitions.
                {"url": "https://g.example/other-again.jpg", "data": jpeg(photo(2))},
                {"url": "https://g.example/dead.jpg", "data": None},
            ],
        ),
    }


def _all_at_once(
    tmp_path: Path, dirs: list[Path], name: str, config: DedupConfig = CONFIG
) -> stage.DedupResult:
    """``deduplicate`` over one folder holding every shard of ``dirs``."""
    merged = tmp_path / f"merged-{name}"
    merged.mkdir()
    shards = sorted(p for d in dirs for p in d.glob("raw-*.parquet"))
    for k, shard in enumerate(shards):
        shutil.copy(shard, merged / f"raw-{k:05d}.parquet")
    return deduplicate(merged, tmp_path / f"at-once-{name}", config)


def _assert_same(incremental_result: stage.DedupResult, at_once: stage.DedupResult) -> None:
    """Same result, row for row, but for where the photos sit (shard names and partitions)."""
    for field in (
        "n_input",
        "n_kept",
        "n_exact_duplicates",
        "n_near_duplicates",
        "n_clusters",
        "cluster_size_histogram",
        "n_undecodable",
        "undecodable_by_reason",
    ):
        assert getattr(incremental_result, field) == getattr(at_once, field), field
    ours = pd.read_parquet(incremental_result.unique_path)
    assert list(ours[PARTITION_COLUMN].unique())  # every kept image names its partition
    pd.testing.assert_frame_equal(
        ours.drop(columns=["raw_shard", PARTITION_COLUMN]),
        pd.read_parquet(at_once.unique_path).drop(columns=["raw_shard"]),
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(incremental_result.clusters_path), pd.read_parquet(at_once.clusters_path)
    )


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --------------------------------------------------------------------------- the search


@pytest.mark.parametrize("threshold", [0, 4, 10])
@pytest.mark.parametrize("flip", [False, True])
def test_search_between_equals_brute_force_and_checks_only_cross_pairs(threshold, flip):
    rng = np.random.default_rng(threshold + 100 * flip)
    n_known, n_new = 600, 80
    known = rng.integers(0, 2**64, size=n_known, dtype=np.uint64)
    new = rng.integers(0, 2**64, size=n_new, dtype=np.uint64)
    for k in range(120):  # new hashes near known ones, at every distance up to threshold + 2
        bits = rng.choice(64, size=k % (threshold + 3), replace=False)
        new[rng.integers(n_new)] = known[rng.integers(n_known)] ^ np.uint64(
            sum(1 << int(b) for b in bits)
        )
    known[:40] = known[40:80]  # pairs inside one side must never be reported
    known_flipped = new_flipped = None
    if flip:
        known_flipped = rng.integers(0, 2**64, size=n_known, dtype=np.uint64)
        new_flipped = rng.integers(0, 2**64, size=n_new, dtype=np.uint64)
        new_flipped[:20] = known[100:120] ^ np.uint64(1)  # mirrored copies
        known_flipped[200:220] = new[20:40] ^ np.uint64(2)
    stats = SearchStats()
    found = find_near_duplicates_between(
        known, new, threshold, known_flipped, new_flipped, stats=stats
    )

    distance = np.bitwise_count(known[:, None] ^ new[None, :]).astype(int)
    if flip:
        distance = np.minimum(distance, np.bitwise_count(known_flipped[:, None] ^ new[None, :]))
        distance = np.minimum(distance, np.bitwise_count(known[:, None] ^ new_flipped[None, :]))
    i, j = np.nonzero(distance <= threshold)
    expected = set(zip(i.tolist(), j.tolist(), distance[i, j].tolist(), strict=True))
    assert set(map(tuple, found[["i", "j", "distance"]].to_numpy().tolist())) == expected
    assert len(expected) >= 10
    # The candidates are exactly the (known, new) pairs that agree on a table's mask, per
    # orientation: never two known hashes (nor two new ones) against each other.
    masks = search_masks(threshold, 64, n_known + n_new, n_known * n_new)
    sides = [(known, new)]
    if flip:
        sides += [(known_flipped, new), (known, new_flipped)]
    expected_candidates = sum(
        int(((left[:, None] & np.uint64(m)) == (right[None, :] & np.uint64(m))).sum())
        for left, right in sides
        for m in masks
    )
    assert stats.candidates == expected_candidates
    assert stats.tables == len(sides) * len(masks)


# --------------------------------------------------------------------------- equivalence


def test_all_partitions_in_one_run_equal_deduplicate(parts, tmp_path: Path):
    result = deduplicate_incremental(parts, tmp_path / "unique", CONFIG)
    assert isinstance(result, IncrementalDedupResult)
    assert result.partitions_new == ("p1", "p2", "p3")
    assert result.fresh_start == "no earlier record"
    _assert_same(result, _all_at_once(tmp_path, list(parts.values()), "all"))


def test_partition_by_partition_equals_all_at_once_without_cross_run_chains(parts, tmp_path: Path):
    out = tmp_path / "unique"
    names = list(parts)
    for k in range(1, len(names) + 1):
        passed = {name: parts[name] for name in names[:k]}
        result = deduplicate_incremental(passed, out, CONFIG)
        assert result.partitions_new == (names[k - 1],)
        assert result.partitions_unchanged == tuple(names[: k - 1])
        _assert_same(result, _all_at_once(tmp_path, list(passed.values()), str(k)))
    unique = pd.read_parquet(result.unique_path).set_index("url")
    assert unique.loc["https://a.example/big.jpg", "cluster_size"] == 5  # the p2 repost joined
    assert unique.loc["https://e.example/other.jpg", "cluster_size"] == 2  # the p3 exact copy
    assert unique.loc["https://f.example/nine.jpg", PARTITION_COLUMN] == "p2"


def test_a_second_run_hashes_and_searches_only_the_new_partition(
    parts, tmp_path: Path, monkeypatch
):
    out = tmp_path / "unique"
    first = deduplicate_incremental({"p1": parts["p1"]}, out, CONFIG)
    assert first.n_hashed == 5  # p1's distinct photos (the exact copy once, the broken one too)

    within, between = [], []
    real_within, real_between = stage.find_near_duplicates, incremental.find_near_duplicates_between
    monkeypatch.setattr(
        stage,
        "find_near_duplicates",
        lambda hashes, *a, **k: within.append(len(hashes)) or real_within(hashes, *a, **k),
    )
    monkeypatch.setattr(
        incremental,
        "find_near_duplicates_between",
        lambda known, new, *a, **k: (
            between.append((len(known), len(new))) or real_between(known, new, *a, **k)
        ),
    )
    progress: list[tuple[int, int]] = []
    second = deduplicate_incremental(
        {"p1": parts["p1"], "p2": parts["p2"]},
        out,
        CONFIG,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    # Hashed: p2's four photos only; p1's come from the record and the cache.
    assert second.n_hashed == 4 and progress[-1] == (4, 4)
    # Searched: p2's photos against each other, and against p1's kept images; never p1's
    # photos against each other, nor its dropped ones against anything.
    assert second.n_decided == second.n_searched_new == 4
    assert second.n_searched_kept == first.n_kept == 2 < first.n_input
    assert within == [4]
    assert between == [(2, 4)]
    assert second.search_candidates > 0

    within.clear(), between.clear()
    third = deduplicate_incremental({"p1": parts["p1"], "p2": parts["p2"]}, out, CONFIG)
    assert (third.n_hashed, third.n_decided, third.search_candidates) == (0, 0, 0)
    assert within == [] and between == []
    assert third.partitions_unchanged == ("p1", "p2")
    assert pd.read_parquet(third.unique_path).equals(pd.read_parquet(second.unique_path))


# --------------------------------------------------------------------------- the differences


def test_an_image_kept_earlier_stays_kept_when_a_better_copy_arrives(tmp_path: Path):
    small = {"url": "https://a.example/small.jpg", "data": jpeg(BIG.resize((240, 160)), 60)}
    big = {"url": "https://b.example/big.jpg", "data": jpeg(BIG)}
    other = {"url": "https://c.example/other.jpg", "data": jpeg(photo(2))}
    early = _partition(tmp_path, "early", [small, other])
    late = _partition(tmp_path, "late", [big])
    out = tmp_path / "unique"
    deduplicate_incremental([early], out, CONFIG)
    result = deduplicate_incremental([early, late], out, CONFIG)
    kept = set(pd.read_parquet(result.unique_path)["url"])
    assert kept == {small["url"], other["url"]}  # no churn: the small copy stays the kept one
    at_once = _all_at_once(tmp_path, [early, late], "better")
    assert set(pd.read_parquet(at_once.unique_path)["url"]) == {big["url"], other["url"]}
    assert result.n_kept == at_once.n_kept and result.n_clusters == at_once.n_clusters


def _synthetic(rng: np.random.Generator, n_centres: int = 30, chain: int = 8) -> pd.DataFrame:
    """Hash-only images (no photos): chains of hashes a few bits apart around random centres,
    so that clusters are transitive chains, not cliques; ``verify_colour`` off."""
    hashes = []
    for _ in range(n_centres):
        value = int(rng.integers(0, 2**64, dtype=np.uint64))
        for _ in range(int(rng.integers(1, chain + 1))):
            hashes.append(value)
            for bit in rng.choice(64, size=int(rng.integers(0, 8)), replace=False):
                value ^= 1 << int(bit)
    n = len(hashes)
    frame = pd.DataFrame(
        {
            PARTITION_COLUMN: "p",
            "url": [f"https://x.example/{k:04d}.jpg" for k in rng.permutation(n)],
            "sha256": [f"{k:064x}" for k in range(n)],
            "hash": np.array(hashes, dtype=np.uint64),
            "hash_flipped": rng.integers(0, 2**64, size=n, dtype=np.uint64),
            "pixels": rng.integers(1, 4, size=n) * 1000,
            "n_bytes": rng.integers(1000, 2000, size=n),
        }
    )
    frame["image_id"] = np.arange(n)
    return frame


def _decide_in_batches(frame: pd.DataFrame, batches: np.ndarray, config: DedupConfig):
    """Run ``_place`` batch after batch as the stage does; the kept ids per run."""
    survivors = empty_members().drop(columns=["width", "height"])
    history = []
    for b in np.unique(batches):
        batch = frame[batches == b].sort_values("url").reset_index(drop=True)
        kept = survivors[survivors["image_id"] == survivors["kept_id"]]
        batch["kept_id"] = incremental._place(batch, kept, survivors, config, SearchStats())
        survivors = pd.concat([survivors, batch], ignore_index=True).astype({"kept_id": np.int64})
        history.append(survivors.set_index("image_id")["kept_id"])
    return history


def _at_once_labels(frame: pd.DataFrame, config: DedupConfig) -> pd.Series:
    ordered = frame.sort_values("url").reset_index(drop=True)
    labels, kept = _cluster(ordered, _near_pairs(ordered, config))
    return pd.Series(labels, index=ordered["image_id"]), set(ordered["image_id"][kept])


def _distances(frame: pd.DataFrame, ids: list[int]) -> np.ndarray:
    rows = frame.set_index("image_id").loc[ids]
    h, f = rows["hash"].to_numpy(np.uint64), rows["hash_flipped"].to_numpy(np.uint64)
    d = np.bitwise_count(h[:, None] ^ h[None, :]).astype(int)
    cross = np.bitwise_count(h[:, None] ^ f[None, :]).astype(int)
    return np.minimum(d, np.minimum(cross, cross.T))


@pytest.mark.parametrize("seed", range(6))
def test_incremental_decisions_keep_the_guarantees_on_chained_clusters(seed: int):
    """The documented guarantees, on random chained clusters split at random into runs: no
    two kept images within the threshold, kept images stay kept, every incremental cluster
    inside one all-at-once cluster (so never fewer kept), and equality when each all-at-once
    cluster falls within one run."""
    config = DedupConfig(workers=1, verify_colour=False)
    rng = np.random.default_rng(seed)
    frame = _synthetic(rng)
    labels, kept_at_once = _at_once_labels(frame, config)
    assert labels.value_counts().max() >= 3  # the data has chained clusters

    history = _decide_in_batches(frame, rng.integers(0, 3, size=len(frame)), config)
    kept_before: set[int] = set()
    for kept_id in history:
        kept_now = set(kept_id[kept_id.index == kept_id.to_numpy()].index)
        assert kept_before <= kept_now  # an image kept earlier stays kept
        kept_before = kept_now
    final = history[-1]
    kept_ids = sorted(kept_before)
    distance = _distances(frame, kept_ids)
    np.fill_diagonal(distance, 64)
    assert distance.min() > config.threshold  # no two kept images are duplicates
    # Refinement: each incremental cluster lies in one all-at-once cluster.
    assert (labels.loc[final.index].groupby(final.to_numpy()).nunique() == 1).all()
    assert len(kept_ids) >= len(kept_at_once)

    # Runs that never split an all-at-once cluster: exactly the all-at-once result.
    aligned = labels.loc[frame["image_id"]].to_numpy() % 3
    final = _decide_in_batches(frame, aligned, config)[-1]
    assert set(final[final.index == final.to_numpy()].index) == kept_at_once
    pairs = pd.DataFrame({"ours": final, "theirs": labels.loc[final.index]})
    assert (pairs.groupby("ours")["theirs"].nunique() == 1).all()
    assert (pairs.groupby("theirs")["ours"].nunique() == 1).all()


def _line(values: list[int]) -> pd.DataFrame:
    """Hash-only images in URL order with the given hashes (mirror hashes far from all)."""
    n = len(values)
    return pd.DataFrame(
        {
            PARTITION_COLUMN: "p",
            "url": [f"https://x.example/{k}.jpg" for k in range(n)],
            "sha256": [f"{k:064x}" for k in range(n)],
            "hash": np.array(values, dtype=np.uint64),
            # Mirror hashes 32+ bits from every hash: no pair through a mirror image.
            "hash_flipped": np.array([(0xFFFFFFFF << 32) | (k << 20) for k in range(n)], np.uint64),
            "pixels": 1000,
            "n_bytes": 1000,
            "image_id": np.arange(n),
        }
    )


def test_a_new_photo_between_two_kept_ones_joins_one_cluster_without_merging_them():
    """Difference 2: A and B (16 bits apart) were kept by an earlier run; C, 8 bits from each,
    arrives. At once, A, B and C are one cluster keeping one image; incrementally A and B stay
    kept and C joins the closer (ties: the smaller URL)."""
    config = DedupConfig(workers=1, verify_colour=False)
    a, b = 0, (1 << 16) - 1
    frame = _line([a, b, (1 << 8) - 1])
    labels, kept_at_once = _at_once_labels(frame, config)
    assert labels.nunique() == 1 and len(kept_at_once) == 1
    final = _decide_in_batches(frame, np.array([0, 0, 1]), config)[-1]
    assert final.to_dict() == {0: 0, 1: 1, 2: 0}


def test_a_new_photo_near_only_a_dropped_one_is_kept():
    """Difference 3: B was dropped as a near duplicate of A; C is within the threshold of B
    but not of A. At once, the chain A-B-C is one cluster; incrementally C is kept."""
    config = DedupConfig(workers=1, verify_colour=False)
    a, b, c = 0, (1 << 8) - 1, (1 << 16) - 1
    frame = _line([a, b, c])
    final = _decide_in_batches(frame, np.array([0, 0, 1]), config)[-1]
    assert final.to_dict() == {0: 0, 1: 0, 2: 2}
    labels, _ = _at_once_labels(frame, config)
    assert labels.nunique() == 1


# --------------------------------------------------------------------------- changes


def test_a_removed_partition_leaves_and_its_duplicates_are_decided_again(parts, tmp_path: Path):
    out = tmp_path / "unique"
    deduplicate_incremental({"p1": parts["p1"], "p2": parts["p2"]}, out, CONFIG)
    result = deduplicate_incremental({"p2": parts["p2"]}, out, CONFIG)
    assert result.partitions_removed == ("p1",)
    assert result.n_hashed == 0
    # p2's repost had been dropped for p1's big.jpg; with p1 gone it is decided again (kept).
    assert result.n_redecided == 1 and result.n_decided == 1
    unique = pd.read_parquet(result.unique_path)
    assert set(unique[PARTITION_COLUMN]) == {"p2"}
    assert "https://f.example/repost.jpg" in set(unique["url"])
    _assert_same(result, _all_at_once(tmp_path, [parts["p2"]], "p2"))


def test_a_changed_partition_is_redone_and_only_its_new_photos_hashed(parts, tmp_path: Path):
    out = tmp_path / "unique"
    deduplicate_incremental(parts, out, CONFIG)
    # p2's downloads grew by a shard: a new photo and a copy of p3's eleven.jpg.
    write_raw_shard(
        parts["p2"] / "raw-00001.parquet",
        [
            {"url": "https://f.example/thirteen.jpg", "data": jpeg(photo(13))},
            # Sorts after p3's copy, which is kept at once too (so no better copy arrives).
            {"url": "https://h.example/eleven.jpg", "data": jpeg(photo(11))},
        ],
    )
    result = deduplicate_incremental(parts, out, CONFIG)
    assert result.partitions_changed == ("p2",)
    assert result.partitions_unchanged == ("p1", "p3")
    assert result.n_hashed == 1  # eleven.jpg's bytes were hashed already (p3)
    _assert_same(result, _all_at_once(tmp_path, list(parts.values()), "changed"))
    # A new copy of the same bytes (new modification times) is no change.
    for shard in parts["p3"].glob("raw-*.parquet"):
        shard.write_bytes(shard.read_bytes())
    again = deduplicate_incremental(parts, out, CONFIG)
    assert again.partitions_unchanged == ("p1", "p2", "p3") and again.n_decided == 0


def test_changed_settings_redecide_everything_from_the_cache(parts, tmp_path: Path):
    out = tmp_path / "unique"
    deduplicate_incremental({"p1": parts["p1"]}, out, CONFIG)
    looser = DedupConfig(workers=1, threshold=12)
    result = deduplicate_incremental(parts, out, looser)
    assert result.fresh_start == "the hash or duplicate settings changed since the last run"
    assert result.partitions_new == ("p1", "p2", "p3")
    assert result.n_hashed == 6  # p2's and p3's photos only: p1's are in the cache
    _assert_same(result, _all_at_once(tmp_path, list(parts.values()), "looser", looser))


# --------------------------------------------------------------------------- bad input, crashes


def test_bad_partitions_are_refused_before_anything_is_written(parts, tmp_path: Path):
    out = tmp_path / "unique"
    deduplicate_incremental({"p1": parts["p1"]}, out, CONFIG)
    before = _snapshot(out)

    with pytest.raises(MissingInputError, match=r"nowhere.*carmodels scrape"):
        deduplicate_incremental({"p1": parts["p1"], "p9": tmp_path / "nowhere"}, out, CONFIG)
    (parts["p2"] / "raw-00001.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(ShardsError, match=r"raw-00001\.parquet.*carmodels scrape"):
        deduplicate_incremental({"p1": parts["p1"], "p2": parts["p2"]}, out, CONFIG)
    with pytest.raises(InputError, match="both be partition 'p1'"):
        deduplicate_incremental([parts["p1"], tmp_path / "elsewhere" / "p1"], out, CONFIG)
    with pytest.raises(InputError, match="No partitions given"):
        deduplicate_incremental([], out, CONFIG)
    with pytest.raises(InputError, match="single path"):
        deduplicate_incremental(str(parts["p1"]), out, CONFIG)
    assert _snapshot(out) == before


def test_partitions_without_an_ok_image_are_refused(tmp_path: Path):
    dead = _partition(tmp_path, "dead", [{"url": "https://a.example/x.jpg", "data": None}])
    with pytest.raises(InputError, match="no successfully fetched image"):
        deduplicate_incremental([dead], tmp_path / "unique", CONFIG)
    assert not (tmp_path / "unique" / "unique.parquet").exists()


def test_a_run_that_fails_while_writing_leaves_the_record_usable(
    parts, tmp_path: Path, monkeypatch
):
    out = tmp_path / "unique"
    deduplicate_incremental({"p1": parts["p1"]}, out, CONFIG)
    record_before = (out / RECORD_FILE).read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(incremental, "_write_outputs", crash)
    with pytest.raises(OSError, match="disk full"):
        deduplicate_incremental(parts, out, CONFIG)
    assert (out / RECORD_FILE).read_text() == record_before  # not committed
    assert (out / json.loads(record_before)["members"]).exists()
    monkeypatch.undo()

    result = deduplicate_incremental(parts, out, CONFIG)
    assert result.fresh_start is None and result.partitions_new == ("p2", "p3")
    assert sorted(p.name for p in out.glob("members-*.parquet")) == ["members-00002.parquet"]
    _assert_same(result, _all_at_once(tmp_path, list(parts.values()), "after-crash"))


def test_a_damaged_record_starts_afresh(parts, tmp_path: Path):
    out = tmp_path / "unique"
    deduplicate_incremental({"p1": parts["p1"]}, out, CONFIG)
    (out / RECORD_FILE).write_text("{ not json")
    result = deduplicate_incremental(parts, out, CONFIG)
    assert result.fresh_start is not None and "cannot be read" in result.fresh_start
    assert result.n_hashed == 6
    _assert_same(result, _all_at_once(tmp_path, list(parts.values()), "damaged"))


def test_the_members_file_records_every_decodable_image(parts, tmp_path: Path):
    out = tmp_path / "unique"
    result = deduplicate_incremental(parts, out, CONFIG)
    record = json.loads((out / RECORD_FILE).read_text())
    members = pd.read_parquet(out / record["members"])
    assert list(members.columns[: len(MEMBER_COLUMNS)]) == list(MEMBER_COLUMNS)
    assert len(members) == result.n_input - result.n_undecodable
    assert record["partitions"]["p1"]["undecodable_by_reason"] == {"decode_error": 1}
    assert record["partitions"]["p3"]["n_input"] == 3


def test_listing_columns_follow_the_partitions_passed(parts, tmp_path: Path):
    extra = _partition(tmp_path, "extra", [{"url": "https://h.example/x.jpg", "data": jpeg(BIG)}])
    shard = extra / "raw-00000.parquet"
    table = pq.read_table(shard)
    table = table.append_column("model", pa.array(["A4"])).append_column(
        PARTITION_COLUMN, pa.array(["from the manifest"])
    )
    pq.write_table(table, shard)
    out = tmp_path / "unique"
    both = deduplicate_incremental({"p2": parts["p2"], "extra": extra}, out, CONFIG)
    unique = pd.read_parquet(both.unique_path).set_index("url")
    # A listing column named like the partition column keeps its values under another name.
    assert unique.loc["https://h.example/x.jpg", "manifest_partition"] == "from the manifest"
    assert unique.loc["https://h.example/x.jpg", PARTITION_COLUMN] == "extra"
    assert unique.loc["https://h.example/x.jpg", "model"] == "A4"
    assert pd.isna(unique.loc["https://f.example/nine.jpg", "model"])
    alone = deduplicate_incremental({"p2": parts["p2"]}, out, CONFIG)
    columns = set(pd.read_parquet(alone.unique_path).columns)
    assert "make" in columns and not {"model", "manifest_partition"} & columns
