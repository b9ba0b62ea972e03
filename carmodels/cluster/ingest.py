"""Downloads fanned out over a Ray cluster: the manifest's URLs as tasks, each running the
local downloader's fetcher and writing one raw shard straight to the storage root.

The driver (:func:`download_on_ray`):

1. reads what the raw folder already holds, as the local downloader does (a remote root is
   read in place), and keeps the URLs still to fetch (``retry_failed`` and ``revalidate``
   mean the same here);
2. plans the tasks (:mod:`carmodels.cluster.plan`): URLs bucketed by host, one shard number
   per task after the existing shards;
3. reads each origin's robots.txt once for the whole job and hands the results to every task,
   whose fetcher is seeded with them (:func:`carmodels.scrape.fetch.read_robots`);
4. starts the host coordinator (:mod:`carmodels.cluster.politeness`) as a named actor on the
   driver's node, when some host spans several tasks;
5. runs the tasks, retried by Ray when they fail or their node is lost, and adds up what they
   did into a :class:`carmodels.scrape.download.ScrapeResult`.

A task (:func:`run_task`) is idempotent: it fetches its URLs with
:class:`carmodels.scrape.fetch.Fetcher` (the same rows as the local downloader, manifest
metadata included), writes ``raw-NNNNN.parquet`` whole (a local file by atomic rename, an
object-store file in one put), then its done-marker ``_tasks/<key>.json`` holding its result.
A retried task whose marker exists returns that result without fetching; one whose shard
exists without a marker (it died in between) fetches again and replaces the shard. So every
URL ends up in exactly one shard, however often tasks are retried. A task's rows are ordered
as its URLs are in the manifest, so a shard's content is the same run after run (but for
``fetched_at``).

A task holds its rows in memory until it writes them: ``FanoutConfig.urls_per_task`` bounds
that, and is also what a lost task costs in refetching.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from carmodels.cluster.config import FanoutConfig
from carmodels.cluster.connect import ray_session, require_ray
from carmodels.cluster.plan import FanoutPlan, plan_tasks
from carmodels.cluster.politeness import (
    CoordinatorLost,
    HostCoordinator,
    RayCoordinatorCalls,
    SharedHostGate,
)
from carmodels.errors import InputError, one_line
from carmodels.io import atomic_write_json
from carmodels.scrape.download import (
    ScrapeResult,
    metadata_value,
    prepare_manifest,
    revalidation_verdict,
    urls_to_fetch,
)
from carmodels.scrape.fetch import (
    RowFetcher,
    ScrapeConfig,
    Validators,
    error_row,
    open_fetcher,
    read_robots,
)
from carmodels.scrape.raw import (
    ExistingRaw,
    RawShardWriter,
    metadata_column_names,
    raw_schema,
    scan_existing,
)
from carmodels.scrape.robots import RobotsSeed
from carmodels.scrape.run import run_async, run_sync
from carmodels.scrape.urls import host_of
from carmodels.storage import StorageRoot

if TYPE_CHECKING:
    from upath import UPath

log = logging.getLogger(__name__)

#: Folder of the done-markers, inside the raw folder (readers of shards never look there).
MARKER_DIR = "_tasks"
#: Version of the done-marker's content; a marker of another version is not trusted.
MARKER_VERSION = 1
#: Seconds the host coordinator is given to start before the download gives up.
COORDINATOR_START_TIMEOUT_S = 60.0

ProgressCallback = Callable[[int, int], None]
#: One URL of a task: the URL, its metadata columns, the stored validators when revalidating.
Job = tuple[str, dict[str, str | None], Validators | None]


class FanoutFailed(RuntimeError):
    """Some tasks failed even after their retries; the others' shards are kept."""


# --------------------------------------------------------------------------- the raw folder


class RawFolder:
    """The raw folder of a storage root, local or remote, as the driver and the tasks use it."""

    def __init__(self, raw_root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = raw_root
        self.storage_options = dict(storage_options or {})
        self.root = StorageRoot.parse(raw_root, storage_options=self.storage_options)
        self.remote_path = self.root.remote.path.rstrip("/") if self.root.remote else None

    def check(self) -> None:
        """A missing bucket or bad credentials fail here, before any task runs."""
        self.root.check()

    def scan(self, with_validators: bool) -> ExistingRaw:
        if self.remote_path is None:
            return scan_existing(self.root.local_root, with_validators)
        return scan_existing(self.remote_path, with_validators, filesystem=self.root.fs)

    def display_path(self, name: str = "") -> Path | UPath:
        """Where ``name`` is, as a path a caller can open: a ``Path``, or a ``UPath`` remotely."""
        if self.root.remote is None:
            return self.root.local_root / name if name else self.root.local_root
        return self.root.remote / name if name else self.root.remote

    def write_shard(self, index: int, schema: pa.Schema, rows: list[dict[str, Any]]) -> str:
        """Write ``rows`` as shard ``index``, in one piece whatever their number (the plan
        fixed the shard's number); returns its file name."""
        with tempfile.TemporaryDirectory(prefix="carmodels-task-") as scratch:
            local = self.remote_path is None
            # Locally the writer's own atomic rename; an object store has no rename, but a
            # whole-object upload is atomic there, so the shard is written aside and put.
            writer = RawShardWriter(
                self.root.local_root if local else Path(scratch),
                schema,
                first_index=index,
                max_rows=len(rows) + 1,
                max_bytes=2**62,
            )
            for row in rows:
                writer.add(row)
            path = writer.flush()
            assert path is not None
            if not local:
                self.root.fs.put_file(str(path), f"{self.remote_path}/{path.name}")
            return path.name

    def read_marker(self, key: str) -> TaskResult | None:
        """The result recorded by task ``key``, or None when it has not finished."""
        try:
            if self.remote_path is None:
                text = (self.root.local_root / MARKER_DIR / f"{key}.json").read_text()
            else:
                fs = self.root.fs
                path = f"{self.remote_path}/{MARKER_DIR}/{key}.json"
                fs.invalidate_cache(path)
                text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return None
        data = json.loads(text)
        if data.get("version") != MARKER_VERSION:
            return None
        return TaskResult.from_json(data)

    def write_marker(self, result: TaskResult) -> None:
        data = {"version": MARKER_VERSION, **result.to_json()}
        if self.remote_path is None:
            atomic_write_json(self.root.local_root / MARKER_DIR / f"{result.key}.json", data)
        else:
            path = f"{self.remote_path}/{MARKER_DIR}/{result.key}.json"
            self.root.fs.pipe_file(path, json.dumps(data, indent=2, sort_keys=True).encode())


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """What one task fetches and where its rows go."""

    key: str
    shard_index: int
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class JobContext:
    """What every task of one download shares (put in the object store once)."""

    raw_root: str
    storage_options: dict[str, Any]
    config: ScrapeConfig
    #: Raw shard column names of the manifest's metadata columns, in order.
    metadata_columns: tuple[str, ...]
    robots_seeds: dict[str, RobotsSeed]
    shared_hosts: frozenset[str]
    #: The host coordinator actor, or None when no host spans two tasks.
    coordinator: Any
    lease_s: float
    lease_ttl_s: float


@dataclass
class TaskResult:
    """What one task did; also the content of its done-marker."""

    key: str
    #: The shard written (file name), or None when no row was (all revalidated unchanged).
    shard: str | None
    n_urls: int
    outcome_counts: dict[str, int]
    revalidation_counts: dict[str, int] = field(default_factory=dict)
    #: ``(url, outcome, status)`` of the rows that are not ``ok``.
    failures: list[tuple[str, str, int | None]] = field(default_factory=list)
    #: The Ray node that ran it ('' outside Ray), for tracing a shard back to a machine.
    node: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskResult:
        fields = {k: v for k, v in data.items() if k != "version"}
        fields["failures"] = [tuple(f) for f in fields.get("failures", [])]
        return cls(**fields)


def run_task(context: JobContext, spec: TaskSpec) -> TaskResult:
    """Fetch one task's URLs into its shard, unless its done-marker says it already did."""
    folder = RawFolder(context.raw_root, context.storage_options)
    done = folder.read_marker(spec.key)
    if done is not None:
        log.info("task %s already done: %s", spec.key, done.shard)
        return done
    rows, result = run_async(_fetch_task(context, spec))
    result.node = _node_id()
    if rows:
        schema = raw_schema(list(context.metadata_columns), context.config.thumbnail_size > 0)
        result.shard = folder.write_shard(spec.shard_index, schema, rows)
    folder.write_marker(result)
    return result


def _node_id() -> str:
    try:
        import ray
    except ImportError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


async def _fetch_task(
    context: JobContext, spec: TaskSpec
) -> tuple[list[dict[str, Any]], TaskResult]:
    config = context.config
    hosts_here = {host_of(url) or "" for url, _, _ in spec.jobs}
    shared = context.shared_hosts & hosts_here
    gate = None
    if shared:
        gate = SharedHostGate(
            config,
            shared,
            RayCoordinatorCalls(context.coordinator),
            holder=spec.key,
            lease_s=context.lease_s,
            lease_ttl_s=context.lease_ttl_s,
        )
    async with open_fetcher(config, host_gate=gate, robots_seeds=context.robots_seeds) as fetcher:
        try:
            fetched = await _fetch_all(fetcher, spec.jobs, config.concurrency)
        finally:
            if gate is not None:
                await gate.close()
    return _rows_and_result(spec, fetched)


async def _fetch_all(
    fetcher: RowFetcher, jobs: Sequence[Job], concurrency: int
) -> list[dict[str, Any]]:
    """Each job's raw row, in job order, ``concurrency`` at a time."""
    rows: list[dict[str, Any]] = [{} for _ in jobs]
    positions = iter(range(len(jobs)))

    async def work() -> None:
        for i in positions:  # shared by the workers: each position is taken once
            url, _, known = jobs[i]
            try:
                rows[i] = await fetcher.fetch(url, known)
            except CoordinatorLost:
                raise  # the task fails and is retried, instead of recording failures
            except Exception:  # a bug must cost one URL, not the task (as in download.py)
                log.exception("unexpected error fetching %s", url)
                rows[i] = error_row(url)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(jobs))):
            group.create_task(work())
    return rows


def _rows_and_result(
    spec: TaskSpec, fetched: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], TaskResult]:
    """The rows to write (metadata added, revalidated-unchanged ones dropped) and the tally."""
    rows = []
    outcomes: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    failures: list[tuple[str, str, int | None]] = []
    for (url, metadata, known), row in zip(spec.jobs, fetched, strict=True):
        row.update(metadata)
        if known is not None:
            verdict = revalidation_verdict(row, known)
            verdicts[verdict] += 1
            if verdict != "changed":
                continue  # the stored row stays the latest
        outcomes[row["outcome"]] += 1
        if row["outcome"] != "ok":
            failures.append((url, row["outcome"], row.get("status")))
        rows.append(row)
    result = TaskResult(spec.key, None, len(spec.jobs), dict(outcomes), dict(verdicts), failures)
    return rows, result


# --------------------------------------------------------------------------- the driver


def download_on_ray(
    manifest_df: pd.DataFrame,
    raw_root: str,
    config: ScrapeConfig | None = None,
    fanout: FanoutConfig | None = None,
    storage_options: dict[str, Any] | None = None,
    on_progress: ProgressCallback | None = None,
) -> ScrapeResult:
    """Download every manifest URL into raw shards under ``raw_root`` with Ray tasks.

    ``raw_root`` is the raw folder itself: a local folder (shared by every node) or an fsspec
    URL such as ``s3://bucket/prefix/raw`` (``storage_options`` go to its file system). The
    output is what :func:`carmodels.scrape.download_images` would write there: the same rows,
    in shards numbered after the existing ones, and resumable in the same way. Uses this
    process's Ray connection, else connects to ``fanout.address`` for the call.
    ``on_progress(done, total)`` is called as tasks finish.
    """
    ray = require_ray()
    config = config or ScrapeConfig()
    fanout = fanout or FanoutConfig()
    if ray.is_initialized():
        return _download(ray, manifest_df, raw_root, config, fanout, storage_options, on_progress)
    if not fanout.address:
        raise InputError(
            "No Ray cluster to download on: set FanoutConfig.address (ray://head:10001, auto "
            "or local), or call download_on_ray inside carmodels.cluster.ray_session(...)."
        )
    with ray_session(fanout.address):
        return _download(ray, manifest_df, raw_root, config, fanout, storage_options, on_progress)


@dataclass
class _Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str, int | None]] = field(default_factory=list)
    shards: dict[int, str] = field(default_factory=dict)
    done_urls: int = 0

    def add(self, shard_index: int, result: TaskResult) -> None:
        self.outcomes.update(result.outcome_counts)
        self.verdicts.update(result.revalidation_counts)
        self.failures += result.failures
        if result.shard is not None:
            self.shards[shard_index] = result.shard
        self.done_urls += result.n_urls


def _download(
    ray: Any,
    manifest_df: pd.DataFrame,
    raw_root: str,
    config: ScrapeConfig,
    fanout: FanoutConfig,
    storage_options: dict[str, Any] | None,
    on_progress: ProgressCallback | None,
) -> ScrapeResult:
    started = time.perf_counter()
    folder = RawFolder(raw_root, storage_options)
    folder.check()
    manifest = prepare_manifest(manifest_df)
    existing = folder.scan(with_validators=config.revalidate)
    todo = urls_to_fetch(manifest, existing, config)
    metadata_names = metadata_column_names(manifest.columns)
    urls = todo["url"].tolist()
    plan = plan_tasks(urls, fanout.urls_per_task, existing.next_shard_index)
    log.info(
        "downloading %d URL(s) into %s with %d Ray task(s) (%d already there; %d of %d "
        "host(s) span several tasks)",
        len(urls),
        raw_root,
        len(plan.tasks),
        len(manifest) - len(todo),
        len(plan.shared_hosts),
        len(plan.tasks_per_host),
    )
    tally = _Tally()
    if on_progress is not None:
        on_progress(0, len(urls))
    if plan.tasks:
        context = JobContext(
            raw_root=folder.url,
            storage_options=folder.storage_options,
            config=config,
            metadata_columns=tuple(metadata_names.values()),
            # Once per origin for the whole job; every task's fetcher is seeded with these.
            robots_seeds=run_sync(read_robots(config, urls)),
            shared_hosts=plan.shared_hosts,
            coordinator=None,
            lease_s=fanout.lease_s,
            lease_ttl_s=fanout.lease_ttl_s,
        )
        jobs = _jobs(todo, metadata_names, existing.validators if config.revalidate else None)
        _run_tasks(ray, plan, jobs, context, fanout, tally, on_progress)
    elapsed = time.perf_counter() - started
    return ScrapeResult(
        out_dir=folder.display_path(),
        n_urls=len(manifest),
        n_skipped_existing=len(manifest) - len(todo),
        n_fetched=len(urls),
        outcome_counts=dict(tally.outcomes),
        elapsed_s=elapsed,
        images_per_s=tally.outcomes["ok"] / elapsed if elapsed > 0 else 0.0,
        failures=pd.DataFrame(tally.failures, columns=["url", "outcome", "status"]).astype(
            {"status": "Int32"}
        ),
        shard_paths=[folder.display_path(name) for _, name in sorted(tally.shards.items())],
        revalidation_counts=dict(tally.verdicts),
    )


def _jobs(
    todo: pd.DataFrame, metadata_names: dict[str, str], validators: dict[str, Validators] | None
) -> list[Job]:
    """Each URL to fetch with its metadata (as the local downloader's ``_produce`` makes it)."""
    jobs = []
    columns = ["url", *metadata_names]
    for url, *values in todo[columns].itertuples(index=False, name=None):
        cells = zip(metadata_names, values, strict=True)
        metadata = {metadata_names[c]: metadata_value(v) for c, v in cells}
        jobs.append((url, metadata, validators.get(url) if validators is not None else None))
    return jobs


def _run_tasks(
    ray: Any,
    plan: FanoutPlan,
    jobs: list[Job],
    context: JobContext,
    fanout: FanoutConfig,
    tally: _Tally,
    on_progress: ProgressCallback | None,
) -> None:
    """Run the plan's tasks (the coordinator alongside when needed) and tally their results."""
    coordinator = _start_coordinator(ray, context.config, fanout) if plan.shared_hosts else None
    context_ref = ray.put(replace(context, coordinator=coordinator))
    remote_task = ray.remote(run_task)
    task_options: dict[str, Any] = {
        "num_cpus": fanout.task_cpus,
        "max_retries": fanout.task_retries,
        # An exception (a storage hiccup, a lost coordinator call) is retried like a lost node.
        "retry_exceptions": True,
    }
    pending: dict[Any, int] = {}
    errors: list[str] = []
    try:
        for task in plan.tasks:
            spec = TaskSpec(task.key, task.shard_index, tuple(jobs[r] for r in task.rows))
            named = remote_task.options(name=f"carmodels-download-{task.key}", **task_options)
            ref = named.remote(context_ref, spec)
            pending[ref] = task.shard_index
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                shard_index = pending.pop(ref)
                try:
                    result: TaskResult = ray.get(ref)
                except Exception as error:  # retries used up: the others still finish
                    errors.append(_describe(error))
                    continue
                tally.add(shard_index, result)
                if on_progress is not None:
                    on_progress(tally.done_urls, len(jobs))
    finally:
        for ref in pending:  # only when interrupted: stop the tasks still queued or running
            ray.cancel(ref, force=True)
        if coordinator is not None:
            ray.kill(coordinator)
    if errors:
        raise FanoutFailed(
            f"{len(errors)} of {len(plan.tasks)} download task(s) failed after "
            f"{fanout.task_retries} retries (first: {errors[0]}); the other tasks' shards are "
            "saved: run again to fetch the rest"
        )


def _describe(error: BaseException) -> str:
    """One line for a task's failure: the error inside Ray's wrapper and task groups."""
    cause = getattr(error, "cause", None)  # RayTaskError wraps what the task raised
    if isinstance(cause, BaseException):
        error = cause
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {one_line(error, 300)}"


def _start_coordinator(ray: Any, config: ScrapeConfig, fanout: FanoutConfig) -> Any:
    """The host coordinator as a named actor on the driver's node, sharing its fate: if that
    node is lost the download is lost anyway, while a worker node's loss leaves it running.

    Pinned hard: Ray's soft affinity placed it on a worker node when the driver's node had
    no CPUs (a head started with ``num_cpus=0``, as is usual). Where it cannot start there
    within ``COORDINATOR_START_TIMEOUT_S``, Ray places it anywhere instead.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_class = ray.remote(HostCoordinator)
    options: dict[str, Any] = {
        "num_cpus": 0,
        "max_restarts": 0,  # its schedule of starts cannot be rebuilt: better fail the tasks
    }
    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # a driver without a node of its own
        node_id = None
    if node_id:
        pinned = actor_class.options(
            name=_coordinator_name(),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            **options,
        ).remote(config.per_host_limit, fanout.lease_ttl_s)
        try:
            ray.get(pinned.stats.remote(), timeout=COORDINATOR_START_TIMEOUT_S)
            return pinned
        except Exception as error:
            ray.kill(pinned)
            log.warning(
                "the host coordinator could not start on the driver's node (%s); letting Ray "
                "place it",
                _describe(error),
            )
    coordinator = actor_class.options(name=_coordinator_name(), **options).remote(
        config.per_host_limit, fanout.lease_ttl_s
    )
    try:
        ray.get(coordinator.stats.remote(), timeout=COORDINATOR_START_TIMEOUT_S)
    except Exception as error:
        ray.kill(coordinator)
        raise FanoutFailed(
            f"the host coordinator (a zero-CPU actor) did not start within "
            f"{COORDINATOR_START_TIMEOUT_S:g} s ({_describe(error)}); check the cluster's nodes"
        ) from error
    return coordinator


def _coordinator_name() -> str:
    """Unique per download: two downloads on one cluster have a coordinator each."""
    return f"carmodels-host-coordinator-{uuid.uuid4().hex[:12]}"
