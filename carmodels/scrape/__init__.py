"""Scrape stage: listing manifests and crawls → raw Parquet shards of image bytes.

``read_manifest`` / ``crawl_listings`` produce the listing table (one row per image URL),
``download_images`` fetches it into ``raw-NNNNN.parquet`` shards and ``read_raw`` reads them
back (latest row per URL).
"""

from carmodels.scrape.crawl import (
    DEFAULT_MAX_PAGES,
    acrawl_listings,
    crawl_listings,
    parse_listing_page,
)
from carmodels.scrape.download import (
    ScrapeConfig,
    ScrapeResult,
    ShardWriteTimeout,
    adownload_images,
    download_images,
)
from carmodels.scrape.manifest import manifest_summary, read_manifest, write_manifest
from carmodels.scrape.net import DEFAULT_USER_AGENT, is_public_address
from carmodels.scrape.raw import RAW_COLUMNS, RAW_SHARD_GLOB, is_transient, read_raw
from carmodels.scrape.robots import opts_out_of_ai
from carmodels.scrape.validate import inspect_image, sniff_image_format

__all__ = [
    "DEFAULT_MAX_PAGES",
    "DEFAULT_USER_AGENT",
    "RAW_COLUMNS",
    "RAW_SHARD_GLOB",
    "ScrapeConfig",
    "ScrapeResult",
    "ShardWriteTimeout",
    "acrawl_listings",
    "adownload_images",
    "crawl_listings",
    "download_images",
    "inspect_image",
    "is_public_address",
    "is_transient",
    "manifest_summary",
    "opts_out_of_ai",
    "parse_listing_page",
    "read_manifest",
    "read_raw",
    "write_manifest",
    "sniff_image_format",
]
