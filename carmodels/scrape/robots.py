"""Site operators' wishes: robots.txt (RFC 9309) and the ``X-Robots-Tag`` AI opt-out header.

:class:`RobotsCache` fetches each origin's ``/robots.txt`` once per run, through the caller's
session (so the private-address guard applies), and answers every later question from memory.
How a fetch ends decides the verdict, as RFC 9309 section 2.3.1 says:

* 2xx: the first :data:`ROBOTS_MAX_BYTES` are parsed with :mod:`protego` and applied to our
  product token (``carmodels`` of ``carmodels/0.1 (...)``), with RFC 9309's matching: the
  group naming our token applies, else the ``*`` group; ``*`` in a path matches any run of
  characters and a final ``$`` anchors the end of the URL (path and query); of the rules
  matching a URL the longest wins, whatever their order, and ``Allow`` wins a tie; paths are
  compared with their percent-encoding normalised (``/%7Ea`` is ``/~a``, ``/ツ`` is
  ``/%E3%83%84``).
* 4xx (404 above all): there are no rules; everything is allowed.
* 5xx, timeout, connection error: the site is unreachable and nothing may be fetched from it.
  Such URLs get the outcome ``robots_unavailable``, which is transient, so ``retry_failed``
  tries them again in a later run (the verdict is cached for this run only).
* a refused private address: allowed here, because the image request itself is then refused
  with ``private_address_refused``, the more useful outcome.

A ``Crawl-delay`` (fractions of a second allowed) in the group that applies to us is read
too (:meth:`RobotsCache.crawl_delay_s`); the downloader and the crawler space their requests
to that host by at least that much (:class:`carmodels.scrape.net.HostPacer`).

What an origin's fetch came to can be handed on (:meth:`RobotsCache.seed_of`, a
:data:`RobotsSeed`) and given to another process's cache (``RobotsCache(..., seeds=...)``):
a Ray download reads each origin's robots.txt once in the driver and seeds every task with it,
so a site is not asked once per task.

:func:`opts_out_of_ai` reads ``X-Robots-Tag: noai`` / ``noimageai`` (the DeviantArt and Cara
convention) from response headers, before any body is read; the downloader gives such URLs
the outcome ``opted_out``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

import aiohttp
from protego import Protego

from carmodels.scrape.net import check_destination, is_private_refusal
from carmodels.scrape.urls import host_of, origin_of, resolve_url

log = logging.getLogger(__name__)

#: RFC 9309 asks crawlers to parse at least 500 KiB; anything beyond is ignored.
ROBOTS_MAX_BYTES = 512 * 1024
#: ``X-Robots-Tag`` directives that opt a resource out of AI training.
AI_OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# Directives that carry a value after a colon, so ``name:`` at the start of a header value is
# one of these rather than a user-agent prefix (``googlebot: noindex``).
_DIRECTIVES_WITH_VALUES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# ``User-agent: carmodels/1.0``: RFC 9309 wants the bare product token there, and protego
# would look for the whole value (slash and version) in our token and never find it. The
# version is cut off before parsing, as Google's parser does, so such a group still applies.
_USER_AGENT_VERSION = re.compile(r"(?im)^([ \t]*user-agent[ \t]*:[ \t]*[^\s/#]+)/[^\s#]*")


class RobotsVerdict(Enum):
    ALLOWED = "allowed"
    DENIED = "robots_denied"
    UNAVAILABLE = "robots_unavailable"


#: What one origin's robots.txt fetch came to, in a form another process can be given: the
#: text of the file (a 2xx answer, parsed again there with the same settings), or the verdict
#: that holds for every URL of the origin (``ALLOWED``: no file, 4xx, or a refused private
#: address; ``UNAVAILABLE``: 5xx or unreachable).
RobotsSeed = str | RobotsVerdict


def product_token(user_agent: str) -> str:
    """The name robots.txt groups are matched against: ``carmodels`` of ``carmodels/0.1 (...)``."""
    return user_agent.split("/", 1)[0].split()[0].strip().lower() if user_agent.strip() else ""


def opts_out_of_ai(header_values: Iterable[str], user_agent: str) -> bool:
    """True when any ``X-Robots-Tag`` value says ``noai`` or ``noimageai`` to us.

    A value may start with a user-agent name (``otherbot: noai``); it then applies to that
    agent only. Values without one apply to every agent.
    """
    agent = product_token(user_agent)
    for value in header_values:
        text = value.strip().lower()
        name, colon, rest = text.partition(":")
        name = name.strip()
        if colon and name not in _DIRECTIVES_WITH_VALUES and "," not in name and " " not in name:
            if name not in (agent, "*"):
                continue
            text = rest
        if any(part.strip() in AI_OPT_OUT_DIRECTIVES for part in text.split(",")):
            return True
    return False


@dataclass(frozen=True)
class RobotsSettings:
    user_agent: str
    allow_private_networks: bool
    #: Private origins let through all the same (the demo catalog; see net.check_destination).
    allowed_private_origins: tuple[str, ...] = ()
    #: Deadline for fetching one robots.txt, redirects included.
    timeout_s: float = 15.0
    #: Redirect hops followed (RFC 9309 asks for at least five).
    max_redirects: int = 5
    #: Origins remembered at once; the oldest are forgotten (and refetched if met again).
    max_origins: int = 10_000
    #: Cap on a ``Crawl-delay``: a site asking for more gets this (and a warning), so that one
    #: host cannot stall a run for days.
    max_crawl_delay_s: float = 60.0


@dataclass(frozen=True)
class _Rules:
    """One origin's parsed robots.txt: the path rules and our ``Crawl-delay`` (0 for none)."""

    parser: Protego
    crawl_delay_s: float
    #: The text parsed, kept so that it can be handed on (:meth:`RobotsCache.seed_of`).
    text: str


def _parse(text: str) -> Protego:
    return Protego.parse(_USER_AGENT_VERSION.sub(r"\1", text))


def _crawl_delay(parser: Protego, agent: str) -> float:
    # protego keeps fractions (``Crawl-delay: 0.5``) and drops negative, NaN and
    # unparseable values; None means the group that applies names no delay.
    delay = parser.crawl_delay(agent)
    return 0.0 if delay is None else float(delay)


def parse_crawl_delay(text: str, agent: str) -> float:
    """The ``Crawl-delay`` (seconds, fractions allowed) of the group of robots.txt ``text``
    that applies to the product token ``agent`` (else of the ``*`` group), or 0.

    The group is chosen as for the path rules: the longest name found in ``agent`` at a
    token boundary, else ``*``.
    """
    return _crawl_delay(_parse(text), agent)


class RobotsCache:
    """robots.txt verdicts per origin, each origin fetched once however many tasks ask at once.

    ``seeds`` (origin → :data:`RobotsSeed`, from another cache's :meth:`seed_of`) are origins
    already fetched elsewhere: they are answered from the seed and never fetched here.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: RobotsSettings,
        seeds: Mapping[str, RobotsSeed] | None = None,
    ) -> None:
        self._session = session
        self._settings = settings
        self._agent = product_token(settings.user_agent)
        self._rules: dict[str, asyncio.Task[_Rules | RobotsVerdict]] = {}
        # Parsed up front, apart from the fetched ones: seeds are never evicted or refetched.
        self._seeded: dict[str, _Rules | RobotsVerdict] = {
            origin: seed if isinstance(seed, RobotsVerdict) else self._rules_of(origin, seed)
            for origin, seed in (seeds or {}).items()
        }

    async def verdict(self, url: str) -> RobotsVerdict:
        origin = origin_of(url)
        rules = self._seeded.get(origin)
        if rules is None:
            rules = await self._load_once(origin)
        if isinstance(rules, RobotsVerdict):
            return rules
        # The product token, not the whole User-Agent: protego looks for each group's name
        # inside what it is given, and ``(+https://github.com/...)`` would match ``github``.
        allowed = rules.parser.can_fetch(url, self._agent)
        return RobotsVerdict.ALLOWED if allowed else RobotsVerdict.DENIED

    async def seed_of(self, url: str) -> RobotsSeed:
        """What ``url``'s origin's robots.txt came to (fetched now if it was not yet), to seed
        another process's cache with."""
        origin = origin_of(url)
        rules = self._seeded.get(origin)
        if rules is None:
            rules = await self._load_once(origin)
        return rules if isinstance(rules, RobotsVerdict) else rules.text

    async def _load_once(self, origin: str) -> _Rules | RobotsVerdict:
        task = self._rules.get(origin)
        if task is None:
            if len(self._rules) >= self._settings.max_origins:
                oldest = next(iter(self._rules))
                if self._rules[oldest].done():
                    del self._rules[oldest]
            # A task, not a bare coroutine: concurrent askers share it and one caller being
            # cancelled does not cancel the fetch for the others.
            task = asyncio.ensure_future(self._load(origin))
            self._rules[origin] = task
        return await asyncio.shield(task)

    def crawl_delay_s(self, url: str) -> float:
        """Seconds robots.txt asks between our requests to ``url``'s origin (0 for none).

        Read from the rules :meth:`verdict` loaded, so ask after awaiting it; an origin whose
        robots.txt is not loaded (yet) has no delay.
        """
        origin = origin_of(url)
        rules = self._seeded.get(origin)
        if rules is None:
            task = self._rules.get(origin)
            if task is None or not task.done() or task.cancelled() or task.exception() is not None:
                return 0.0
            rules = task.result()
        return 0.0 if isinstance(rules, RobotsVerdict) else rules.crawl_delay_s

    async def close(self) -> None:
        for task in self._rules.values():
            task.cancel()
        self._rules.clear()

    async def _load(self, origin: str) -> _Rules | RobotsVerdict:
        try:
            async with asyncio.timeout(self._settings.timeout_s):
                status, text = await self._fetch(f"{origin}/robots.txt")
        except TimeoutError:
            status, text = None, None
        except (aiohttp.ClientError, OSError) as error:
            if is_private_refusal(error):
                return RobotsVerdict.ALLOWED
            status, text = None, None
        if status is not None and 200 <= status < 300 and text is not None:
            return self._rules_of(origin, text)
        if status is not None and 400 <= status < 500:
            return RobotsVerdict.ALLOWED
        log.warning("robots.txt of %s unavailable (status %s): not fetching there", origin, status)
        return RobotsVerdict.UNAVAILABLE

    def _rules_of(self, origin: str, text: str) -> _Rules:
        parser = _parse(text)
        delay = _crawl_delay(parser, self._agent)
        if delay > self._settings.max_crawl_delay_s:
            log.warning(
                "robots.txt of %s asks for Crawl-delay %g s; using the cap of %g s "
                "(max_crawl_delay_s)",
                origin,
                delay,
                self._settings.max_crawl_delay_s,
            )
            delay = self._settings.max_crawl_delay_s
        return _Rules(parser, delay, text)

    async def _fetch(self, url: str) -> tuple[int | None, str | None]:
        settings = self._settings
        for _ in range(settings.max_redirects + 1):
            check_destination(
                host_of(url),
                settings.allow_private_networks,
                origin_of(url),
                settings.allowed_private_origins,
            )
            async with self._session.get(url, allow_redirects=False) as response:
                location = response.headers.get("Location")
                if response.status in _REDIRECT_STATUSES and location:
                    next_url = resolve_url(url, location)
                    if next_url is None:
                        return 404, None  # nowhere usable to go: as good as no robots.txt
                    url = next_url
                    continue
                if response.status != 200:
                    return response.status, None
                body = bytearray()
                # RFC 9309 needs only the first 500 KiB parsed: read that much and stop.
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) >= ROBOTS_MAX_BYTES:
                        break
                # utf-8-sig: a byte order mark would otherwise glue itself to the first
                # line's field name (``\ufeffUser-agent``), and that group would be lost.
                text = bytes(body[:ROBOTS_MAX_BYTES]).decode("utf-8-sig", errors="replace")
                return 200, text
        return 404, None  # a redirect loop: RFC 9309 treats it as "unavailable" (4xx)
