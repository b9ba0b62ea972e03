"""Safe defaults: the private-address guard is on in every profile, and the demo catalog is
let through by its exact origin on a free port, never by a profile-wide switch."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from carmodels import scrape
from carmodels.demo import DemoServer
from pipelines.assets import MANIFEST_SOURCE, listing_manifest, raw_images
from pipelines.resources import StorageResource, profile_resources

LISTINGS = 24


@pytest.fixture(scope="module")
def demo_server():
    with DemoServer(n_listings=LISTINGS) as server:
        yield server


@pytest.fixture
def served_manifest(demo_server: DemoServer, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A user's manifest whose image URLs are on 127.0.0.1 (the demo server, as a stand-in for
    any service inside the user's network)."""
    path = tmp_path / "listings.csv"
    with urllib.request.urlopen(demo_server.manifest_url, timeout=10) as response:
        path.write_bytes(response.read())
    return path, scrape.read_manifest(path)


def test_only_the_allowed_origin_gets_through_the_guard(
    demo_server: DemoServer, served_manifest, tmp_path: Path
) -> None:
    _, manifest = served_manifest
    manifest = manifest.head(6)
    base = {"fetch_processes": 1, "max_retries": 0}
    refused = scrape.download_images(manifest, tmp_path / "a", scrape.ScrapeConfig(**base))
    assert refused.outcome_counts == {"private_address_refused": len(manifest)}

    # The exact origin (any spelling of its case, with or without a trailing slash) is let
    # through, and nothing else on 127.0.0.1: another port is still refused.
    allowed = scrape.download_images(
        manifest,
        tmp_path / "b",
        scrape.ScrapeConfig(**base, allowed_private_origins=(demo_server.base_url.upper() + "/",)),
    )
    assert allowed.outcome_counts.get("ok", 0) > 0
    assert "private_address_refused" not in allowed.outcome_counts
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other_origin = f"http://127.0.0.1:{other.getsockname()[1]}"
    moved = manifest.assign(url=manifest["url"].str.replace(demo_server.base_url, other_origin))
    still_refused = scrape.download_images(
        moved,
        tmp_path / "c",
        scrape.ScrapeConfig(**base, allowed_private_origins=(demo_server.base_url,)),
    )
    assert still_refused.outcome_counts == {"private_address_refused": len(manifest)}


def _materialise(instance, root: Path, run_config: dict | None = None) -> dict:
    result = dg.materialize(
        [listing_manifest, raw_images],
        resources={
            "storage": StorageResource(root=str(root)),
            **profile_resources("demo", demo_listings=LISTINGS),
        },
        instance=instance,
        run_config=run_config or {},
    )
    assert result.success
    return {
        event.asset_key.path[-1]: event.step_materialization_data.materialization.metadata
        for event in result.get_asset_materialization_events()
    }


@pytest.mark.slow
def test_the_demo_profile_refuses_a_users_private_urls_unless_opted_in(
    served_manifest, tmp_path: Path
) -> None:
    path, manifest = served_manifest
    source = {"listing_manifest": {"config": {"manifest_path": str(path)}}}
    with dg.instance_for_test() as instance:
        guarded = _materialise(instance, tmp_path / "guarded", {"ops": source})
        assert guarded["raw_images"]["ok"].value == 0
        assert guarded["raw_images"]["failed"].value == len(manifest)
        assert "private_address_refused" in str(guarded["raw_images"]["outcomes"].value)
        # The manifest came from a file: nothing was recorded as a trusted origin.
        record = json.loads((tmp_path / "guarded" / "manifest" / MANIFEST_SOURCE).read_text())
        assert "allowed_private_origins" not in record

        opted_in = _materialise(
            instance,
            tmp_path / "opted-in",
            {"ops": {**source, "raw_images": {"config": {"allow_private_networks": True}}}},
        )
        assert opted_in["raw_images"]["ok"].value > 0


@pytest.mark.slow
def test_the_demo_catalog_moves_to_a_free_port_when_its_port_is_taken(tmp_path: Path) -> None:
    root = tmp_path / "data"
    record_path = root / "manifest" / MANIFEST_SOURCE
    with dg.instance_for_test() as instance:
        first = _materialise(instance, root)
        port = json.loads(record_path.read_text())["demo_catalog"]["port"]
        assert first["raw_images"]["ok"].value > 0

        # Nothing holds the port: the next run takes it again, so the URLs (and the
        # manifest's version) stay the same and nothing is downloaded again.
        again = _materialise(instance, root)
        assert json.loads(record_path.read_text())["demo_catalog"]["port"] == port
        assert again["raw_images"]["skipped"].value is True

        # Another program holds it now: the catalog is served on another free port.
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            moved = _materialise(instance, root)
            record = json.loads(record_path.read_text())
        assert record["demo_catalog"]["port"] != port
        assert record["allowed_private_origins"] == [
            f"http://127.0.0.1:{record['demo_catalog']['port']}"
        ]
        assert moved["raw_images"]["ok"].value > 0
