"""Listing crawler: follow ``rel="next"`` pagination and read schema.org JSON-LD for car photos.

Polite like the downloader: robots.txt is asked before every page (and redirect hop) through
the same per-origin :class:`carmodels.scrape.robots.RobotsCache`, disallowed pages are logged
and counted instead of fetched, and requests to one host are spaced by its ``Crawl-delay``
and by ``per_host_rate``, whichever is slower (:class:`carmodels.scrape.net.HostPacer`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pandas as pd

from carmodels.scrape.manifest import tidy_listing_frame
from carmodels.scrape.net import (
    DEFAULT_USER_AGENT,
    BodyTooLarge,
    HostPacer,
    SessionSettings,
    check_destination,
    is_private_refusal,
    normalise_origins,
    open_session,
    read_body,
    text_encoding,
)
from carmodels.scrape.robots import RobotsCache, RobotsSettings, RobotsVerdict
from carmodels.scrape.run import run_sync
from carmodels.scrape.urls import host_of, normalise_url, origin_of, resolve_url

log = logging.getLogger(__name__)

#: schema.org types whose JSON-LD describes a car for sale.
LISTING_TYPES = frozenset({"car", "vehicle", "product", "motorizedbicycle", "motorcycle"})
#: Columns of the crawler's output, in order.
LISTING_COLUMNS = (
    "url",
    "listing_url",
    "name",
    "make",
    "model",
    "year",
    "type",
    "price",
    "mileage",
)
#: Pages fetched at most per crawl unless the caller says otherwise.
DEFAULT_MAX_PAGES = 50
#: Largest HTML page read; listing pages are far smaller, anything bigger is not one.
MAX_PAGE_BYTES = 5 * 1024 * 1024
PAGE_CHUNK_BYTES = 64 * 1024
#: Deadline for one request of a page (each redirect hop gets its own).
PAGE_TIMEOUT_S = 30.0
#: Redirects followed per page.
MAX_PAGE_REDIRECTS = 5
# Keys under which JSON-LD nests further nodes (graphs, item lists, page entities).
_CONTAINER_KEYS = ("@graph", "itemListElement", "item", "mainEntity", "mainEntityOfPage")
_YEAR = re.compile(r"^\s*(\d{4})")


class _PageParser(HTMLParser):
    """Collects JSON-LD script bodies, ``rel="next"`` links and the ``<base href>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.json_ld: list[str] = []
        self.next_links: list[str] = []
        self.base_href: str | None = None
        self._in_json_ld = False
        self._buffer: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name.lower(): (value or "") for name, value in attrs}
        if tag == "script" and attributes.get("type", "").strip().lower() == "application/ld+json":
            self._in_json_ld, self._buffer = True, []
        elif tag in ("a", "link") and "next" in attributes.get("rel", "").lower().split():
            if attributes.get("href"):
                self.next_links.append(attributes["href"])
        elif tag == "base" and attributes.get("href") and self.base_href is None:
            self.base_href = attributes["href"]

    def handle_data(self, data: str) -> None:
        if self._in_json_ld:
            self._buffer.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._in_json_ld:
            self.json_ld.append("".join(self._buffer))
            self._in_json_ld = False


@dataclass(frozen=True)
class ParsedPage:
    """What one listing page offers: listing rows and the pages it links to as "next"."""

    rows: list[dict[str, str | None]]
    next_urls: list[str]


def parse_listing_page(html: str, page_url: str) -> ParsedPage:
    """Extract car listings (one row per image URL) and ``rel="next"`` links from ``html``.

    Relative URLs are resolved against ``<base href>`` when present, else ``page_url``.
    Scripts that are not valid JSON are skipped: one broken widget should not lose a page.
    """
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    base = resolve_url(page_url, parser.base_href) if parser.base_href else None
    base = base or page_url

    rows: list[dict[str, str | None]] = []
    for script in parser.json_ld:
        try:
            document = json.loads(script, strict=False)  # strict=False: raw newlines in strings
        except json.JSONDecodeError as error:
            log.debug("skipping invalid JSON-LD on %s: %s", page_url, error)
            continue
        for item in _listing_nodes(document):
            rows.extend(_rows_for_item(item, base, page_url))
    next_urls = [u for u in (resolve_url(base, href) for href in parser.next_links) if u]
    return ParsedPage(rows, next_urls)


def _types_of(node: dict[str, Any]) -> set[str]:
    """``@type`` as lower-case bare names: ``"Car"``, ``["Car", "Product"]``, ``schema:Car``."""
    raw = node.get("@type")
    types = raw if isinstance(raw, list) else [raw]
    return {re.split(r"[:/#]", t)[-1].lower() for t in types if isinstance(t, str)}


def _listing_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every Car/Vehicle/Product node in a JSON-LD document, however it is nested."""
    if isinstance(node, list):
        for element in node:
            yield from _listing_nodes(element)
    elif isinstance(node, dict):
        if _types_of(node) & LISTING_TYPES:
            yield node
            return
        for key in _CONTAINER_KEYS:
            if key in node:
                yield from _listing_nodes(node[key])


def _text(value: Any) -> str | None:
    """A scalar as text; a node by its ``name``; a list by its first usable element."""
    if isinstance(value, list):
        return next((t for t in map(_text, value) if t), None)
    if isinstance(value, dict):
        return _text(value.get("name") or value.get("value") or value.get("@value"))
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text or None


def _image_refs(value: Any) -> Iterator[str]:
    """Image URLs from a string, an ImageObject (``url``/``contentUrl``) or a list of either."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for element in value:
            yield from _image_refs(element)
    elif isinstance(value, dict):
        reference = value.get("contentUrl") or value.get("url")
        if reference is not None:
            yield from _image_refs(reference)


def _first_of(items: Any) -> Any:
    return items[0] if isinstance(items, list) and items else items


def _price(offers: Any) -> str | None:
    for offer in offers if isinstance(offers, list) else [offers]:
        if not isinstance(offer, dict):
            continue
        price = offer.get("price") or offer.get("lowPrice")
        specification = _first_of(offer.get("priceSpecification"))
        if price is None and isinstance(specification, dict):
            price = specification.get("price")
        if _text(price):
            return _text(price)
    return None


def _year(item: dict[str, Any]) -> str | None:
    for key in ("vehicleModelDate", "productionDate", "modelDate"):
        text = _text(item.get(key))
        if text:
            match = _YEAR.match(text)
            return match.group(1) if match else text
    return None


def _rows_for_item(
    item: dict[str, Any], base_url: str, page_url: str
) -> Iterable[dict[str, str | None]]:
    listing_url = resolve_url(base_url, item["url"]) if isinstance(item.get("url"), str) else None
    common = {
        "listing_url": listing_url or page_url,
        "name": _text(item.get("name")),
        "make": _text(item.get("brand")) or _text(item.get("manufacturer")),
        "model": _text(item.get("model")),
        "year": _year(item),
        "type": _text(item.get("bodyType")),
        "price": _price(item.get("offers")),
        "mileage": _text(item.get("mileageFromOdometer")),
    }
    for reference in _image_refs(item.get("image")):
        image_url = resolve_url(base_url, reference)
        if image_url:
            yield {"url": image_url, **common}


@dataclass
class _Crawl:
    """What :func:`acrawl_listings` shares with :func:`_fetch_page` for one crawl."""

    session: aiohttp.ClientSession
    allow_private_networks: bool
    allowed_private_origins: tuple[str, ...]
    robots: RobotsCache | None
    pacer: HostPacer

    async def robots_verdict(self, url: str) -> RobotsVerdict:
        return RobotsVerdict.ALLOWED if self.robots is None else await self.robots.verdict(url)

    async def pace(self, url: str) -> None:
        delay = 0.0 if self.robots is None else self.robots.crawl_delay_s(url)
        await self.pacer.wait(host_of(url), delay)


async def acrawl_listings(
    start_urls: str | Sequence[str],
    max_pages: int = DEFAULT_MAX_PAGES,
    same_host: bool = True,
    allow_private_networks: bool = False,
    user_agent: str = DEFAULT_USER_AGENT,
    respect_robots: bool = True,
    per_host_rate: float = 0.0,
    max_crawl_delay_s: float = 60.0,
    allowed_private_origins: Sequence[str] = (),
) -> pd.DataFrame:
    """Async form of :func:`crawl_listings`."""
    if max_pages < 1:
        raise ValueError(f"max_pages must be at least 1, got {max_pages}")
    if per_host_rate < 0:
        raise ValueError(f"per_host_rate must be >= 0 (0: unlimited), got {per_host_rate}")
    starts = [start_urls] if isinstance(start_urls, str) else list(start_urls)
    queue: deque[str] = deque()
    for raw in starts:
        url = normalise_url(raw)
        if url is None:
            raise ValueError(f"start URL {raw!r} is not an http(s) URL")
        queue.append(url)
    allowed_hosts = {host_of(u) for u in queue}
    seen: set[str] = set(queue)
    rows: list[dict[str, str | None]] = []
    pages_fetched = pages_failed = pages_denied = 0
    origins = normalise_origins(allowed_private_origins)
    settings = SessionSettings(
        user_agent=user_agent,
        allow_private_networks=allow_private_networks,
        allowed_private_origins=origins,
    )
    robots_settings = RobotsSettings(
        user_agent=user_agent,
        allow_private_networks=allow_private_networks,
        allowed_private_origins=origins,
        max_crawl_delay_s=max_crawl_delay_s,
    )
    async with open_session(settings) as session:
        robots = RobotsCache(session, robots_settings) if respect_robots else None
        crawl = _Crawl(session, allow_private_networks, origins, robots, HostPacer(per_host_rate))
        try:
            while queue and pages_fetched + pages_failed < max_pages:
                page_url = queue.popleft()
                outcome, final_url, html = await _fetch_page(crawl, page_url)
                if outcome == RobotsVerdict.DENIED.value:
                    pages_denied += 1  # no request was made, so it does not use up max_pages
                    continue
                if html is None:
                    pages_failed += 1
                    continue
                pages_fetched += 1
                page = parse_listing_page(html, final_url)
                rows.extend(page.rows)
                seen.add(final_url)
                for next_url in page.next_urls:
                    if next_url in seen or (same_host and host_of(next_url) not in allowed_hosts):
                        continue
                    seen.add(next_url)
                    queue.append(next_url)
        finally:
            if robots is not None:
                await robots.close()
    log.info(
        "crawled %d page(s) (%d failed, %d disallowed by robots.txt): %d image rows",
        pages_fetched,
        pages_failed,
        pages_denied,
        len(rows),
    )
    frame = tidy_listing_frame(pd.DataFrame(rows, columns=list(LISTING_COLUMNS)), "url")
    frame.attrs.update(
        pages_fetched=pages_fetched, pages_failed=pages_failed, pages_robots_denied=pages_denied
    )
    return frame


async def _fetch_page(crawl: _Crawl, url: str) -> tuple[str, str, str | None]:
    """``(outcome, final URL, HTML)`` of a page; the HTML is None (and the reason logged)
    unless the outcome is ``ok``. Outcomes: ``ok``, ``robots_denied``, ``robots_unavailable``,
    ``failed``.

    robots.txt and the pacing wait come before each hop's deadline, so that a long
    ``Crawl-delay`` cannot make a page time out.
    """
    try:
        for _ in range(MAX_PAGE_REDIRECTS + 1):
            check_destination(
                host_of(url), crawl.allow_private_networks, origin_of(url),
                crawl.allowed_private_origins,
            )  # fmt: skip
            verdict = await crawl.robots_verdict(url)
            if verdict is not RobotsVerdict.ALLOWED:
                log.warning("page %s not fetched: %s", url, verdict.value)
                return verdict.value, url, None
            await crawl.pace(url)
            async with asyncio.timeout(PAGE_TIMEOUT_S):
                async with crawl.session.get(url, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in (301, 302, 303, 307, 308) and location:
                        next_url = resolve_url(url, location)
                        if next_url is None:
                            log.warning("page %s redirects to unusable %r", url, location)
                            return "failed", url, None
                        url = next_url
                        continue
                    if response.status != 200:
                        log.warning("page %s answered HTTP %d", url, response.status)
                        return "failed", url, None
                    body = await read_body(response, MAX_PAGE_BYTES, PAGE_CHUNK_BYTES)
                    return "ok", url, body.decode(text_encoding(response), errors="replace")
        log.warning("page %s: more than %d redirects", url, MAX_PAGE_REDIRECTS)
    except BodyTooLarge:
        log.warning("page %s is over %d bytes; skipped", url, MAX_PAGE_BYTES)
    except TimeoutError:
        log.warning("page %s timed out after %.0f s", url, PAGE_TIMEOUT_S)
    except (aiohttp.ClientError, OSError) as error:
        reason = "private address refused" if is_private_refusal(error) else repr(error)
        log.warning("page %s failed: %s", url, reason)
    return "failed", url, None


def crawl_listings(
    start_urls: str | Sequence[str],
    max_pages: int = DEFAULT_MAX_PAGES,
    same_host: bool = True,
    allow_private_networks: bool = False,
    user_agent: str = DEFAULT_USER_AGENT,
    respect_robots: bool = True,
    per_host_rate: float = 0.0,
    max_crawl_delay_s: float = 60.0,
    allowed_private_origins: Sequence[str] = (),
) -> pd.DataFrame:
    """Crawl listing pages from ``start_urls`` and return one row per car image URL.

    Follows ``<link rel="next">`` / ``<a rel="next">`` up to ``max_pages`` pages in all,
    staying on the start URLs' hosts unless ``same_host=False``, and never fetching a page
    twice. Reads schema.org ``Car``/``Vehicle``/``Product`` JSON-LD (also inside ``@graph``
    and top-level lists) into columns ``url, listing_url, name, make, model, year, type,
    price, mileage``, normalised like :func:`read_manifest` (one row per distinct URL).
    Pages that fail are logged and skipped; ``attrs`` counts ``pages_fetched``,
    ``pages_failed`` and ``pages_robots_denied``. With ``respect_robots`` (the default) a page
    robots.txt disallows for ``user_agent`` is logged and not fetched, and a site whose
    robots.txt is unreachable (5xx, timeout) is not crawled; requests to one host start at
    least its robots.txt ``Crawl-delay`` (capped at ``max_crawl_delay_s``) and
    ``1 / per_host_rate`` seconds apart, the longer of the two. Private and loopback
    addresses are refused unless ``allow_private_networks``, or their ``scheme://host:port``
    is one of ``allowed_private_origins``.
    """
    return run_sync(
        acrawl_listings(
            start_urls,
            max_pages,
            same_host,
            allow_private_networks,
            user_agent,
            respect_robots,
            per_host_rate,
            max_crawl_delay_s,
            allowed_private_origins,
        )
    )
