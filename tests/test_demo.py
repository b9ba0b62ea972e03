"""The demo catalog: deterministic drawn photos, planted defects and the listing site."""

from __future__ import annotations

import io
import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from urllib.parse import urljoin

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from carmodels.demo import (
    BODY_TYPES,
    VIEWS,
    DemoCatalog,
    DemoServer,
    build_catalog,
    draw_car,
)

N_LISTINGS = 40
PAGE_SIZE = 7


@pytest.fixture(scope="module")
def catalog() -> DemoCatalog:
    return build_catalog(seed=0, n_listings=N_LISTINGS)


@pytest.fixture(scope="module")
def server(catalog: DemoCatalog):
    with DemoServer(catalog=catalog, listings_per_page=PAGE_SIZE) as running:
        yield running


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, headers: dict[str, str] | None = None):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10)


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --------------------------------------------------------------------------- catalog


def test_same_seed_gives_byte_identical_photos(catalog: DemoCatalog) -> None:
    again = build_catalog(seed=0, n_listings=N_LISTINGS)
    assert again.listings == catalog.listings
    assert again.defects == catalog.defects
    copy = next(iter(catalog.defects.duplicate_of))
    # Asked for in a different order: each photo's randomness is its own.
    paths = [copy, catalog.defects.truncated, *catalog.image_paths[:4]]
    for path in reversed(paths):
        assert again.image_bytes(path) == catalog.image_bytes(path), path


def test_different_seed_gives_a_different_catalog(catalog: DemoCatalog) -> None:
    other = build_catalog(seed=1, n_listings=N_LISTINGS)
    assert [x.name for x in other.listings] != [x.name for x in catalog.listings]
    first = catalog.image_paths[0]
    assert other.image_bytes(first) != catalog.image_bytes(first)


def test_every_photo_decodes_except_the_planted_broken_ones(catalog: DemoCatalog) -> None:
    broken = {catalog.defects.non_image, catalog.defects.truncated}
    for path in catalog.image_paths:
        if path in catalog.defects.dead_links:
            assert not catalog.serves(path)
            with pytest.raises(KeyError, match="dead link"):
                catalog.image_bytes(path)
            continue
        data = catalog.image_bytes(path)
        if path in broken:
            with pytest.raises(OSError):
                _decode(data)
            continue
        image = _decode(data)
        truth = catalog.truth[path]
        assert image.format == "JPEG"
        assert image.size == (truth.width, truth.height), path


def test_defects_are_planted_as_recorded(catalog: DemoCatalog) -> None:
    defects = catalog.defects
    assert len(defects.dead_links) == 3
    assert len(defects.duplicate_of) == round(0.05 * N_LISTINGS)
    planted = [*defects.dead_links, defects.non_image, defects.truncated, *defects.duplicate_of]
    assert len(planted) == len(set(planted)), "two defects share a photo"
    assert set(planted) <= set(catalog.image_paths)
    assert catalog.image_bytes(defects.non_image).lstrip().lower().startswith(b"<!doctype html")
    truncated = catalog.image_bytes(defects.truncated)
    assert truncated.startswith(b"\xff\xd8") and not truncated.endswith(b"\xff\xd9")

    by_path = {path: x for x in catalog.listings for path in x.image_paths}
    for copy, original in defects.duplicate_of.items():
        assert copy != original
        copy_listing, original_listing = by_path[copy], by_path[original]
        assert copy_listing.id != original_listing.id
        assert (copy_listing.make, copy_listing.model) == (
            original_listing.make,
            original_listing.model,
        )
        copy_image = _decode(catalog.image_bytes(copy)).convert("RGB")
        original_image = _decode(catalog.image_bytes(original)).convert("RGB")
        assert catalog.image_bytes(copy) != catalog.image_bytes(original)
        assert copy_image.width == round(original_image.width * 0.85)
        # Same picture: after scaling back, pixels differ only by resampling and JPEG noise.
        back = np.asarray(copy_image.resize(original_image.size), dtype=float)
        assert np.abs(back - np.asarray(original_image, dtype=float)).mean() < 6


def test_views_facings_and_body_types_are_mixed() -> None:
    catalog = build_catalog(seed=3)  # the default size; nothing is drawn here
    views = Counter(truth.view for truth in catalog.truth.values())
    facings = Counter(truth.facing for truth in catalog.truth.values())
    n = sum(views.values())
    assert set(views) == set(VIEWS)
    assert 0.04 < views["front"] / n < 0.18
    assert 0.4 < facings["left"] / n < 0.6
    assert {x.body_type for x in catalog.listings} == set(BODY_TYPES)
    assert all(1 <= len(x.image_paths) <= 3 for x in catalog.listings)
    for listing in catalog.listings:
        assert 2000 <= listing.year <= 2025 and listing.price > 0 and listing.mileage >= 0
        for path in listing.image_paths:
            if path in catalog.truth:
                assert catalog.truth[path].body_type == listing.body_type


def test_manifest_frame_has_one_row_per_image_url(catalog: DemoCatalog) -> None:
    frame = catalog.manifest_frame("http://example.test/")
    assert list(frame.columns) == [
        "url", "make", "model", "year", "type", "price", "mileage", "listing_url",
    ]  # fmt: skip
    assert frame["url"].is_unique
    assert len(frame) == len(catalog.image_paths)
    assert frame["url"].str.startswith("http://example.test/images/").all()


def test_too_few_listings_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="n_listings must be at least"):
        build_catalog(n_listings=3)


# --------------------------------------------------------------------------- drawing


def _car_mask(image: Image.Image) -> np.ndarray:
    """Pixels that differ from the studio backdrop, whose colour only changes down the rows."""
    pixels = np.asarray(image, dtype=int)
    backdrop = pixels[:, :1, :]
    return np.abs(pixels - backdrop).max(axis=2) > 24


def test_left_facing_is_the_mirror_image_of_right_facing() -> None:
    for body_type in BODY_TYPES:
        for view in VIEWS:
            kwargs = dict(body_type=body_type, colour="red", view=view, size=(320, 240))
            right = draw_car(np.random.default_rng(11), facing="right", **kwargs)
            left = draw_car(np.random.default_rng(11), facing="left", **kwargs)
            assert np.array_equal(np.asarray(left), np.asarray(ImageOps.mirror(right)))


@pytest.mark.parametrize("body_type", ["sedan", "suv", "hatchback", "coupe"])
def test_the_cabin_sits_behind_the_middle_of_the_car(body_type: str) -> None:
    """The facing ground truth is visible: the roof is nearer the tail than the nose."""
    for seed in range(3):
        centres = {}
        for facing in ("left", "right"):
            image = draw_car(
                np.random.default_rng(seed), body_type=body_type, colour="blue",
                facing=facing, view="side", size=(640, 480), background="studio",
            )  # fmt: skip
            mask = _car_mask(image)
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            car_middle = (cols[0] + cols[-1]) / 2
            roof_rows = mask[rows[0] : rows[0] + max(3, (rows[-1] - rows[0]) // 12)]
            roof_middle = np.flatnonzero(roof_rows.any(axis=0)).mean()
            centres[facing] = roof_middle - car_middle
        assert centres["right"] < 0 < centres["left"], centres


def test_draw_car_names_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    good = dict(body_type="sedan", colour="red", facing="left", view="side", size=(320, 240))
    with pytest.raises(ValueError, match="body_type 'tank'"):
        draw_car(rng, **{**good, "body_type": "tank"})
    with pytest.raises(ValueError, match="view"):
        draw_car(rng, **{**good, "view": "top"})
    with pytest.raises(ValueError, match="colour"):
        draw_car(rng, **{**good, "colour": "plaid"})
    with pytest.raises(ValueError, match="size"):
        draw_car(rng, **{**good, "size": (10, 10)})


# --------------------------------------------------------------------------- the site


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.json_ld: list = []
        self.next_links: list[tuple[str, str]] = []  # (tag, href)
        self._in_json_ld = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("type") == "application/ld+json":
            self._in_json_ld = True
        if tag in ("a", "link") and a.get("rel") == "next":
            self.next_links.append((tag, a["href"] or ""))

    def handle_endtag(self, tag: str) -> None:
        self._in_json_ld = self._in_json_ld and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_json_ld:
            self.json_ld.append(json.loads(data))


def _crawl(start_url: str) -> list[list[dict]]:
    pages, url = [], start_url
    while url:
        parser = _PageParser()
        with _get(url) as response:
            parser.feed(response.read().decode())
        assert len(parser.json_ld) == 1
        pages.append(parser.json_ld[0])
        hrefs = {href for _, href in parser.next_links}
        assert len(hrefs) <= 1 and {tag for tag, _ in parser.next_links} in ({"a", "link"}, set())
        url = urljoin(url, hrefs.pop()) if hrefs else ""
    return pages


def test_rel_next_pagination_visits_every_listing_once(server: DemoServer) -> None:
    pages = _crawl(server.start_url)
    assert len(pages) == math.ceil(N_LISTINGS / PAGE_SIZE)
    seen = [car["url"].rsplit("/", 1)[-1] for page in pages for car in page]
    assert seen == [x.id for x in server.catalog.listings]


def test_json_ld_describes_each_car(server: DemoServer) -> None:
    cars = [car for page in _crawl(server.start_url) for car in page]
    for car, listing in zip(cars, server.catalog.listings, strict=True):
        assert car["@context"] == "https://schema.org" and car["@type"] == "Car"
        assert car["name"] == listing.name and car["model"] == listing.model
        assert car["brand"] == {"@type": "Brand", "name": listing.make}
        assert car["vehicleModelDate"] == str(listing.year)
        assert car["bodyType"] == listing.body_type
        assert car["offers"] == {"@type": "Offer", "price": listing.price, "priceCurrency": "USD"}
        assert car["mileageFromOdometer"]["value"] == listing.mileage
        assert car["mileageFromOdometer"]["unitCode"] == "SMI"
        assert car["image"] == [server.base_url + path for path in listing.image_paths]
        assert car["url"].startswith(server.base_url + "/listing/")
    with _get(cars[0]["url"]) as response:
        assert response.status == 200


def test_defects_over_http(server: DemoServer) -> None:
    defects = server.catalog.defects
    for path in defects.dead_links:
        with pytest.raises(urllib.error.HTTPError) as error:
            _get(server.base_url + path)
        assert error.value.code == 404
    with _get(server.base_url + defects.non_image) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert b"<html" in response.read().lower()
    with _get(server.base_url + defects.truncated) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        with pytest.raises(OSError):
            _decode(response.read())


def test_photos_carry_cache_headers(server: DemoServer) -> None:
    path = next(p for p in server.catalog.image_paths if p in server.catalog.truth)
    with _get(server.base_url + path) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.read() == server.catalog.image_bytes(path)
        etag = response.headers["ETag"]
        assert response.headers["Last-Modified"].endswith("GMT")
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        _get(server.base_url + path, headers={"If-None-Match": etag})
    assert not_modified.value.code == 304


def test_root_robots_manifest_and_bad_pages(server: DemoServer) -> None:
    with _get(server.base_url + "/") as response:
        assert response.url == server.start_url
    with _get(server.base_url + "/robots.txt") as response:
        assert "Allow: /" in response.read().decode()
    with _get(server.manifest_url) as response:
        manifest = pd.read_csv(response)
    assert len(manifest) == len(server.catalog.image_paths)
    assert manifest["url"].str.startswith(server.base_url).all()
    for bad, code in (("/listings?page=999", 404), ("/listings?page=x", 400), ("/nope", 404)):
        with pytest.raises(urllib.error.HTTPError) as error:
            _get(server.base_url + bad)
        assert error.value.code == code


def test_server_stops_cleanly_and_frees_its_port() -> None:
    port = _free_port()
    server = DemoServer(n_listings=12, port=port).start()
    assert server.base_url == f"http://127.0.0.1:{port}"
    with _get(server.base_url + "/robots.txt") as response:
        assert response.status == 200
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    server.stop()  # a second stop is harmless
    with pytest.raises(urllib.error.URLError):
        _get(f"http://127.0.0.1:{port}/robots.txt")
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.base_url
    # The port is free again straight away (the pipeline restarts the server each step).
    with DemoServer(n_listings=12, port=port) as again, _get(again.start_url) as response:
        assert response.status == 200


def test_a_taken_port_is_a_clear_error() -> None:
    with DemoServer(n_listings=12) as first, pytest.raises(RuntimeError, match="could not start"):
        DemoServer(n_listings=12, port=first.port).start()


@pytest.mark.slow
def test_default_catalog_photos_all_decode() -> None:
    catalog = build_catalog()
    broken = {catalog.defects.non_image, catalog.defects.truncated}
    for path in catalog.image_paths:
        if catalog.serves(path) and path not in broken:
            assert _decode(catalog.image_bytes(path)).format == "JPEG"
