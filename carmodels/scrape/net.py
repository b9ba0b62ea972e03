"""The HTTP client side shared by the crawler and the downloader.

Scraping arbitrary URLs from a manifest or from third-party pages is a server-side request
forgery risk: a listing could point at ``http://169.254.169.254/`` (cloud metadata) or at a
service on the scraping machine. So by default every destination address is checked *after*
DNS resolution (a name can resolve to a private address) by a resolver wrapper, and IP
literals, which aiohttp never passes to the resolver, are checked before each request and each
redirect hop.
"""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from carmodels import __version__

#: Identifies the scraper to site operators, with a place to read about it.
DEFAULT_USER_AGENT = f"carmodels/{__version__} (+https://github.com/carmodels)"


class PrivateAddressRefused(OSError):
    """The destination is private, loopback, link-local, multicast or otherwise not public."""


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IP literal) is a globally routable unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return ip.is_global and not ip.is_multicast


def ip_literal(host: str | None) -> str | None:
    """``host`` when it is an IP literal (brackets stripped), else None."""
    if not host:
        return None
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return None
    return bare


def check_destination(
    host: str | None,
    allow_private_networks: bool,
    origin: str = "",
    allowed_origins: Collection[str] = (),
) -> None:
    """Raise :class:`PrivateAddressRefused` for a refused IP-literal ``host``.

    ``allowed_origins`` lets exactly those ``scheme://host:port`` origins through (the demo
    catalog the pipeline serves itself), where ``allow_private_networks`` would open every
    private address. Host names are checked later, on their resolved addresses, by
    :class:`GuardedResolver`.
    """
    if allow_private_networks or (origin and origin.lower() in allowed_origins):
        return
    literal = ip_literal(host)
    if literal is not None and not is_public_address(literal):
        raise PrivateAddressRefused(f"refusing non-public address {literal}")


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` and drops every non-public address.

    Raising when nothing public is left (rather than when *any* address is private) keeps
    dual-stack names with an odd private record working, while a name that only points
    inside the network is refused before a socket is opened.
    """

    def __init__(
        self,
        inner: AbstractResolver | None = None,
        allowed_host_ports: Collection[tuple[str, int]] = (),
    ) -> None:
        self._inner = inner if inner is not None else aiohttp.ThreadedResolver()
        self._allowed = frozenset((host.lower(), port) for host, port in allowed_host_ports)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if (host.lower(), port) in self._allowed:
            return results
        public = [r for r in results if is_public_address(r["host"])]
        if not public:
            found = ", ".join(sorted({r["host"] for r in results}))
            raise PrivateAddressRefused(f"{host} resolves only to non-public addresses ({found})")
        return public

    async def close(self) -> None:
        await self._inner.close()


def normalise_origins(origins: Iterable[str]) -> tuple[str, ...]:
    """``scheme://host:port`` origins, lower-cased and without a trailing slash, as
    :func:`check_destination` compares them."""
    return tuple(sorted({origin.strip().rstrip("/").lower() for origin in origins if origin}))


def host_ports(origins: Iterable[str]) -> list[tuple[str, int]]:
    """``(host, port)`` of each origin, the default port filled in from the scheme."""
    pairs = []
    for origin in origins:
        parts = urlsplit(origin)
        if parts.hostname:
            pairs.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    return pairs


def is_private_refusal(error: BaseException) -> bool:
    """True when ``error`` is, or wraps, a :class:`PrivateAddressRefused`."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, PrivateAddressRefused):
            return True
        if isinstance(current, aiohttp.ClientConnectorError) and isinstance(
            current.os_error, PrivateAddressRefused
        ):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


@dataclass(frozen=True)
class SessionSettings:
    """What :func:`open_session` needs; the crawler and downloader fill it from their configs."""

    user_agent: str = DEFAULT_USER_AGENT
    allow_private_networks: bool = False
    #: Private origins let through all the same (see :func:`check_destination`).
    allowed_private_origins: tuple[str, ...] = ()
    total_connections: int = 64
    connections_per_host: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 20.0
    dns_cache_ttl_s: int = 300


def open_session(settings: SessionSettings) -> aiohttp.ClientSession:
    """One pooled session: keep-alive connections and DNS cache are shared by all requests.

    ``sock_connect``/``sock_read`` rather than ``connect``/``total``: waiting for a free
    connection in the pool is not a network failure, and callers put their own deadline
    around each whole attempt.
    """
    resolver = (
        None
        if settings.allow_private_networks
        else GuardedResolver(allowed_host_ports=host_ports(settings.allowed_private_origins))
    )
    connector = aiohttp.TCPConnector(
        limit=settings.total_connections,
        limit_per_host=settings.connections_per_host,
        ttl_dns_cache=settings.dns_cache_ttl_s,
        resolver=resolver,
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": settings.user_agent},
        # Cookies set by one listing site must not follow us around; nor do we need them.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Redirects are followed by hand so every hop is checked and counted.
        raise_for_status=False,
    )


class BodyTooLarge(Exception):
    """The response body is (or announces itself as) bigger than the caller's limit."""


async def read_body(response: aiohttp.ClientResponse, max_bytes: int, chunk_size: int) -> bytes:
    """The whole body, streamed; raises :class:`BodyTooLarge` past ``max_bytes``.

    A ``Content-Length`` over the limit is refused before reading a byte; one within it is
    read in one call (aiohttp's parser never delivers more than the announced length, so
    that is bounded too, and it spares the event loop a round per chunk). A body without one
    (chunked) is streamed and cut off as soon as it crosses the limit, so memory per request
    is bounded either way.
    """
    length = response.content_length
    if length is not None:
        if length > max_bytes:
            raise BodyTooLarge(f"Content-Length {length} > {max_bytes}")
        return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_chunked(chunk_size):
        body += chunk
        if len(body) > max_bytes:
            raise BodyTooLarge(f"body passed {max_bytes} bytes")
    return bytes(body)


def text_encoding(response: aiohttp.ClientResponse, default: str = "utf-8") -> str:
    """The charset the response declares when Python knows it, else ``default``."""
    charset = response.charset
    if charset:
        try:
            return codecs.lookup(charset).name
        except LookupError:
            pass
    return default


class HostPacer:
    """Spaces request starts per host: at most ``rate`` per second, and at least a caller's
    ``min_interval_s`` apart (a robots.txt ``Crawl-delay``); the slower of the two wins.

    Each caller reserves the next free start time of its host and sleeps until then, so
    callers are served in arrival order and no timer task runs in the background.
    """

    def __init__(self, rate: float = 0.0) -> None:
        if rate < 0:
            raise ValueError(f"request rate must be >= 0 (0: unlimited), got {rate}")
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next_start: dict[str, float] = {}

    async def wait(self, host: str, min_interval_s: float = 0.0) -> None:
        """Return when a request to ``host`` may start."""
        interval = max(self._interval, min_interval_s)
        if not interval:
            return
        now = asyncio.get_running_loop().time()
        start = max(now, self._next_start.get(host, now))
        self._next_start[host] = start + interval
        if len(self._next_start) > 10_000:  # forget hosts whose turn is long past
            self._next_start = {h: t for h, t in self._next_start.items() if t > now}
        if start > now:
            await asyncio.sleep(start - now)
