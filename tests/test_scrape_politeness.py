"""Downloader politeness and incremental modes: robots.txt, opt-out headers, request pace,
revalidation, time-based flushing, shard-write deadlines and thumbnails."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from carmodels.scrape import ScrapeConfig, download_images, read_raw
from carmodels.scrape import raw as scrape_raw
from carmodels.scrape.robots import opts_out_of_ai, product_token
from tests.test_scrape import FAST, GOOD_JPEG, ScrapeTestServer, manifest_for
from tests.test_scrape_robots import assert_spaced

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fresh_server() -> Iterator[ScrapeTestServer]:
    """A server of its own: these tests change its robots.txt and content versions."""
    server = ScrapeTestServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("values", "opted_out"),
    [
        (["noai"], True),
        (["noindex, NoImageAI"], True),
        (["noindex", "noai"], True),
        (["carmodels: noai"], True),
        (["*: noimageai"], True),
        (["otherbot: noai, noimageai"], False),
        (["noindex, nofollow"], False),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], False),
        ([], False),
    ],
)
def test_opts_out_of_ai(values, opted_out):
    assert opts_out_of_ai(values, "carmodels/0.1 (+https://example.com)") is opted_out


def test_product_token():
    assert product_token("carmodels-tests/1.0") == "carmodels-tests"
    assert product_token("MyBot (+https://x)") == "mybot"


def test_robots_5xx_means_unavailable_and_retry_failed_tries_again(fresh_server, tmp_path):
    fresh_server.robots_status = 503
    urls = [fresh_server.url(f"/img/unavailable-{i}.jpg") for i in range(3)]
    first = download_images(manifest_for(urls), tmp_path, FAST)
    assert first.outcome_counts == {"robots_unavailable": 3}
    assert fresh_server.hits["/robots.txt"] == 1, "the verdict is cached, not refetched per URL"
    assert all(fresh_server.hits[u.removeprefix(fresh_server.base_url)] == 0 for u in urls)

    fresh_server.robots_status = 200
    again = download_images(manifest_for(urls), tmp_path, replace(FAST, retry_failed=True))
    assert again.outcome_counts == {"ok": 3}


def test_missing_robots_txt_allows_everything(fresh_server, tmp_path):
    fresh_server.robots_txt = None
    result = download_images(manifest_for([fresh_server.url("/private/a.jpg")]), tmp_path, FAST)
    assert result.outcome_counts == {"ok": 1}


def test_respect_robots_off_ignores_robots_and_opt_outs(fresh_server, tmp_path):
    config = replace(FAST, respect_robots=False)
    urls = [fresh_server.url("/private/b.jpg"), fresh_server.url("/noai-for-others")]
    result = download_images(manifest_for(urls), tmp_path, config)
    assert result.outcome_counts == {"ok": 2}
    assert fresh_server.hits["/robots.txt"] == 0


def test_per_host_rate_spaces_request_starts(fresh_server, tmp_path):
    rate = 20.0
    urls = [fresh_server.url(f"/img/paced-{i}.jpg") for i in range(8)]
    result = download_images(manifest_for(urls), tmp_path, replace(FAST, per_host_rate=rate))
    assert result.outcome_counts == {"ok": 8}
    starts = sorted(
        t for u in urls for t in fresh_server.request_times[u.removeprefix(fresh_server.base_url)]
    )
    # Each start waits for its own turn. Arrival times at the server carry the jitter of a
    # loaded machine (one late request leaves a short gap after it), hence assert_spaced.
    assert_spaced(np.asarray(starts), 1 / rate)


def test_revalidate_keeps_unchanged_and_replaces_changed(fresh_server, tmp_path):
    urls = [fresh_server.url("/versioned/same.jpg"), fresh_server.url("/versioned/new.jpg")]
    first = download_images(manifest_for(urls), tmp_path, FAST)
    assert first.outcome_counts == {"ok": 2}
    old = read_raw(tmp_path).set_index("url")
    assert old.loc[urls[0], "etag"] == '"same.jpg-v0"'
    assert old.loc[urls[0], "last_modified"] == "Wed, 21 Oct 2015 07:28:00 GMT"

    fresh_server.versions["new.jpg"] += 1  # only this one changes on the server
    plain = download_images(manifest_for(urls), tmp_path, FAST)
    assert plain.n_fetched == 0, "without revalidate, ok URLs are not asked for again"

    again = download_images(manifest_for(urls), tmp_path, replace(FAST, revalidate=True))
    assert again.n_fetched == 2
    assert again.revalidation_counts == {"not_modified": 1, "changed": 1}
    assert again.outcome_counts == {"ok": 1}, "only the changed image gets a new row"
    assert [pq.read_metadata(p).num_rows for p in again.shard_paths] == [1]

    new = read_raw(tmp_path).set_index("url")
    assert new.loc[urls[0], "sha256"] == old.loc[urls[0], "sha256"]
    assert new.loc[urls[1], "sha256"] != old.loc[urls[1], "sha256"]
    assert new.loc[urls[1], "etag"] == '"new.jpg-v1"'
    assert fresh_server.hits["/versioned/same.jpg"] == 2  # first run, then the 304


def test_revalidation_failure_keeps_the_old_image(fresh_server, tmp_path):
    url = fresh_server.url("/versioned/gone.jpg")
    download_images(manifest_for([url]), tmp_path, FAST)
    fresh_server.robots_status = 503  # the site is now unreachable
    result = download_images(manifest_for([url]), tmp_path, replace(FAST, revalidate=True))
    assert result.revalidation_counts == {"kept_after_failure": 1}
    assert result.shard_paths == []
    assert read_raw(tmp_path)["outcome"].tolist() == ["ok"]


def test_rows_are_flushed_by_age_in_slow_runs(fresh_server, tmp_path):
    fresh_server.image_delay_s = 0.1
    urls = [fresh_server.url(f"/img/slow-{i}.jpg") for i in range(6)]
    config = replace(FAST, concurrency=1, shard_size=1000, flush_interval_s=0.15)
    result = download_images(manifest_for(urls), tmp_path, config)
    assert result.outcome_counts == {"ok": 6}
    assert len(result.shard_paths) >= 2, "a slow run saves progress before shard_size rows"
    assert sorted(read_raw(tmp_path)["url"]) == sorted(urls)


def test_shard_write_has_a_deadline(fresh_server, tmp_path, monkeypatch):
    def hung_write(self, path, columns):
        time.sleep(1.0)  # as if the disk stopped answering

    monkeypatch.setattr(scrape_raw.RawShardWriter, "write_batch", hung_write)
    config = replace(FAST, shard_write_timeout_s=0.2)
    started = time.perf_counter()
    with pytest.raises(TimeoutError, match="raw-00000.parquet took over 0.2 s"):
        download_images(manifest_for([fresh_server.url("/img/w.jpg")]), tmp_path, config)
    assert time.perf_counter() - started < 0.9


def test_thumbnails_are_letterboxed_squares(fresh_server, tmp_path):
    config = replace(FAST, thumbnail_size=32, keep_image_bytes=False)
    urls = [
        fresh_server.url("/jpeg-as-text"),
        fresh_server.url("/good.png"),
        fresh_server.url("/truncated.jpg"),
    ]
    result = download_images(manifest_for(urls), tmp_path, config)
    assert result.outcome_counts == {"ok": 2, "corrupt": 1}, "a draft decode still validates"
    raw = read_raw(tmp_path).set_index("url")
    jpeg = raw.loc[urls[0]]
    assert jpeg["image_bytes"] is None and (jpeg["width"], jpeg["height"]) == (64, 48)
    thumbnail = np.frombuffer(jpeg["thumbnail"], np.uint8).reshape(32, 32, 3)
    # 64x48 fits as 32x24, centred: 4 rows of padding above and below.
    source = np.asarray(Image.open(io.BytesIO(GOOD_JPEG)))
    assert np.abs(thumbnail[16].astype(int) - source[24, ::2].astype(int)).mean() < 40
    assert raw.loc[urls[2], "thumbnail"] is None


def test_config_rejects_negative_rate():
    with pytest.raises(ValueError, match="per_host_rate"):
        ScrapeConfig(per_host_rate=-1)
