"""Settings shared by several assets, held as Dagster resources."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import dagster as dg

from carmodels.demo.catalog import DEFAULT_N_LISTINGS
from carmodels.layout import DataLayout, default_data_root_url
from carmodels.storage import StorageRoot

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
    """Where every stage keeps its outputs (see `carmodels.layout` and `carmodels.storage`).

    ``root`` is a local folder or any fsspec URL (``s3://bucket/prefix``). A remote root is
    worked on through a local working copy under ``cache_dir`` (default ``$CARMODELS_CACHE``
    or ``~/.cache/carmodels``): each step pulls the folders it reads and pushes the folder it
    writes. ``storage_options`` go to fsspec (for S3 e.g. ``{"client_kwargs": {"endpoint_url":
    "http://127.0.0.1:9000"}}``); credentials come from the usual ``AWS_*`` variables.
    """

    root: str = default_data_root_url()
    cache_dir: str | None = None
    storage_options: dict[str, Any] = {}

    @property
    def storage_root(self) -> StorageRoot:
        return StorageRoot.parse(self.root, self.cache_dir, self.storage_options or None)

    @property
    def layout(self) -> DataLayout:
        """The stage paths of the (local working copy of the) root."""
        return self.storage_root.layout

    def working_copy(
        self, pull: Sequence[str] = (), push: Sequence[str] = ()
    ) -> AbstractContextManager[DataLayout]:
        """Pull the folders a step reads (and the one it writes), run it, push what it wrote.

        A step pulls its own output folder too: the push mirrors the working copy, so a folder
        that grows step by step (raw downloads, shard generations) must start complete.
        """
        return self.storage_root.working_copy(pull=(*pull, *push), push=push)

    def exists(self, relative: str) -> bool:
        """Whether ``relative`` exists in the root itself (not only in a working copy)."""
        return self.storage_root.exists_remote(relative)

    def uri(self, relative: str = "") -> str:
        """The address of ``relative`` for ``dagster/uri`` metadata (a URL for remote roots)."""
        return self.storage_root.uri(relative)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Contact a remote root once up front: bad credentials or a missing bucket fail the
        # step before any work is done, with a message that names the root.
        self.storage_root.check()


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
