"""Tests for carmodels.dedup: hash search, clustering, outputs and incremental runs."""

from __future__ import annotations

import hashlib
import io
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from carmodels.dedup import (
    HASHES_FILE,
    DedupConfig,
    SearchStats,
    colour_distances,
    colour_thumbnails,
    contact_sheet,
    deduplicate,
    find_near_duplicates,
    hash_to_hex,
    image_hashes,
    phash_batch,
    phash_distance,
    phash_pair,
    phash_pixels,
    search,
    search_masks,
)
from carmodels.dedup.search import _covering_masks, _plan_masks, _within_threshold
from carmodels.demo import build_catalog
from carmodels.demo.drawing import draw_car
from carmodels.errors import InputError, MissingInputError, ShardsError

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def photo(seed: int, size: tuple[int, int] = (240, 160)) -> Image.Image:
    """A smooth random picture: distinct seeds give unrelated perceptual hashes."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_raw_shard(path: Path, rows: list[dict]) -> Path:
    """A raw shard as the scraper writes it (only the columns dedup reads matter)."""
    columns: dict[str, list] = {
        name: []
        for name in (
            "url",
            "status",
            "outcome",
            "content_type",
            "image_bytes",
            "sha256",
            "width",
            "height",
            "fetched_at",
            "make",
        )
    }
    for k, row in enumerate(rows):
        data = row.get("data")
        ok = data is not None
        columns["url"].append(row["url"])
        columns["status"].append(200 if ok else 404)
        columns["outcome"].append("ok" if ok else "http_404")
        columns["content_type"].append("image/jpeg" if ok else None)
        columns["image_bytes"].append(data)
        columns["sha256"].append(hashlib.sha256(data).hexdigest() if ok else None)
        columns["width"].append(None)
        columns["height"].append(None)
        columns["fetched_at"].append(row.get("fetched_at", T0 + timedelta(seconds=k)))
        columns["make"].append(row.get("make", "Audi"))
    schema = pa.schema(
        [
            ("url", pa.string()),
            ("status", pa.int32()),
            ("outcome", pa.string()),
            ("content_type", pa.string()),
            ("image_bytes", pa.binary()),
            ("sha256", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("fetched_at", pa.timestamp("us", tz="UTC")),
            ("make", pa.string()),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def brute_force_pairs(hashes: np.ndarray, threshold: int, flipped: np.ndarray | None):
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :]).astype(int)
    if flipped is not None:
        cross = np.bitwise_count(hashes[:, None] ^ flipped[None, :]).astype(int)
        distance = np.minimum(distance, np.minimum(cross, cross.T))
    i, j = np.triu_indices(len(hashes), 1)
    close = distance[i, j] <= threshold
    return {
        (int(a), int(b), int(d))
        for a, b, d in zip(i[close], j[close], distance[i, j][close], strict=True)
    }


def test_phash_distance():
    assert phash_distance(0, 0) == 0
    assert phash_distance(0b1011, 0b0001) == 2
    assert phash_distance(0, 2**64 - 1) == 64
    assert hash_to_hex(255) == "00000000000000ff"


@pytest.mark.parametrize("hash_size", [4, 8])
def test_phash_is_imagehash_bit_for_bit(hash_size: int):
    """The batched phash (and its mirror from the sign-flipped DCT) equals imagehash's phash of
    the same grey square (imagehash leaves a square of the right size as it is)."""
    import imagehash

    def reference(img: Image.Image) -> int:
        bits = np.asarray(imagehash.phash(img, hash_size).hash).ravel()
        return int("".join("1" if b else "0" for b in bits), 2)

    images = [photo(seed, (200 + 7 * seed, 130 + 3 * seed)) for seed in range(20)]
    images.append(studio_car("grey"))
    squares = np.stack([phash_pixels(np.asarray(img), hash_size) for img in images])
    assert squares.shape == (len(images), 4 * hash_size, 4 * hash_size)
    hashes, flipped = phash_batch(squares)
    for img, square, value, mirror_value in zip(images, squares, hashes, flipped, strict=True):
        assert int(value) == reference(Image.fromarray(square))
        assert int(mirror_value) == reference(ImageOps.mirror(Image.fromarray(square)))
        assert phash_pair(np.asarray(img), hash_size) == (int(value), int(mirror_value))


def test_phash_pixels_are_imagehashs_resize_within_a_grey_level_or_two():
    """Pillow rounds between its two resampling passes; the float version does not."""
    for seed in range(8):
        img = photo(seed, (230 + 9 * seed, 140 + 5 * seed))
        box = (0.0, 0.0, img.width - 0.25 * (seed % 4), img.height - 0.5 * (seed % 2))
        pillow = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, box=box)
        ours = phash_pixels(np.asarray(img), 8, box)
        assert np.abs(ours.astype(int) - np.asarray(pillow)).max() <= 2


def test_phash_of_a_mirrored_photo_is_its_flipped_hash():
    """Mirroring the pixels and the box mirrors the grey square exactly, so a mirrored repost
    hashes to the flipped hash the flip-aware search compares with, however the draft's
    padding column falls (right of the photo, or left of its mirror image)."""
    for seed in range(12):
        pixels = np.asarray(photo(seed, (301 + 10 * seed, 170)))
        width, height = pixels.shape[1], pixels.shape[0]
        box = (0.0, 0.0, width - 0.75, height - 0.5)  # the photo inside a JPEG draft
        mirror_box = (0.75, 0.0, float(width), height - 0.5)
        value, flipped = phash_pair(pixels, 8, box)
        assert phash_pair(np.ascontiguousarray(pixels[:, ::-1]), 8, mirror_box) == (
            flipped,
            value,
        )


def test_colour_thumbnails_average_the_cells_and_cut_the_crops():
    grid, crops = 4, (0.0, 0.125)
    # 64 x 64, one colour per 16 px square: each full-frame cell is one square exactly.
    squares = np.arange(16 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    pixels = np.repeat(np.repeat(squares, 16, axis=0), 16, axis=1)
    thumbs = colour_thumbnails(pixels, grid, crops)
    assert thumbs.shape == (2, grid, grid, 3) and thumbs.dtype == np.uint8
    np.testing.assert_array_equal(thumbs[0], squares)
    # Cutting 1/8 a side leaves 48 px, 12 per cell: the outer cells take 8 px of the outer
    # square and 4 of the next, the inner ones lie within one square.
    weights = np.array([[8, 4, 0, 0], [0, 12, 0, 0], [0, 0, 12, 0], [0, 0, 4, 8]]) / 12
    expected = np.einsum("ab,bcz,dc->adz", weights, squares.astype(float), weights)
    assert np.abs(thumbs[1].astype(float) - expected).max() <= 0.5 + 1e-9
    # The mirror image's thumbnails are the thumbnails mirrored (the pipeline relies on it).
    mirrored = colour_thumbnails(np.ascontiguousarray(pixels[:, ::-1]), grid, crops)
    np.testing.assert_array_equal(mirrored, thumbs[:, :, ::-1])


@pytest.mark.parametrize("threshold", [0, 3, 6, 10])
@pytest.mark.parametrize("flip", [False, True])
def test_multi_index_search_equals_brute_force(threshold: int, flip: bool):
    rng = np.random.default_rng(threshold)
    n = 400
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    # Plant neighbours at every distance up to threshold + 2 (some inside, some just outside).
    for k in range(60):
        source = hashes[rng.integers(n)]
        bits = rng.choice(64, size=k % (threshold + 3), replace=False)
        hashes[rng.integers(n)] = source ^ np.uint64(sum(1 << int(b) for b in bits))
    flipped = rng.integers(0, 2**64, size=n, dtype=np.uint64) if flip else None
    if flip:  # plant mirror-image neighbours too
        for k in range(30):
            flipped[k] = hashes[n - 1 - k] ^ np.uint64(1 << k)
    found = find_near_duplicates(hashes, threshold, flipped)
    got = set(map(tuple, found[["i", "j", "distance"]].to_numpy().tolist()))
    expected = brute_force_pairs(hashes, threshold, flipped)
    assert got == expected
    assert len(expected) > 0


@pytest.mark.parametrize("threshold", [0, 1, 3, 5])
def test_every_search_plan_covers_every_close_pair(threshold: int):
    """Exhaustively on 16-bit hashes: for any set of <= threshold differing bits, some table
    of every plan (1 part, Pagh's covering, up to threshold + 1 parts, classic multi-index
    hashing) ignores all of them, so no close pair can be missed."""
    bits = 16
    for n_parts in range(1, threshold + 2):
        masks = _plan_masks(threshold, bits, n_parts)
        assert masks is not None
        for size in range(threshold + 1):
            for differing in itertools.combinations(range(bits), size):
                diff = sum(1 << b for b in differing)
                assert any(mask & diff == 0 for mask in masks), (n_parts, differing)


@pytest.mark.parametrize("n_parts", [1, 2, 3, 6, 11])
def test_each_search_plan_equals_brute_force(n_parts: int):
    rng = np.random.default_rng(n_parts)
    n, threshold = 500, 10
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for k in range(150):  # neighbours at every distance up to threshold + 2
        bits = rng.choice(64, size=k % (threshold + 3), replace=False)
        hashes[rng.integers(n)] = hashes[rng.integers(n)] ^ np.uint64(
            sum(1 << int(b) for b in bits)
        )
    masks = _plan_masks(threshold, 64, n_parts) if n_parts > 1 else None
    if n_parts == 1:  # one part needs 2047 tables: too many for the planner, fine for a test
        masks = _covering_masks(0, 64, threshold)
    i, j, distance = _within_threshold(hashes, threshold, 64, masks)
    got = set(zip(i.tolist(), j.tolist(), distance.tolist(), strict=True))
    assert got == brute_force_pairs(hashes, threshold, None)
    assert any(d == threshold for _, _, d in got)


@pytest.mark.parametrize("block_elements", [1 << 15, 16])
def test_search_with_many_equal_hashes_equals_brute_force(block_elements: int, monkeypatch):
    """Long runs of equal keys (80 equal hashes, 150 near them), also with blocks smaller
    than one run."""
    monkeypatch.setattr(search, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**64, dtype=np.uint64)
    flips = [
        np.uint64(sum(1 << int(b) for b in rng.choice(64, size=k % 14, replace=False)))
        for k in range(150)
    ]
    hashes = np.concatenate(
        [
            np.full(80, base),
            base ^ np.array(flips, dtype=np.uint64),
            rng.integers(0, 2**64, size=200, dtype=np.uint64),
        ]
    )
    found = find_near_duplicates(hashes, 10)
    got = set(map(tuple, found[["i", "j", "distance"]].to_numpy().tolist()))
    assert got == brute_force_pairs(hashes, 10, None)


@pytest.mark.parametrize("block_elements", [1 << 15, 64])
def test_search_checks_every_pair_of_runs_of_every_length(block_elements: int, monkeypatch):
    """A narrow mask puts ~16 hashes in each run (lengths 6 to 30, odd and even), and a wide
    threshold makes many of their pairs close: every pair inside a run, at every cyclic
    offset, must be found exactly once, whatever the blocks the runs are cut into."""
    monkeypatch.setattr(search, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(11)
    hashes = rng.integers(0, 2**64, size=4_000, dtype=np.uint64)
    mask, threshold = 0xFF, 26
    i, j, distance = _within_threshold(hashes, threshold, 64, [mask])
    got = list(zip(i.tolist(), j.tolist(), distance.tolist(), strict=True))
    assert len(got) == len(set(got))
    expected = {
        (a, b, d)
        for a, b, d in brute_force_pairs(hashes, threshold, None)
        if (int(hashes[a]) ^ int(hashes[b])) & mask == 0
    }
    assert set(got) == expected
    assert len(expected) > 1_000
    lengths = np.unique(hashes & np.uint64(mask), return_counts=True)[1]
    assert {6, 7, 28, 30} <= set(lengths.tolist())  # the runs this test is about


def test_search_in_threads_equals_one_thread():
    rng = np.random.default_rng(12)
    n = 30_000  # above the size at which tables are scanned in threads
    hashes = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    for k in range(300):
        bits = rng.choice(64, size=k % 12, replace=False)
        hashes[rng.integers(n)] = hashes[rng.integers(n)] ^ np.uint64(
            sum(1 << int(b) for b in bits)
        )
    one, two = SearchStats(), SearchStats()
    alone = find_near_duplicates(hashes, 10, stats=one)
    threaded = find_near_duplicates(hashes, 10, stats=two, workers=2)
    pd.testing.assert_frame_equal(alone, threaded)
    assert one == two and len(alone) >= 250


def test_search_uses_longer_keys_for_more_hashes():
    few, many = search_masks(10, 64, 3_000), search_masks(10, 64, 1_000_000)
    assert min(m.bit_count() for m in many) >= 16 > max(m.bit_count() for m in few)
    assert len(many) == 94  # 2 parts: 63 + 31 tables (tolerances 5 and 4)


def test_config_rejects_hash_too_wide():
    with pytest.raises(ValueError, match="64"):
        DedupConfig(hash_method="colorhash", hash_size=8)
    with pytest.raises(ValueError, match="hash_method"):
        DedupConfig(hash_method="md5")


def _config(**overrides) -> DedupConfig:
    return DedupConfig(workers=1, **overrides)


@pytest.fixture()
def raw_dir(tmp_path: Path) -> Path:
    big = photo(1, (360, 240))
    rows = [
        {"url": "https://a.example/big.jpg", "data": jpeg(big)},
        # Same photo, smaller and re-encoded: a near duplicate that must lose to the big one.
        {"url": "https://b.example/small.jpg", "data": jpeg(big.resize((240, 160)), 60)},
        # Byte-identical repost: an exact duplicate.
        {"url": "https://c.example/copy.jpg", "data": jpeg(big)},
        # Mirrored repost: a duplicate only when flip-aware.
        {"url": "https://d.example/mirror.jpg", "data": jpeg(big.transpose(0))},
        {"url": "https://e.example/other.jpg", "data": jpeg(photo(2))},
        {"url": "https://e.example/third.jpg", "data": jpeg(photo(3))},
        {"url": "https://e.example/dead.jpg", "data": None},
        {"url": "https://e.example/broken.jpg", "data": b"\xff\xd8 not really a jpeg"},
    ]
    write_raw_shard(tmp_path / "raw" / "raw-00000.parquet", rows)
    return tmp_path / "raw"


def test_deduplicate_clusters_and_keeps_biggest(raw_dir: Path, tmp_path: Path):
    result = deduplicate(raw_dir, tmp_path / "unique", _config())
    assert result.n_input == 7  # ok rows, the broken one included
    assert result.n_undecodable == 1
    assert result.n_kept == 3
    assert result.n_exact_duplicates == 1
    assert result.n_near_duplicates == 2
    assert result.n_clusters == 1
    assert result.cluster_size_histogram == {1: 2, 4: 1}

    unique = pd.read_parquet(result.unique_path)
    assert sorted(unique["url"]) == [
        "https://a.example/big.jpg",
        "https://e.example/other.jpg",
        "https://e.example/third.jpg",
    ]
    big = unique.set_index("url").loc["https://a.example/big.jpg"]
    assert (big["width"], big["height"], big["cluster_size"]) == (360, 240, 4)
    assert len(big["phash"]) == 16 and big["make"] == "Audi"
    assert "image_bytes" not in unique.columns

    clusters = pd.read_parquet(result.clusters_path).set_index("url")
    assert clusters.loc["https://a.example/big.jpg", "kept"]
    assert clusters.loc["https://c.example/copy.jpg", "kind"] == "exact"
    assert clusters.loc["https://b.example/small.jpg", "kind"] == "near"
    assert clusters.loc["https://d.example/mirror.jpg", "kind"] == "near"
    assert clusters["distance"].max() <= DedupConfig.threshold

    sheet = Image.open(result.contact_sheet_path)
    # One row (the cluster of four), as wide as its four members and no wider.
    cell = DedupConfig.thumbnail_px + 2 * contact_sheet._BORDER_PX
    assert sheet.width == contact_sheet._CAPTION_PX + 4 * cell
    assert sheet.height == cell + contact_sheet._LABEL_PX


def test_mirrored_copy_needs_flip_aware(raw_dir: Path, tmp_path: Path):
    result = deduplicate(raw_dir, tmp_path / "unique", _config(flip_aware=False))
    unique = pd.read_parquet(result.unique_path)
    assert "https://d.example/mirror.jpg" in set(unique["url"])
    assert result.n_kept == 4


def test_latest_fetch_of_a_url_wins(tmp_path: Path):
    raw = tmp_path / "raw"
    url = "https://a.example/x.jpg"
    write_raw_shard(raw / "raw-00000.parquet", [{"url": url, "data": jpeg(photo(5))}])
    # A later fetch of the same URL failed: the URL is no longer an image.
    later = T0 + timedelta(days=1)
    write_raw_shard(
        raw / "raw-00001.parquet",
        [
            {"url": url, "data": None, "fetched_at": later},
            {"url": "https://a.example/y.jpg", "data": jpeg(photo(6))},
        ],
    )
    result = deduplicate(raw, tmp_path / "unique", _config())
    assert list(pd.read_parquet(result.unique_path)["url"]) == ["https://a.example/y.jpg"]


def test_incremental_run_hashes_only_new_images(raw_dir: Path, tmp_path: Path):
    out = tmp_path / "unique"
    first = deduplicate(raw_dir, out, _config())
    assert first.n_hashed == 6  # distinct sha256 values

    old_big = photo(1, (360, 240))
    write_raw_shard(
        raw_dir / "raw-00001.parquet",
        [
            {"url": "https://f.example/new.jpg", "data": jpeg(photo(9))},
            {"url": "https://f.example/repost.jpg", "data": jpeg(old_big.resize((300, 200)), 70)},
        ],
    )
    calls: list[tuple[int, int]] = []
    second = deduplicate(raw_dir, out, _config(), on_progress=lambda d, t: calls.append((d, t)))
    assert second.n_hashed == 2
    assert calls[-1] == (2, 2)
    unique = pd.read_parquet(second.unique_path).set_index("url")
    assert "https://f.example/new.jpg" in unique.index
    assert "https://f.example/repost.jpg" not in unique.index
    assert unique.loc["https://a.example/big.jpg", "cluster_size"] == 5
    assert second.n_kept == first.n_kept + 1

    # A different hash function cannot reuse the cache.
    third = deduplicate(raw_dir, out, _config(hash_method="dhash"))
    assert third.n_hashed == 8


@pytest.mark.parametrize(
    "min_images_per_worker", [1, 1000], ids=["process-pool", "threads-below-pool-size"]
)
def test_parallel_hashing_matches_serial(raw_dir: Path, tmp_path: Path, min_images_per_worker: int):
    serial = deduplicate(raw_dir, tmp_path / "serial", _config())
    parallel = deduplicate(
        raw_dir,
        tmp_path / "parallel",
        DedupConfig(workers=2, chunk_size=2, min_images_per_worker=min_images_per_worker),
    )
    columns = ["url", "phash", "cluster_id", "cluster_size"]
    pd.testing.assert_frame_equal(
        pd.read_parquet(serial.unique_path)[columns],
        pd.read_parquet(parallel.unique_path)[columns],
    )


def test_missing_raw_dir_names_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="raw_images"):
        deduplicate(tmp_path / "nowhere", tmp_path / "unique", _config())


# --------------------------------------------------------------------------- colour verification


def studio_car(colour: str, body_type: str = "sedan", seed: int = 1) -> Image.Image:
    """A smallish car on a plain studio backdrop: the same seed gives the same shot and pose."""
    return draw_car(
        np.random.default_rng(seed),
        body_type=body_type,
        colour=colour,
        facing="left",
        view="side",
        size=(320, 240),
        background="studio",
    )


def _distance(a: Image.Image, b: Image.Image, config: DedupConfig) -> float:
    thumbs = np.stack(
        [
            colour_thumbnails(np.asarray(img), config.colour_grid, config.colour_crops)
            for img in (a, b)
        ]
    )
    return float(colour_distances(thumbs, np.array([0]), np.array([1]), config.flip_aware)[0])


def test_colour_distance_tolerates_copies_and_separates_paint():
    config = DedupConfig()
    original = photo(11, (400, 300))
    w, h = original.size
    cropped = original.crop((round(w * 0.015), round(h * 0.015), w - round(w * 0.015), h - 5))
    reencoded = Image.open(io.BytesIO(jpeg(original.resize((320, 240)), 60)))
    for copy in (cropped, reencoded, ImageOps.mirror(original)):
        assert _distance(original, copy, config) <= config.max_colour_distance
    assert _distance(original, photo(12, (400, 300)), config) > 4 * config.max_colour_distance
    # Mirroring only matches when flip-aware.
    no_flip = DedupConfig(flip_aware=False)
    assert _distance(original, ImageOps.mirror(original), no_flip) > no_flip.max_colour_distance


@pytest.mark.parametrize(
    ("first", "second"),
    [(("grey", "sedan"), ("blue", "sedan")), (("white", "sedan"), ("yellow", "coupe"))],
)
def test_studio_shots_of_different_cars_are_not_duplicates(
    tmp_path: Path, first: tuple[str, str], second: tuple[str, str]
):
    a, b = studio_car(*first), studio_car(*second)
    # The premise: the perceptual hash alone cannot tell these photos apart.
    hash_a, hash_b = (image_hashes(np.asarray(img), "phash", 8)[0] for img in (a, b))
    assert phash_distance(hash_a, hash_b) <= DedupConfig.threshold
    rows = [
        {"url": "https://a.example/first.jpg", "data": jpeg(a)},
        {"url": "https://b.example/second.jpg", "data": jpeg(b)},
        # A genuine repost of the first shot must still be caught.
        {"url": "https://c.example/repost.jpg", "data": jpeg(a.resize((256, 192)), 60)},
    ]
    raw = write_raw_shard(tmp_path / "raw" / "raw-00000.parquet", rows).parent
    result = deduplicate(raw, tmp_path / "unique", _config())
    clusters = pd.read_parquet(result.clusters_path)
    assert set(clusters["url"]) == {"https://a.example/first.jpg", "https://c.example/repost.jpg"}
    # Without the colour check the two cars are merged.
    hash_only = deduplicate(raw, tmp_path / "hash-only", _config(verify_colour=False))
    assert hash_only.n_kept == 1


def _demo_raw_dir(tmp_path: Path, n_listings: int) -> tuple[Path, dict[str, str]]:
    """Raw shards of every served demo photo, keyed by URL path; and copy -> original."""
    catalog = build_catalog(seed=0, n_listings=n_listings)
    rows = [
        {"url": path, "data": catalog.image_bytes(path)}
        for path in catalog.image_paths
        if catalog.serves(path)
    ]
    write_raw_shard(tmp_path / "raw" / "raw-00000.parquet", rows)
    return tmp_path / "raw", catalog.defects.duplicate_of


def test_demo_catalog_clusters_exactly_the_planted_duplicates(tmp_path: Path):
    raw, duplicate_of = _demo_raw_dir(tmp_path, n_listings=120)
    assert duplicate_of  # the catalog plants some
    result = deduplicate(raw, tmp_path / "unique", _config())
    clusters = pd.read_parquet(result.clusters_path)
    found = {frozenset(group) for _, group in clusters.groupby("cluster_id")["url"]}
    planted = {frozenset(pair) for pair in duplicate_of.items()}
    assert found == planted
    unique = set(pd.read_parquet(result.unique_path)["url"])
    assert not unique & set(duplicate_of)  # copies are smaller: the originals are kept


def test_cache_without_thumbnails_is_rehashed(raw_dir: Path, tmp_path: Path):
    out = tmp_path / "unique"
    first = deduplicate(raw_dir, out, _config())
    # Rewrite the cache as the previous version did: no thumbnails, an older spec.
    old = pq.read_table(out / HASHES_FILE).drop(["thumbnails"])
    old = old.replace_schema_metadata({b"carmodels.hash_spec": b"phash:8:draft256"})
    pq.write_table(old, out / HASHES_FILE)
    second = deduplicate(raw_dir, out, _config())
    assert second.n_hashed == first.n_hashed == 6
    assert second.n_kept == first.n_kept
    assert deduplicate(raw_dir, out, _config()).n_hashed == 0


# --------------------------------------------------------------------- bad input, counted drops


def test_undecodable_photos_are_counted_by_reason(raw_dir: Path, tmp_path: Path):
    # An "ok" row whose bytes did not make it into the shard: dropped too, and said so.
    table = pq.read_table(raw_dir / "raw-00000.parquet").slice(0, 1)
    table = table.set_column(0, "url", pa.array(["https://f.example/lost.jpg"]))
    table = table.set_column(
        table.schema.get_field_index("image_bytes"), "image_bytes", pa.nulls(1, pa.binary())
    )
    table = table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(["0" * 64]))
    pq.write_table(table, raw_dir / "raw-00001.parquet")
    out = tmp_path / "unique"
    first = deduplicate(raw_dir, out, _config())
    assert first.undecodable_by_reason == {"decode_error": 1, "no_bytes": 1}
    assert first.n_undecodable == 2
    unique = set(pd.read_parquet(first.unique_path)["url"])
    assert not unique & {"https://e.example/broken.jpg", "https://f.example/lost.jpg"}
    # From the hash cache: the broken photo is not decoded again, yet still counted.
    second = deduplicate(raw_dir, out, _config())
    assert second.n_hashed == 0
    assert second.undecodable_by_reason == first.undecodable_by_reason


def test_damaged_raw_shard_names_the_file_and_the_fix(raw_dir: Path, tmp_path: Path):
    (raw_dir / "raw-00001.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(ShardsError, match=r"raw-00001\.parquet.*carmodels scrape"):
        deduplicate(raw_dir, tmp_path / "unique", _config())


def test_missing_raw_dir_names_the_real_command(tmp_path: Path):
    with pytest.raises(MissingInputError, match="carmodels scrape"):
        deduplicate(tmp_path / "nowhere", tmp_path / "unique", _config())


def test_raw_shards_without_an_ok_image_are_refused(tmp_path: Path):
    raw = tmp_path / "raw"
    write_raw_shard(raw / "raw-00000.parquet", [{"url": "https://a.example/x.jpg", "data": None}])
    with pytest.raises(InputError, match="no successfully fetched image"):
        deduplicate(raw, tmp_path / "unique", _config())
    assert not (tmp_path / "unique" / "unique.parquet").exists()


def test_damaged_hash_cache_is_rehashed(raw_dir: Path, tmp_path: Path):
    out = tmp_path / "unique"
    first = deduplicate(raw_dir, out, _config())
    (out / HASHES_FILE).write_bytes(b"PAR1 cut short")
    second = deduplicate(raw_dir, out, _config())
    assert second.n_hashed == first.n_hashed == 6
    assert second.n_kept == first.n_kept
