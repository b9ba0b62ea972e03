"""Scrape stage: listing manifests and crawls → raw Parquet shards of image bytes.

``read_manifest`` / ``crawl_listings`` produce the listing table (one row per image URL),
``download_images`` fetches it into ``raw-NNNNN.parquet`` shards and ``read_raw`` reads them
back (latest row per URL).

The names below are imported on first use (PEP 562), so that a fetch process, which needs
only :mod:`carmodels.scrape.fetch`, starts without pandas and pyarrow.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name → the submodule defining it.
_EXPORTS = {
    "DEFAULT_MAX_PAGES": "crawl",
    "acrawl_listings": "crawl",
    "crawl_listings": "crawl",
    "parse_listing_page": "crawl",
    "ScrapeConfig": "fetch",
    "is_transient": "fetch",
    "ScrapeResult": "download",
    "ShardWriteTimeout": "download",
    "adownload_images": "download",
    "download_images": "download",
    "manifest_summary": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "DEFAULT_USER_AGENT": "net",
    "is_public_address": "net",
    "RAW_COLUMNS": "raw",
    "RAW_SHARD_GLOB": "raw",
    "read_raw": "raw",
    "opts_out_of_ai": "robots",
    "inspect_image": "validate",
    "sniff_image_format": "validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
