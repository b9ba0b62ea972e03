"""The demo catalog as a small used-car listing site, served by aiohttp on 127.0.0.1.

Routes:

- ``/``: redirects to the first listing page;
- ``/listings?page=N``: 24 listings per page, each one a schema.org ``Car`` in the page's
  JSON-LD, with ``<link rel="next">`` / ``<a rel="next">`` to the following page;
- ``/listing/<id>``: one listing;
- ``/images/<name>.jpg``: the photos (ETag, Last-Modified; 404 for the planted dead links);
- ``/manifest.csv``: every image URL with its listing's metadata, for the manifest-file path;
- ``/robots.txt``: everything allowed (with an optional ``Crawl-delay``).

`DemoServer` runs the app on a background thread with its own event loop, for tests and for
the pipeline's demo profile; `run_demo_server` serves in the foreground for the CLI.

For tests of politeness, a server can log every request (`RequestLog`: host, path, and when
its handling started and its response was written) and answer photos slowly
(``image_delay_s``), so that requests overlap and their pace can be measured.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any

from aiohttp import web

from carmodels.demo.catalog import DEFAULT_N_LISTINGS, DemoCatalog, DemoListing, build_catalog

LISTINGS_PER_PAGE = 24
#: The first listing page, where a crawl of the catalog starts.
START_PATH = "/listings?page=1"
#: When the photos were "uploaded": fixed, so that responses are reproducible.
PHOTOS_LAST_MODIFIED = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
#: How long `DemoServer.start` waits for the socket, and `stop` for the thread, in seconds.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
#: How long in-flight requests may finish when the server stops.
SHUTDOWN_GRACE_S = 1.0

CATALOG_KEY = web.AppKey("catalog", DemoCatalog)
PAGE_SIZE_KEY = web.AppKey("listings_per_page", int)
IMAGE_DELAY_KEY = web.AppKey("image_delay_s", float)
CRAWL_DELAY_KEY = web.AppKey("crawl_delay_s", float)


# --------------------------------------------------------------------------- request log


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered; times are ``time.monotonic()`` of the server's process."""

    host: str
    path: str
    status: int
    #: When the handler started.
    start: float
    #: When the whole response had been handed to the socket.
    end: float


class RequestLog:
    """Every request a `DemoServer` answers, in the order they finished (thread-safe).

    A request is logged once its response is written, which can be a moment after the client
    has read it: for exact counts, read the log after the server has stopped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self, path_prefix: str = "") -> list[RequestRecord]:
        """A copy of the records so far, those whose path starts with ``path_prefix``."""
        with self._lock:
            return [r for r in self._records if r.path.startswith(path_prefix)]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


def _logging_middleware(log: RequestLog) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            # Written here rather than after the middleware returns, so that ``end`` is when
            # the client can have the whole response: a request is in flight until then.
            await response.prepare(request)
            await response.write_eof()
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            log.add(RequestRecord(request.host, request.path_qs, status, start, time.monotonic()))

    return record


# --------------------------------------------------------------------------- pages


def car_json_ld(listing: DemoListing, origin: str) -> dict[str, Any]:
    """A listing as a schema.org ``Car`` with absolute URLs under ``origin``."""
    return {
        "@context": "https://schema.org",
        "@type": "Car",
        "name": listing.name,
        "brand": {"@type": "Brand", "name": listing.make},
        "model": listing.model,
        "vehicleModelDate": str(listing.year),
        "bodyType": listing.body_type,
        "color": listing.colour,
        "offers": {"@type": "Offer", "price": listing.price, "priceCurrency": "USD"},
        "mileageFromOdometer": {
            "@type": "QuantitativeValue",
            "value": listing.mileage,
            "unitCode": "SMI",
        },
        "image": [origin + path for path in listing.image_paths],
        "url": f"{origin}/listing/{listing.id}",
    }


def _json_ld_script(data: Any) -> str:
    # "</" inside a string would end the script element early.
    text = json.dumps(data, indent=1).replace("</", "<\\/")
    return f'<script type="application/ld+json">\n{text}\n</script>'


def _listing_card(listing: DemoListing) -> str:
    name = html.escape(listing.name)
    photos = "".join(
        f'<img src="{html.escape(path)}" alt="{name}" width="320" loading="lazy">'
        for path in listing.image_paths
    )
    return (
        f'<article class="listing"><h2><a href="/listing/{listing.id}">{name}</a></h2>'
        f"{photos}<p>${listing.price:,} &middot; {listing.mileage:,} miles &middot; "
        f"{html.escape(listing.colour)} {html.escape(listing.body_type)}</p></article>"
    )


def _page(title: str, head: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>\n{head}\n</head>\n<body>\n{body}\n</body></html>\n"
    )


async def _root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(START_PATH)


async def _listings(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG_KEY]
    per_page = request.app[PAGE_SIZE_KEY]
    n_pages = max(1, math.ceil(len(catalog.listings) / per_page))
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="page must be a whole number, e.g. ?page=1") from None
    if not 1 <= page <= n_pages:
        raise web.HTTPNotFound(text=f"no page {page}: pages run from 1 to {n_pages}")

    origin = str(request.url.origin())
    listings = catalog.listings[(page - 1) * per_page : page * per_page]
    head = [_json_ld_script([car_json_ld(listing, origin) for listing in listings])]
    nav = []
    if page > 1:
        head.append(f'<link rel="prev" href="/listings?page={page - 1}">')
        nav.append(f'<a rel="prev" href="/listings?page={page - 1}">Previous</a>')
    if page < n_pages:
        head.append(f'<link rel="next" href="/listings?page={page + 1}">')
        nav.append(f'<a rel="next" href="/listings?page={page + 1}">Next</a>')
    body = (
        f"<h1>Used cars: page {page} of {n_pages}</h1>\n"
        + "\n".join(_listing_card(listing) for listing in listings)
        + f"\n<nav>{' '.join(nav)}</nav>"
    )
    return web.Response(
        text=_page(f"Used cars, page {page}", "\n".join(head), body), content_type="text/html"
    )


async def _listing(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG_KEY]
    try:
        listing = catalog.listing(request.match_info["listing_id"])
    except KeyError:
        raise web.HTTPNotFound(text="no such listing") from None
    head = _json_ld_script(car_json_ld(listing, str(request.url.origin())))
    body = _listing_card(listing) + f'\n<p><a href="{START_PATH}">All listings</a></p>'
    return web.Response(text=_page(listing.name, head, body), content_type="text/html")


async def _image(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG_KEY]
    path = f"/images/{request.match_info['name']}"
    if not catalog.serves(path):
        raise web.HTTPNotFound(text=f"no image at {path}")
    delay = request.app[IMAGE_DELAY_KEY]
    if delay:
        await asyncio.sleep(delay)  # a slow site, for tests of politeness and lost workers
    # Drawing a photo the first time takes tens of milliseconds: keep the loop responsive.
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(None, catalog.image_bytes, path)
    etag = catalog.etag(path)
    headers = {
        "ETag": etag,
        "Last-Modified": format_datetime(PHOTOS_LAST_MODIFIED, usegmt=True),
        "Cache-Control": "public, max-age=86400",
    }
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    # The planted non-image is served as image/jpeg too: that is the defect.
    return web.Response(body=data, content_type="image/jpeg", headers=headers)


async def _manifest(request: web.Request) -> web.Response:
    frame = request.app[CATALOG_KEY].manifest_frame(str(request.url.origin()))
    return web.Response(text=frame.to_csv(index=False), content_type="text/csv")


async def _robots(request: web.Request) -> web.Response:
    text = "User-agent: *\nAllow: /\n"
    crawl_delay = request.app[CRAWL_DELAY_KEY]
    if crawl_delay:
        text += f"Crawl-delay: {crawl_delay:g}\n"
    return web.Response(text=text, content_type="text/plain")


def _check_delays(image_delay_s: float, crawl_delay_s: float) -> None:
    if image_delay_s < 0 or crawl_delay_s < 0:
        raise ValueError(
            f"image_delay_s and crawl_delay_s must be >= 0, got {image_delay_s}, {crawl_delay_s}"
        )


def make_app(
    catalog: DemoCatalog,
    *,
    listings_per_page: int = LISTINGS_PER_PAGE,
    request_log: RequestLog | None = None,
    image_delay_s: float = 0.0,
    crawl_delay_s: float = 0.0,
) -> web.Application:
    """The listing site for ``catalog`` as an aiohttp application.

    ``request_log`` records every request; ``image_delay_s`` holds each photo's response
    back that long; ``crawl_delay_s`` puts a ``Crawl-delay`` in robots.txt.
    """
    if listings_per_page < 1:
        raise ValueError(f"listings_per_page must be at least 1, got {listings_per_page}")
    _check_delays(image_delay_s, crawl_delay_s)
    middlewares = [_logging_middleware(request_log)] if request_log is not None else []
    app = web.Application(middlewares=middlewares)
    app[CATALOG_KEY] = catalog
    app[PAGE_SIZE_KEY] = listings_per_page
    app[IMAGE_DELAY_KEY] = float(image_delay_s)
    app[CRAWL_DELAY_KEY] = float(crawl_delay_s)
    app.router.add_get("/", _root)
    app.router.add_get("/listings", _listings)
    app.router.add_get("/listing/{listing_id}", _listing)
    app.router.add_get(r"/images/{name:[A-Za-z0-9_.-]+\.jpg}", _image)
    app.router.add_get("/manifest.csv", _manifest)
    app.router.add_get("/robots.txt", _robots)
    return app


# --------------------------------------------------------------------------- running it


class DemoServer:
    """The demo site on a background thread: ``with DemoServer() as server: ...``.

    ``port=0`` picks a free port. The catalog is built at construction (cheap: photos are
    drawn on first request), so ``.catalog`` is available before the server starts; pass
    ``catalog`` to serve one already built (its drawn photos are reused).
    ``record_requests`` keeps a `RequestLog` in ``.request_log``; ``image_delay_s`` and
    ``crawl_delay_s`` are `make_app`'s.
    """

    def __init__(
        self,
        seed: int = 0,
        n_listings: int = DEFAULT_N_LISTINGS,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        catalog: DemoCatalog | None = None,
        listings_per_page: int = LISTINGS_PER_PAGE,
        record_requests: bool = False,
        image_delay_s: float = 0.0,
        crawl_delay_s: float = 0.0,
    ) -> None:
        _check_delays(image_delay_s, crawl_delay_s)
        self.catalog = catalog if catalog is not None else build_catalog(seed, n_listings)
        self.host = host
        self.listings_per_page = listings_per_page
        self.request_log: RequestLog | None = RequestLog() if record_requests else None
        self.image_delay_s = image_delay_s
        self.crawl_delay_s = crawl_delay_s
        self._requested_port = port
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # ----------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the demo server is not running: call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        # A wildcard bind is reachable on loopback; a URL cannot name "0.0.0.0" usefully.
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    @property
    def start_url(self) -> str:
        """The first listing page, where a crawl starts."""
        return f"{self.base_url}{START_PATH}"

    @property
    def manifest_url(self) -> str:
        return f"{self.base_url}/manifest.csv"

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> DemoServer:
        if self._thread is not None:
            raise RuntimeError("the demo server is already running")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._serve, name="carmodels-demo", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the demo server did not start within {START_TIMEOUT_S:.0f} s")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError(
                f"the demo server could not start on {self.host}:{self._requested_port}: "
                f"{self._startup_error} (if the port is taken, pick another or stop what uses it)"
            ) from self._startup_error
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread; safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"the demo server thread did not stop within {STOP_TIMEOUT_S} s")
        self._thread = None
        self._port = None

    def __enter__(self) -> DemoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner: web.AppRunner | None = None
        try:
            app = make_app(
                self.catalog,
                listings_per_page=self.listings_per_page,
                request_log=self.request_log,
                image_delay_s=self.image_delay_s,
                crawl_delay_s=self.crawl_delay_s,
            )
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self._requested_port)
            loop.run_until_complete(site.start())
            self._port = int(runner.addresses[0][1])
        except BaseException as exc:  # reported to the caller of start()
            self._startup_error = exc
            if runner is not None:
                loop.run_until_complete(runner.cleanup())
            loop.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()


@dataclass(frozen=True)
class DemoServerConfig:
    """The settings of `run_demo_server` (``carmodels demo-server``); its defaults are these."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=8765, metadata={"help": "port to listen on; 0 = a free one"})
    seed: int = field(
        default=0, metadata={"help": "catalog seed: same seed, same listings and photos"}
    )
    n_listings: int = field(
        default=DEFAULT_N_LISTINGS, metadata={"help": "number of listings in the catalog"}
    )


def run_demo_server(
    host: str = DemoServerConfig.host,
    port: int = DemoServerConfig.port,
    seed: int = DemoServerConfig.seed,
    n_listings: int = DemoServerConfig.n_listings,
) -> None:
    """Serve the demo catalog until Ctrl-C, printing where to start."""
    server = DemoServer(seed=seed, n_listings=n_listings, host=host, port=port)
    with server:
        print(f"demo catalog: {len(server.catalog.listings)} listings (seed {seed})")
        print(f"  listing pages: {server.start_url}")
        print(f"  manifest:      {server.manifest_url}")
        print("Ctrl-C to stop.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping the demo server")
