"""Settings shared by several assets, held as Dagster resources."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import dagster as dg

from carmodels.demo.catalog import DEFAULT_N_LISTINGS
from carmodels.layout import DataLayout, default_data_root

#: Environment variable choosing the pipeline profile (see `PipelineSettings.profile`).
PROFILE_ENV = "CARMODELS_PROFILE"
#: Fixed port of the in-process demo catalog, so that image URLs stay valid across steps.
DEMO_PORT_ENV = "CARMODELS_DEMO_PORT"
DEFAULT_DEMO_PORT = 8765
#: Environment variables that shrink the demo (fewer listings, fewer epochs), for a quick look
#: at the UI and for the browser test; left unset, the demo runs at its documented size.
DEMO_LISTINGS_ENV = "CARMODELS_DEMO_LISTINGS"
DEMO_EPOCHS_ENV = "CARMODELS_DEMO_EPOCHS"
#: Epochs the demo profile trains (see `pipelines.assets.DEMO_PRESET`).
DEFAULT_DEMO_EPOCHS = 120


class StorageResource(dg.ConfigurableResource):
    """Root folder under which every stage writes its outputs (see `carmodels.layout`)."""

    root: str = str(default_data_root())

    @property
    def layout(self) -> DataLayout:
        return DataLayout.at(self.root)


class PipelineSettings(dg.ConfigurableResource):
    """What the graph runs on and how hard it trains.

    ``demo`` (the default) crawls the built-in demo catalog, served in-process on
    127.0.0.1, and trains the small ``tiny`` preset for a few epochs so that the whole graph
    runs on a laptop CPU in minutes. ``full`` expects a real source (a manifest file or
    listing pages in `listing_manifest`'s config) and trains the seed's model.
    """

    profile: Literal["demo", "full"] = "demo"
    device: str = "auto"
    demo_port: int = DEFAULT_DEMO_PORT
    demo_seed: int = 0
    demo_listings: int = DEFAULT_N_LISTINGS
    demo_epochs: int = DEFAULT_DEMO_EPOCHS

    @property
    def is_demo(self) -> bool:
        return self.profile == "demo"

    @contextmanager
    def serving_demo_catalog(self) -> Iterator[str]:
        """Serve the demo catalog on its fixed port for the duration of a step.

        Each step runs in its own process, so the steps that touch the network (crawling and
        downloading) each start the server; the catalog is deterministic, so both see the
        same site. If something already serves that port (for example a `carmodels
        demo-server` the user started), it is used as it is.
        """
        from carmodels.demo import DemoServer

        base_url = f"http://127.0.0.1:{self.demo_port}"
        if _serving(base_url):
            yield base_url
            return
        with DemoServer(
            seed=self.demo_seed, n_listings=self.demo_listings, port=self.demo_port
        ) as server:
            yield server.base_url


def _serving(base_url: str) -> bool:
    """Whether an HTTP server already answers at ``base_url``."""
    try:
        with urllib.request.urlopen(f"{base_url}/robots.txt", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


def default_settings() -> PipelineSettings:
    return PipelineSettings(
        profile=os.environ.get(PROFILE_ENV, "demo"),  # type: ignore[arg-type]
        demo_port=_int_env(DEMO_PORT_ENV, DEFAULT_DEMO_PORT),
        demo_listings=_int_env(DEMO_LISTINGS_ENV, DEFAULT_N_LISTINGS),
        demo_epochs=_int_env(DEMO_EPOCHS_ENV, DEFAULT_DEMO_EPOCHS),
    )


def _int_env(name: str, default: int) -> int:
    """A positive integer from the environment, with an error that names the variable."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise ValueError(f"${name} must be a positive integer, got {value!r}; unset it or fix it.")
    return number
