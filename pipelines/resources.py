"""Settings shared by several assets, held as Dagster resources.

A profile is a set of resources (`profile_resources`), chosen once in `pipelines.definitions`:
assets never ask which profile they run under, they use what they are given.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from carmodels import cluster, scrape, shards, train
from carmodels.demo.catalog import DEFAULT_N_LISTINGS
from carmodels.errors import InputError
from carmodels.layout import RAW_DIR, SHARDS_DIR, DataLayout, default_data_root_url
from carmodels.storage import StorageRoot
from pipelines.config_fields import library_field, library_kwargs
from pipelines.project_config import defaults_from_file

#: Environment variable choosing the pipeline profile (see `profile_resources`).
PROFILE_ENV = "CARMODELS_PROFILE"
#: Environment variables that shrink the demo (fewer listings, fewer epochs), for a quick look
#: at the UI and for the browser test; left unset, the demo runs at its documented size.
DEMO_LISTINGS_ENV = "CARMODELS_DEMO_LISTINGS"
DEMO_EPOCHS_ENV = "CARMODELS_DEMO_EPOCHS"
#: Epochs the demo profile trains (see `DEMO_TRAINING`).
DEFAULT_DEMO_EPOCHS = 120
#: Environment variable naming the Ray cluster downloads fan out on (docs/scale.md); the
#: project config file's `ray_cluster: config: address:` overrides it.
RAY_ADDRESS_ENV = "CARMODELS_RAY_ADDRESS"


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
        try:
            self.storage_root.check()
        except InputError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None


@defaults_from_file("ray_cluster")
class RayResource(dg.ConfigurableResource):
    """The Ray cluster `raw_images` fans its downloads out on, and `car_shards` its
    normalising (`carmodels.cluster`, `carmodels.shards_fanout`; see docs/scale.md). None by
    default: without an address, both run on this machine exactly as they do without Ray
    installed.

    With an address, the tasks write their raw shards (and, for partitions, their car shards)
    straight to the storage root, so a root that the workers share (S3 or another fsspec URL,
    or a local folder for ``local``) is needed; the step's working copy is then brought level
    with what they wrote.
    """

    address: str = library_field(
        cluster.FanoutConfig,
        "address",
        # Read when the code location loads, like the storage root's default.
        default=os.environ.get(RAY_ADDRESS_ENV, "").strip(),
    )
    urls_per_task: int = library_field(cluster.FanoutConfig, "urls_per_task")
    task_retries: int = library_field(cluster.FanoutConfig, "task_retries")

    @property
    def enabled(self) -> bool:
        return bool(self.address.strip())

    @property
    def engine(self) -> str:
        """Where the work ran, for the step's metadata."""
        return f"ray ({self.address})" if self.enabled else "local"

    def download(
        self,
        manifest: pd.DataFrame,
        storage: StorageResource,
        layout: DataLayout,
        config: scrape.ScrapeConfig,
        on_progress: Callable[[int, int], None] | None = None,
        raw_folder: str = RAW_DIR,
    ) -> scrape.ScrapeResult:
        """Download ``manifest`` into ``raw_folder`` (under the root): on the cluster when an
        address is set, else with the local downloader (`carmodels.scrape.download_images`)."""
        raw_dir = layout.root / raw_folder
        if not self.enabled:
            return scrape.download_images(manifest, raw_dir, config, on_progress)
        root = storage.storage_root
        fanout = self.fanout_config()
        # The workers cannot see this process's working copy: they write to the root itself.
        raw_root = root.uri(raw_folder) if root.is_remote else str(raw_dir)
        result = cluster.download_on_ray(
            manifest,
            raw_root,
            config,
            fanout,
            storage_options=storage.storage_options or None,
            on_progress=on_progress,
        )
        if root.is_remote:
            # Level the working copy with the root, so the step's push has nothing to undo.
            root.pull(raw_folder)
        return result

    def build_shards(
        self,
        unique_dir: Path,
        raw: Path,
        out_dir: Path,
        config: shards.ShardConfig,
        on_progress: Callable[[int, int], None] | None = None,
        partition: str | None = None,
    ) -> shards.ShardResult:
        """Normalise the kept images into training shards (`carmodels.shards.build_shards`):
        their chunks go to the cluster's workers when an address is set, else to local
        processes. The shards are the same bytes either way."""
        mapping = (
            cluster.ray_chunk_mapping(self.fanout_config())
            if self.enabled
            else contextlib.nullcontext(None)  # map_chunks=None: local processes
        )
        with mapping as map_chunks:
            return shards.build_shards(
                unique_dir,
                raw,
                out_dir,
                config,
                on_progress=on_progress,
                partition=partition,
                map_chunks=map_chunks,
            )

    def build_partitions(
        self,
        storage: StorageResource,
        layout: DataLayout,
        partitions: list[str],
        config: shards.ShardConfig,
    ) -> dict[str, shards.ShardResult]:
        """Build every partition's shards at once on the cluster, one task each, straight
        into the storage root (`carmodels.shards_fanout`); the working copy is then brought
        level with what they wrote."""
        from carmodels.shards_fanout import build_partitions_on_ray

        root = storage.storage_root
        results = build_partitions_on_ray(
            root.url if root.is_remote else str(layout.root),
            partitions,
            config,
            self.fanout_config(),
            local_root=layout.root,
            storage_options=storage.storage_options or None,
        )
        if root.is_remote:
            root.pull(*(f"{SHARDS_DIR}/{p}" for p in partitions))
        return results

    def fanout_config(self) -> cluster.FanoutConfig:
        return cluster.FanoutConfig(**library_kwargs(self, cluster.FanoutConfig))


class ListingSource(dg.ConfigurableResource):
    """Where `listing_manifest` gets listings when its config names no source.

    This base, the `full` profile's, has none: the step fails with a message that says where
    to name one. The `demo` profile binds :class:`DemoCatalogSource` instead.
    """

    @property
    def has_default(self) -> bool:
        """Whether :meth:`serving` yields a source."""
        return False

    @contextmanager
    def serving(self, preferred_port: int | None = None) -> Iterator[DemoOrigin | None]:
        """The default source for the duration of a step, or None when there is none.
        ``preferred_port`` is the port a served source used last time."""
        yield None


class DemoCatalogSource(ListingSource):
    """The built-in demo catalog, served on 127.0.0.1 while a step needs it.

    It binds a free port: the one it used last time when that is still free (so the image
    URLs, and with them the manifest's version, stay the same from run to run), else any.
    Only this origin is let through the private-address guard, never 127.0.0.1 as a whole.
    """

    seed: int = 0
    listings: int = DEFAULT_N_LISTINGS
    #: 0 picks a free port; a fixed one is for a catalog served by hand (`carmodels demo-server`).
    port: int = 0

    @property
    def has_default(self) -> bool:
        return True

    @contextmanager
    def serving(self, preferred_port: int | None = None) -> Iterator[DemoOrigin | None]:
        origin = DemoOrigin(seed=self.seed, listings=self.listings, port=self.port)
        with serve_demo(origin, preferred_port=preferred_port) as served:
            yield served


@dataclass(frozen=True)
class DemoOrigin:
    """A served demo catalog: what it holds and where (recorded next to the manifest)."""

    seed: int
    listings: int
    port: int

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def start_url(self) -> str:
        from carmodels.demo.server import START_PATH

        return f"{self.origin}{START_PATH}"

    def to_record(self) -> dict[str, object]:
        return {"demo_catalog": asdict(self), "allowed_private_origins": [self.origin]}

    @classmethod
    def from_record(cls, record: dict[str, object]) -> DemoOrigin | None:
        catalog = record.get("demo_catalog")
        return cls(**catalog) if isinstance(catalog, dict) else None


@contextmanager
def serve_demo(origin: DemoOrigin, preferred_port: int | None = None) -> Iterator[DemoOrigin]:
    """Serve the demo catalog ``origin`` describes for the duration of a step.

    With ``origin.port`` 0 the server takes ``preferred_port`` when it is free, else any free
    port. With a fixed port it must get that port: a catalog already answering there (a
    `carmodels demo-server` the user started, or a step of this run) is used as it is, and a
    port held by anything else fails with a message saying how to get a fresh one.
    """
    from carmodels.demo import DemoServer

    if origin.port:
        base_url = f"http://127.0.0.1:{origin.port}"
        if _serving_demo(base_url):
            yield origin
            return
        candidates = [origin.port]
    else:
        candidates = [preferred_port, 0] if preferred_port else [0]
    last_error: RuntimeError | None = None
    for port in candidates:
        server = DemoServer(seed=origin.seed, n_listings=origin.listings, port=port or 0)
        try:
            server.start()
        except RuntimeError as exc:
            last_error = exc
            continue
        try:
            yield replace(origin, port=server.port)
        finally:
            server.stop()
        return
    raise dg.Failure(
        description=(
            f"The demo catalog could not be served on 127.0.0.1:{origin.port} ({last_error}): "
            "another program holds that port. Stop it, or rematerialise `listing_manifest` "
            "so that the demo catalog moves to a free port."
        ),
        allow_retries=False,
    )


def _serving_demo(base_url: str) -> bool:
    """Whether the demo catalog already answers at ``base_url``."""
    try:
        with urllib.request.urlopen(f"{base_url}/robots.txt", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


class TrainingDefaults(dg.ConfigurableResource):
    """The training settings `train_dcgan` uses where its config leaves them unset.

    The `full` profile binds the measured recipe (`carmodels.train.MEASURED_RECIPE`: the
    `dcgan` preset at lr 8e-4 with adaptive DiffAugment, at the seed's 128 px, 170 epochs,
    batch 128); the `demo` profile a model that learns on a laptop CPU in minutes
    (:func:`demo_training`).
    """

    preset: str = library_field(
        train.TrainConfig, "preset", default=train.MEASURED_RECIPE["preset"]
    )
    diffaugment: str = library_field(
        train.TrainConfig, "diffaugment", default=train.MEASURED_RECIPE["diffaugment"]
    )
    diffaugment_target: float | None = library_field(
        train.TrainConfig, "diffaugment_target", default=train.MEASURED_RECIPE["diffaugment_target"]
    )
    lr_g: float | None = library_field(
        train.TrainConfig, "lr_g", default=train.MEASURED_RECIPE["lr_g"]
    )
    lr_d: float | None = library_field(
        train.TrainConfig, "lr_d", default=train.MEASURED_RECIPE["lr_d"]
    )
    image_size: int = library_field(train.TrainConfig, "image_size")
    epochs: int = library_field(train.TrainConfig, "epochs")
    batch_size: int = library_field(train.TrainConfig, "batch_size")
    log_every_steps: int = train.TrainConfig.log_every_steps
    checkpoint_every: int = train.TrainConfig.checkpoint_every
    sample_every: int = train.TrainConfig.sample_every
    device: str = library_field(train.TrainConfig, "device")

    def train_config(self) -> train.TrainConfig:
        # The fields are TrainConfig's, by name; the rest keep the trainer's defaults.
        return train.TrainConfig(**self.model_dump())


#: What the demo profile trains: the trainer's full code path with a model small enough to
#: learn recognisable scenes on a laptop CPU in a few minutes (see `carmodels.models.PRESETS`).
#: A short run logs, samples and checkpoints more often per epoch than a long one needs to.
DEMO_TRAINING = {
    "preset": "small",
    # Not measured on the demo's drawn cars, whose 120 short epochs learn well without it.
    "diffaugment": "",
    "diffaugment_target": None,
    # The small preset's own learning rates, with which the demo was tuned.
    "lr_g": None,
    "lr_d": None,
    "image_size": 64,
    "batch_size": 32,
    "log_every_steps": 20,
    "checkpoint_every": 10,
    "sample_every": 4,
}


def demo_training(epochs: int = DEFAULT_DEMO_EPOCHS) -> TrainingDefaults:
    return TrainingDefaults(**DEMO_TRAINING, epochs=epochs)


#: The profiles: which resources the graph runs with.
PROFILES = ("demo", "full")


def profile_resources(
    profile: str,
    *,
    demo_listings: int = DEFAULT_N_LISTINGS,
    demo_epochs: int = DEFAULT_DEMO_EPOCHS,
) -> dict[str, dg.ConfigurableResource]:
    """The resource set of a profile: ``demo`` crawls the built-in catalog and trains a small
    model; ``full`` reads the source you configure and trains the measured recipe
    (``carmodels.train.MEASURED_RECIPE``) at the seed's size and length."""
    if profile == "demo":
        return {
            "listing_source": DemoCatalogSource(listings=demo_listings),
            "training": demo_training(demo_epochs),
            "ray_cluster": RayResource(),
        }
    if profile == "full":
        return {
            "listing_source": ListingSource(),
            "training": TrainingDefaults(),
            "ray_cluster": RayResource(),
        }
    raise InputError(
        f"${PROFILE_ENV} is {profile!r}; set it to one of {', '.join(PROFILES)} (or unset it)."
    )


def resources_from_environment() -> dict[str, dg.ConfigurableResource]:
    """The profile's resources as the environment chooses them (see the README)."""
    return profile_resources(
        os.environ.get(PROFILE_ENV, "demo").strip() or "demo",
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
        raise InputError(f"${name} must be a positive integer, got {value!r}; unset it or fix it.")
    return number
