"""Downloader, raw shards and crawler against a local aiohttp server with misbehaving routes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pandas as pd
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image

from carmodels.scrape import (
    RAW_COLUMNS,
    ScrapeConfig,
    crawl_listings,
    download_images,
    is_public_address,
    parse_listing_page,
    read_raw,
)
from carmodels.scrape import net as scrape_net
from carmodels.scrape.net import GuardedResolver, PrivateAddressRefused

pytestmark = pytest.mark.timeout(60)


def make_image(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (64, 48)) -> bytes:
    """A small, distinct image per seed."""
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    image = Image.new("RGB", size, colour)
    image.putpixel((seed % size[0], 0), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_bomb_png() -> bytes:
    """4000 x 4000 pixels in a few kilobytes: over the test config's pixel limit."""
    buffer = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


GOOD_JPEG = make_image(1)
GOOD_PNG = make_image(2, "PNG")
BOMB_PNG = make_bomb_png()


class ScrapeTestServer:
    """An aiohttp app on 127.0.0.1 (port 0) in a background thread, counting hits per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.down = True  # state of /down/*, flipped by tests
        self.seen_user_agents: set[str] = set()
        self.accept_by_path: dict[str, str] = {}
        self.request_times: dict[str, list[float]] = {}
        self.robots_txt: str | None = ROBOTS_TXT  # None: /robots.txt answers 404
        self.robots_status = 200
        self.versions: Counter[str] = Counter()  # content version of /versioned/*
        self.image_delay_s = 0.0  # delay of /img/*
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._release: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/img/{name}", self._image)
        app.router.add_get("/good.png", self._fixed(GOOD_PNG, "image/png"))
        app.router.add_get("/bomb.png", self._fixed(BOMB_PNG, "image/png"))
        app.router.add_get("/flaky/{token}", self._flaky)
        app.router.add_get("/ratelimited/{token}", self._rate_limited)
        app.router.add_get("/down/{token}", self._down)
        app.router.add_get("/html-as-jpeg", self._html_as_jpeg)
        app.router.add_get("/jpeg-as-text", self._fixed(GOOD_JPEG, "text/plain"))
        app.router.add_get("/truncated.jpg", self._truncated)
        app.router.add_get("/huge", self._huge)
        app.router.add_get("/loop", self._redirect("/loop"))
        app.router.add_get("/redirect-good", self._redirect("/img/redirected.jpg"))
        app.router.add_get("/redirect-ipv6", self._redirect("http://[::1]:{port}/img/v6.jpg"))
        app.router.add_get("/hang", self._hang)
        app.router.add_get("/cars/{page}", self._listing_page)
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/private/{name}", self._image)
        app.router.add_get("/noai", self._opted_out("noai"))
        app.router.add_get("/noimageai-for-us", self._opted_out("carmodels-tests: noimageai"))
        app.router.add_get("/noai-for-others", self._opted_out("otherbot: noai, noimageai"))
        app.router.add_get("/redirect-private", self._redirect("/private/via-redirect.jpg"))
        app.router.add_get("/versioned/{name}", self._versioned)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._release is not None and self._runner is not None
        self._release.set()
        await self._runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self.hits[request.path] += 1
        self.request_times.setdefault(request.path, []).append(time.monotonic())
        self.seen_user_agents.add(request.headers.get("User-Agent", ""))
        self.accept_by_path[request.path] = request.headers.get("Accept", "")
        return await handler(request)

    @staticmethod
    def _bytes(data: bytes, content_type: str) -> web.Response:
        return web.Response(body=data, headers={"Content-Type": content_type})

    def _fixed(self, data: bytes, content_type: str):
        async def handler(request: web.Request) -> web.Response:
            return self._bytes(data, content_type)

        return handler

    def _redirect(self, location: str):
        async def handler(request: web.Request) -> web.Response:
            raise web.HTTPFound(location.replace("{port}", str(self.port)))

        return handler

    async def _robots(self, request: web.Request) -> web.Response:
        if self.robots_txt is None:
            return web.Response(status=404)
        return web.Response(status=self.robots_status, text=self.robots_txt)

    def _opted_out(self, tag: str):
        """Headers that opt out, then a body that never ends: reading it would time out."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(
                headers={"Content-Type": "image/jpeg", "X-Robots-Tag": tag}
            )
            await response.prepare(request)
            await response.write(GOOD_JPEG[:100])
            if "carmodels-tests" in tag or tag == "noai":
                await self._release.wait()
            else:
                await response.write(GOOD_JPEG[100:])
            return response

        return handler

    async def _versioned(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        etag = f'"{name}-v{self.versions[name]}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(
            body=make_image(1000 + self.versions[name]),
            headers={
                "Content-Type": "image/jpeg",
                "ETag": etag,
                "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
        )

    async def _image(self, request: web.Request) -> web.Response:
        if self.image_delay_s:
            await asyncio.sleep(self.image_delay_s)
        seed = int(hashlib.sha256(request.match_info["name"].encode()).hexdigest()[:6], 16)
        return self._bytes(make_image(seed), "image/jpeg")

    async def _flaky(self, request: web.Request) -> web.Response:
        if self.hits[request.path] == 1:
            return web.Response(status=500, text="try again")
        return self._bytes(GOOD_JPEG, "image/jpeg")

    async def _rate_limited(self, request: web.Request) -> web.Response:
        if self.hits[request.path] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return self._bytes(GOOD_JPEG, "image/jpeg")

    async def _down(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503)
        return self._bytes(GOOD_JPEG, "image/jpeg")

    async def _html_as_jpeg(self, request: web.Request) -> web.Response:
        return self._bytes(b"<html><body>Not found</body></html>", "image/jpeg")

    async def _truncated(self, request: web.Request) -> web.Response:
        photo = make_image(3, size=(400, 300))
        return self._bytes(photo[: len(photo) // 2], "image/jpeg")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 10**10
        await response.prepare(request)
        await response.write(b"\xff\xd8\xff")
        await self._release.wait()
        return response

    async def _hang(self, request: web.Request) -> web.Response:
        await self._release.wait()
        return self._bytes(GOOD_JPEG, "image/jpeg")

    async def _listing_page(self, request: web.Request) -> web.Response:
        html = LISTING_PAGES.get(request.match_info["page"])
        if html is None:
            return web.Response(status=404)
        return web.Response(text=html.replace("{port}", str(self.port)), content_type="text/html")


#: Only our agent is kept out of /private/; everyone else may go anywhere.
ROBOTS_TXT = """\
User-agent: otherbot
Disallow: /

User-agent: carmodels-tests
Disallow: /private/
"""


def _page(next_links: str, *documents: object, extra: str = "") -> str:
    scripts = "".join(
        f'<script type="application/ld+json">{json.dumps(d)}</script>' for d in documents
    )
    return f"<html><head>{next_links}{scripts}{extra}</head><body>cars</body></html>"


LISTING_PAGES = {
    "page1": _page(
        '<link rel="next" href="/cars/page2">',
        {
            "@context": "https://schema.org",
            "@graph": [
                {"@type": "Organization", "name": "Dealer", "image": "/img/logo.jpg"},
                {
                    "@type": ["Car", "Product"],
                    "name": "2015 Audi A3",
                    "url": "/listing/1",
                    "brand": {"@type": "Brand", "name": "Audi"},
                    "model": "A3",
                    "vehicleModelDate": "2015",
                    "bodyType": "convertible",
                    "offers": {"@type": "Offer", "price": "22200", "priceCurrency": "USD"},
                    "mileageFromOdometer": {"@type": "QuantitativeValue", "value": 41822},
                    "image": ["/img/a1.jpg", "img/a2.jpg"],
                },
            ],
        },
        extra='<script type="application/ld+json">{ not json</script>',
    ),
    "page2": _page(
        '<a rel="next" href="page3">next</a>',
        [
            {"@type": "BreadcrumbList", "itemListElement": []},
            {
                "@type": "Vehicle",
                "name": "Jaguar XK",
                "brand": "Jaguar",
                "model": {"@type": "ProductModel", "name": "XK"},
                "productionDate": "2011-05-01",
                "offers": [{"@type": "Offer", "price": 34300}],
                "image": {"@type": "ImageObject", "contentUrl": "/img/b1.jpg"},
            },
        ],
    ),
    "page3": _page(
        '<link rel="next" href="/cars/page1">'
        '<a rel="nofollow next" href="http://localhost:{port}/cars/page4">more</a>',
        {
            "@type": "Product",
            "name": "Mazda MX-5",
            "brand": "Mazda",
            "image": [{"@type": "ImageObject", "url": "/img/c1.jpg"}, "/img/a1.jpg"],
        },
    ),
    "page4": _page("", {"@type": "Car", "name": "Kia Rio", "image": "/img/d1.jpg"}),
}


@pytest.fixture(scope="module")
def server() -> Iterator[ScrapeTestServer]:
    test_server = ScrapeTestServer()
    test_server.start()
    yield test_server
    test_server.stop()


#: Short timeouts and backoffs so the misbehaving routes resolve in about a second or two.
FAST = ScrapeConfig(
    concurrency=8,
    per_host_limit=8,
    connect_timeout_s=2.0,
    read_timeout_s=0.5,
    total_timeout_s=1.5,
    max_retries=1,
    backoff_base_s=0.05,
    max_retry_after_s=2.0,
    max_redirects=3,
    max_bytes=1024 * 1024,
    max_pixels=1_000_000,
    shard_size=4,
    allow_private_networks=True,
    user_agent="carmodels-tests/1.0",
)


def manifest_for(urls: list[str], **metadata: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"url": urls, **metadata})


def test_outcomes_of_misbehaving_routes(server, tmp_path):
    paths = {
        "/img/good.jpg": "ok",
        "/good.png": "ok",
        "/flaky/outcomes": "ok",
        "/ratelimited/outcomes": "ok",
        "/img/../missing": "http_404",
        "/html-as-jpeg": "not_image",
        "/jpeg-as-text": "ok",
        "/truncated.jpg": "corrupt",
        "/bomb.png": "bomb",
        "/huge": "too_large",
        "/loop": "too_many_redirects",
        "/redirect-good": "ok",
        "/hang": "timeout",
        "/private/photo.jpg": "robots_denied",
        "/redirect-private": "robots_denied",
        "/noai": "opted_out",
        "/noimageai-for-us": "opted_out",
        "/noai-for-others": "ok",
    }
    urls = [server.url(p) for p in paths]
    progress: list[tuple[int, int]] = []
    started = time.perf_counter()
    result = download_images(
        manifest_for(urls, make=[f"make{i}" for i in range(len(urls))]),
        tmp_path,
        FAST,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    elapsed = time.perf_counter() - started

    raw = read_raw(tmp_path).set_index("url")
    assert {p: raw.loc[server.url(p), "outcome"] for p in paths} == paths
    assert result.n_urls == result.n_fetched == len(urls)
    assert result.outcome_counts == dict(Counter(paths.values()))
    assert set(result.failures["url"]) == {
        server.url(p) for p, outcome in paths.items() if outcome != "ok"
    }
    assert progress[0] == (0, len(urls)) and progress[-1] == (len(urls), len(urls))
    assert elapsed < 10, "every request must end by its deadline"

    # Transient failures were retried (500 and 429 once each); the 404 was not.
    assert server.hits["/flaky/outcomes"] == 2
    assert server.hits["/ratelimited/outcomes"] == 2
    assert server.hits["/missing"] == 1
    assert server.hits["/hang"] == 2
    assert server.hits["/robots.txt"] == 1, "robots.txt is fetched once per origin"
    assert server.hits["/private/photo.jpg"] == server.hits["/private/via-redirect.jpg"] == 0
    assert server.hits["/noai"] == 1, "an opt-out is final, not retried"
    assert server.seen_user_agents == {"carmodels-tests/1.0"}
    assert all(server.accept_by_path[p].startswith("image/jpeg") for p in ["/good.png", "/hang"])

    text_jpeg = raw.loc[server.url("/jpeg-as-text")]
    assert text_jpeg["content_type"] == "text/plain"
    assert text_jpeg["image_bytes"] == GOOD_JPEG
    assert text_jpeg["sha256"] == hashlib.sha256(GOOD_JPEG).hexdigest()
    assert (text_jpeg["width"], text_jpeg["height"]) == (64, 48)
    assert raw.loc[server.url("/img/../missing"), "status"] == 404
    assert str(raw["status"].dtype) == str(raw["width"].dtype) == "Int32"
    assert pd.isna(raw.loc[server.url("/hang"), "status"])
    failed = raw[raw["outcome"] != "ok"]
    assert failed["image_bytes"].isna().all() and failed["sha256"].isna().all()

    # Shards: at most shard_size rows, fixed leading columns, metadata as strings.
    assert [p.name for p in result.shard_paths] == [f"raw-{i:05d}.parquet" for i in range(5)]
    for path in result.shard_paths:
        schema = pq.read_schema(path)
        assert schema.names == [*RAW_COLUMNS, "make"]
        assert str(schema.field("status").type) == "int32"
        assert pq.read_metadata(path).num_rows <= FAST.shard_size
    assert raw.loc[urls[0], "make"] == "make0"


def test_huge_content_length_is_refused_without_reading(server, tmp_path):
    started = time.perf_counter()
    result = download_images(manifest_for([server.url("/huge")]), tmp_path, FAST)
    assert result.outcome_counts == {"too_large": 1}
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_private_addresses_are_refused_by_default(server, tmp_path, host):
    path = f"/img/private-{host.strip('[]')}.jpg"
    config = replace(FAST, allow_private_networks=False)
    result = download_images(manifest_for([f"http://{host}:{server.port}{path}"]), tmp_path, config)
    assert result.outcome_counts == {"private_address_refused": 1}
    assert server.hits[path] == 0, "no request may reach a refused address"


def test_redirect_to_private_address_is_refused(server, tmp_path, monkeypatch):
    # Pretend 127.0.0.1 is a public address, so only the redirect's target (::1) is private.
    monkeypatch.setattr(scrape_net, "is_public_address", lambda address: address == "127.0.0.1")
    config = replace(FAST, allow_private_networks=False)
    result = download_images(manifest_for([server.url("/redirect-ipv6")]), tmp_path, config)
    assert result.outcome_counts == {"private_address_refused": 1}
    assert server.hits["/redirect-ipv6"] == 1
    assert server.hits["/img/v6.jpg"] == 0


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("::ffff:127.0.0.1", False),
        ("not-an-ip", False),
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(address) is public


def test_guarded_resolver_drops_private_answers():
    class FakeResolver:
        def __init__(self, answers: list[str]) -> None:
            self.answers = answers

        async def resolve(self, host, port=0, family=socket.AF_INET):
            return [
                {
                    "hostname": host,
                    "host": a,
                    "port": port,
                    "family": family,
                    "proto": 0,
                    "flags": 0,
                }
                for a in self.answers
            ]

        async def close(self) -> None:
            pass

    mixed = GuardedResolver(FakeResolver(["10.0.0.5", "93.184.216.34"]))
    assert [r["host"] for r in asyncio.run(mixed.resolve("example.com", 80))] == ["93.184.216.34"]
    internal = GuardedResolver(FakeResolver(["127.0.0.1", "169.254.169.254"]))
    with pytest.raises(PrivateAddressRefused, match="169.254.169.254"):
        asyncio.run(internal.resolve("metadata.internal", 80))


def test_resume_fetches_only_missing_urls(server, tmp_path):
    urls = [server.url(f"/img/resume-{i}.jpg") for i in range(10)]
    first = download_images(manifest_for(urls), tmp_path, FAST)
    assert [p.name for p in first.shard_paths] == [f"raw-0000{i}.parquet" for i in range(3)]

    lost = pq.read_table(first.shard_paths[-1], columns=["url"]).column("url").to_pylist()
    first.shard_paths[-1].unlink()  # as if the run had crashed before its last shard
    (tmp_path / "raw-00001.parquet.tmp-999").write_bytes(b"half-written")  # a crash leftover

    second = download_images(manifest_for(urls), tmp_path, FAST)
    assert second.n_skipped_existing == 10 - len(lost)
    assert second.n_fetched == len(lost)
    assert [p.name for p in second.shard_paths] == ["raw-00002.parquet"]
    assert all(
        server.hits[u.removeprefix(server.base_url)] == (2 if u in lost else 1) for u in urls
    )

    raw = read_raw(tmp_path)
    assert sorted(raw["url"]) == sorted(urls)
    assert (raw["outcome"] == "ok").all()

    third = download_images(manifest_for(urls), tmp_path, FAST)
    assert (third.n_fetched, third.n_skipped_existing, third.shard_paths) == (0, 10, [])


def test_crash_keeps_fetched_rows_and_resume_finishes(server, tmp_path):
    urls = [server.url(f"/img/crash-{i}.jpg") for i in range(10)]

    def crash_after_five(done: int, total: int) -> None:
        if done == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        download_images(manifest_for(urls), tmp_path, FAST, on_progress=crash_after_five)
    saved = read_raw(tmp_path)  # every written shard is whole and readable
    assert len(saved) == 5 and (saved["outcome"] == "ok").all()

    resumed = download_images(manifest_for(urls), tmp_path, FAST)
    assert (resumed.n_skipped_existing, resumed.n_fetched) == (5, 5)
    assert sorted(read_raw(tmp_path)["url"]) == sorted(urls)


def test_retry_failed_refetches_transient_failures(server, tmp_path):
    urls = [server.url("/down/retry"), server.url("/img/../retry-404")]
    server.down = True
    config = replace(FAST, max_retries=0)
    first = download_images(manifest_for(urls), tmp_path, config)
    assert first.outcome_counts == {"http_503": 1, "http_404": 1}

    server.down = False
    skipped = download_images(manifest_for(urls), tmp_path, config)
    assert (skipped.n_fetched, skipped.n_skipped_existing) == (0, 2)

    retried = download_images(manifest_for(urls), tmp_path, replace(config, retry_failed=True))
    assert (retried.n_fetched, retried.n_skipped_existing) == (1, 1)  # the 404 is not transient
    raw = read_raw(tmp_path, columns=["url", "outcome"]).set_index("url")
    assert list(raw.columns) == ["outcome"]
    assert raw["outcome"].to_dict() == {urls[1]: "http_404", urls[0]: "ok"}
    all_rows = pd.concat(pq.read_table(p).to_pandas() for p in sorted(tmp_path.glob("raw-*")))
    assert (all_rows["url"] == urls[0]).sum() == 2  # the old row stays; the new one wins


def test_metadata_columns_that_clash_with_raw_columns_are_prefixed(server, tmp_path):
    frame = manifest_for(
        [server.url("/img/meta.jpg"), " 127.0.0.1:1/bad url"], width=["800", "1"], year=[2015, 2016]
    )
    download_images(frame, tmp_path, FAST)
    raw = read_raw(tmp_path)
    assert len(raw) == 1  # the unusable URL was skipped
    assert raw.loc[0, "manifest_width"] == "800" and raw.loc[0, "width"] == 64
    assert raw.loc[0, "year"] == "2015"


def test_empty_manifest_writes_nothing(tmp_path):
    result = download_images(manifest_for([]), tmp_path, FAST)
    assert (result.n_urls, result.n_fetched, result.shard_paths) == (0, 0, [])
    assert result.failures.empty


def test_read_raw_errors(tmp_path, server):
    with pytest.raises(FileNotFoundError, match="materialise `raw_images`"):
        read_raw(tmp_path)
    download_images(manifest_for([server.url("/img/err.jpg")]), tmp_path, FAST)
    with pytest.raises(KeyError, match="nope"):
        read_raw(tmp_path, columns=["url", "nope"])


def test_manifest_without_url_column_is_rejected(tmp_path):
    with pytest.raises(KeyError, match="'url' column"):
        download_images(pd.DataFrame({"src": ["a.example.com/x.jpg"]}), tmp_path, FAST)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="concurrency"):
        ScrapeConfig(concurrency=0)
    with pytest.raises(ValueError, match="max_retries"):
        ScrapeConfig(max_retries=-1)


def test_crawl_follows_next_links_and_reads_json_ld(server):
    df = crawl_listings(server.url("/cars/page1"), allow_private_networks=True)

    assert df.attrs["pages_fetched"] == 3  # page3 → page1 is not revisited, page4 is off-host
    assert server.hits["/cars/page4"] == 0
    rows = df.set_index("url")
    assert list(rows.index) == [
        server.url("/img/a1.jpg"),
        server.url("/cars/img/a2.jpg"),
        server.url("/img/b1.jpg"),
        server.url("/img/c1.jpg"),
    ]
    audi = rows.loc[server.url("/img/a1.jpg")]
    assert audi.to_dict() == {
        "listing_url": server.url("/listing/1"),
        "name": "2015 Audi A3",
        "make": "Audi",
        "model": "A3",
        "year": "2015",
        "type": "convertible",
        "price": "22200",
        "mileage": "41822",
    }
    jaguar = rows.loc[server.url("/img/b1.jpg")]
    assert (jaguar["make"], jaguar["model"], jaguar["year"], jaguar["price"]) == (
        "Jaguar", "XK", "2011", "34300"
    )  # fmt: skip
    assert jaguar["listing_url"] == server.url("/cars/page2")
    assert rows.loc[server.url("/img/c1.jpg"), "make"] == "Mazda"


def test_crawl_limits(server):
    first_page_only = crawl_listings(
        server.url("/cars/page1"), max_pages=1, allow_private_networks=True
    )
    assert first_page_only.attrs["pages_fetched"] == 1
    assert len(first_page_only) == 2

    everywhere = crawl_listings(
        server.url("/cars/page1"), same_host=False, allow_private_networks=True
    )
    assert everywhere.attrs["pages_fetched"] == 4
    assert f"http://localhost:{server.port}/img/d1.jpg" in set(everywhere["url"])

    refused = crawl_listings(server.url("/cars/page1"))
    assert refused.attrs == {**refused.attrs, "pages_fetched": 0, "pages_failed": 1}
    assert list(refused.columns)[:2] == ["url", "listing_url"] and refused.empty


def test_parse_listing_page_handles_item_lists_and_base_href():
    html = _page(
        '<base href="https://cdn.example.com/photos/">',
        {
            "@type": "ItemList",
            "itemListElement": [
                {"@type": "ListItem", "item": {"@type": "schema:Car", "image": "x.jpg"}},
                {"@type": "ListItem", "item": {"@type": "Person", "image": "face.jpg"}},
            ],
        },
    )
    page = parse_listing_page(html, "https://dealer.example.com/list")
    assert [r["url"] for r in page.rows] == ["https://cdn.example.com/photos/x.jpg"]
    assert page.next_urls == []
