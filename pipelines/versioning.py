"""Data versions, and skipping a step whose inputs have not changed since it last ran.

Every asset reports a content version of what it wrote (`carmodels.versioning`) as its Dagster
data version, so the UI marks downstream assets "unsynced" only when the data really changed:
re-reading an unchanged manifest gives the same version, and nothing downstream goes stale.

Before doing real work, a step fingerprints its inputs: its code version, its settings, the
storage root and the data versions of the assets it reads. When its last materialisation
recorded the same fingerprint and its output is still in storage, the step does nothing and
records a materialisation with the previous data version and metadata (``skipped: true``).
``force: true`` in a step's config runs it anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import dagster as dg

from carmodels.errors import InputError
from carmodels.versioning import json_version

if TYPE_CHECKING:
    from carmodels.layout import DataLayout
    from pipelines.resources import StorageResource

#: Metadata key holding the fingerprint of the inputs a materialisation was computed from.
FINGERPRINT_KEY = "input_fingerprint"
#: Metadata key saying whether the step skipped its work.
SKIPPED_KEY = "skipped"
#: Where Dagster keeps a materialisation's data version among its tags.
DATA_VERSION_TAG = "dagster/data_version"


class CachedConfig(dg.Config):
    """Config of a step that skips its work when nothing it depends on has changed."""

    #: Run even when the inputs, code and settings are the same as at the last materialisation.
    force: bool = False

    def fingerprint_settings(self) -> dict[str, object]:
        """The settings that shape the output (everything but ``force``)."""
        return self.model_dump(exclude={"force"})


def latest_data_version(instance: dg.DagsterInstance, key: dg.AssetKey | str) -> str | None:
    """The data version of an asset's latest materialisation, or None if it has none."""
    asset_key = dg.AssetKey.from_user_string(key) if isinstance(key, str) else key
    event = instance.get_latest_materialization_event(asset_key)
    if event is None or event.asset_materialization is None:
        return None
    return event.asset_materialization.tags.get(DATA_VERSION_TAG)


def input_fingerprint(
    context: dg.AssetExecutionContext,
    *,
    upstream: Sequence[str],
    settings: Mapping[str, object],
    storage_uri: str,
    partition: str | None = None,
) -> str:
    """A short hash of everything that decides this step's output (for one ``partition``:
    the data versions read are those of that partition, see `partition_data_version`)."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)

    def version(key: str) -> str | None:
        if partition is None:
            return latest_data_version(context.instance, key)
        return partition_data_version(context.instance, key, partition)

    return json_version(
        {
            "code_version": code_version,
            "settings": dict(settings),
            "storage": storage_uri,
            "upstream": {key: version(key) for key in upstream},
        }
    )


def unchanged_result(
    context: dg.AssetExecutionContext, fingerprint: str, *, force: bool, output_present: bool
) -> dg.MaterializeResult | None:
    """The previous result, re-recorded, if this step would compute the same thing again.

    None means: do the work. That is the case when ``force`` is set, when the output is gone
    from storage, when the asset was never materialised, or when anything in the fingerprint
    changed since.
    """
    if force or not output_present:
        return None
    event = context.instance.get_latest_materialization_event(context.asset_key)
    if event is None or event.asset_materialization is None:
        return None
    previous = event.asset_materialization
    recorded = previous.metadata.get(FINGERPRINT_KEY)
    version = previous.tags.get(DATA_VERSION_TAG)
    if recorded is None or recorded.value != fingerprint or version is None:
        return None
    context.log.info(
        f"Inputs, code and settings unchanged since run {event.run_id} "
        f"(fingerprint {fingerprint}): skipping the work and keeping data version {version}. "
        "Set `force: true` in this asset's config to run it anyway."
    )
    metadata = {
        **previous.metadata,
        SKIPPED_KEY: True,
        "computed_in_run": previous.metadata.get("computed_in_run") or event.run_id,
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


def versioned_result(
    context: dg.AssetExecutionContext,
    metadata: Mapping[str, object],
    *,
    data_version: str,
    fingerprint: str,
) -> dg.MaterializeResult:
    """A fresh result carrying its content version and the fingerprint of its inputs."""
    return dg.MaterializeResult(
        metadata={
            **metadata,
            "data_version": data_version,
            FINGERPRINT_KEY: fingerprint,
            SKIPPED_KEY: False,
            "computed_in_run": context.run.run_id,
        },
        data_version=dg.DataVersion(data_version),
    )


@dataclass(frozen=True)
class Requires:
    """An upstream output a step cannot run without: ``path`` under the storage root, written
    by the asset ``asset``, described as ``what`` in the error when it is missing."""

    asset: str
    path: str
    what: str


def require_upstream(storage: StorageResource, requires: Requires) -> None:
    """Fail with a message that names the upstream asset to materialise first."""
    if not storage.exists(requires.path):
        raise dg.Failure(
            description=(
                f"{requires.what} not found at {storage.uri(requires.path)}: the upstream asset "
                f"`{requires.asset}` has not been materialised with this storage root. "
                f"Materialise it first, e.g. `dagster asset materialize --select "
                f"'*{requires.asset}'`, or materialise this asset together with its upstream "
                "(`--select '*<this asset>'`)."
            ),
            allow_retries=False,
        )


def start_step(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    *,
    requires: Requires | None,
    upstream: Sequence[str],
    settings: Mapping[str, object],
    force: bool,
    output: str,
) -> tuple[str, dg.MaterializeResult | None]:
    """Every step's prologue: check its input exists, fingerprint what decides its output,
    and find whether the previous result still stands.

    Returns ``(fingerprint, skipped)``: when ``skipped`` is not None the step returns it and
    does nothing else; otherwise it does its work and records ``fingerprint`` with
    :func:`versioned_result`. ``output`` is the path (under the storage root) whose presence
    says the previous output is still there.
    """
    if requires is not None:
        require_upstream(storage, requires)
    fingerprint = input_fingerprint(
        context, upstream=upstream, settings=settings, storage_uri=storage.uri()
    )
    # A forced step never skips: spare it the look at storage (a request on a remote root).
    skipped = unchanged_result(
        context, fingerprint, force=force, output_present=not force and storage.exists(output)
    )
    return fingerprint, skipped


@contextmanager
def input_errors_fail_the_step() -> Iterator[None]:
    """Bad input (:class:`carmodels.errors.InputError`) fails the step with its one-line
    message, naming the input and the fix, and no retry: retrying cannot fix the input."""
    try:
        yield
    except InputError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None


T = TypeVar("T")


def library_settings(asset: str, build: Callable[[], T]) -> T:
    """The library's settings object for ``asset``, built from its config by ``build``.

    The library's config classes reject impossible values with a ValueError that names the
    setting (``ShardConfig.val_fraction must be in [0, 1)``); here that is bad input in the
    asset's config, said in one line, not a bug with a traceback.
    """
    try:
        return build()
    except InputError:
        raise
    except ValueError as exc:
        raise InputError(
            f"{asset} config: {exc}; fix it in the run config or the project config file."
        ) from None


@dataclass(frozen=True)
class Step:
    """What a step needs and touches under the storage root.

    ``requires``: the upstream output it cannot run without. ``upstream``: the assets whose
    data versions decide its output. ``pull``/``push``: the folders it reads and writes
    (a remote root is worked on through a local copy). ``output``: the path whose presence
    says its previous result is still there. ``cached=False`` runs it every time (a source
    that may change without its config changing).
    """

    requires: Requires | None
    upstream: Sequence[str]
    output: str
    pull: Sequence[str] = ()
    push: Sequence[str] = ()
    cached: bool = True


@dataclass
class StepOutput:
    """What a step's work returns: its metadata and the content version of what it wrote."""

    data_version: str
    metadata: dict[str, object] = field(default_factory=dict)


def run_step(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    step: Step,
    *,
    settings: Mapping[str, object],
    force: bool,
    work: Callable[[DataLayout], StepOutput],
) -> dg.MaterializeResult:
    """Every asset's envelope: check its input, skip when nothing changed, run ``work`` in a
    working copy of the storage root, and record the result with its versions.

    Bad input fails the step with one line (:func:`input_errors_fail_the_step`).
    """
    with input_errors_fail_the_step():
        fingerprint, skipped = start_step(
            context,
            storage,
            requires=step.requires,
            upstream=step.upstream,
            settings=settings,
            force=force or not step.cached,
            output=step.output,
        )
        if skipped is not None:
            return skipped
        with storage.working_copy(pull=step.pull, push=step.push) as layout:
            output = work(layout)
    return versioned_result(
        context, output.metadata, data_version=output.data_version, fingerprint=fingerprint
    )


# --------------------------------------------------------------------------- partitions
#
# A partitioned step may run several partitions in one run (a backfill's multi-run policy
# gives each run a range). Dagster records the step's one result for every partition of the
# range, so the per-partition facts live in that result's metadata: each partition's
# fingerprint and data version, under the keys below, read back by partition.

#: Metadata keys: partition -> fingerprint of its inputs, partition -> its data version.
PARTITION_FINGERPRINTS_KEY = "partition_fingerprints"
PARTITION_VERSIONS_KEY = "partition_versions"


def _latest_partition_event(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def _partition_entry(
    materialization: dg.AssetMaterialization, metadata_key: str, partition: str
) -> str | None:
    entry = materialization.metadata.get(metadata_key)
    value = entry.value if entry is not None else None
    return value.get(partition) if isinstance(value, dict) else None


def partition_data_version(
    instance: dg.DagsterInstance, key: dg.AssetKey | str, partition: str
) -> str | None:
    """The data version of one partition of an asset, or None if it was never materialised.

    For an unpartitioned asset that covers every partition (the partitioned ingest's dedup),
    the version of its share for ``partition``, as its metadata records it.
    """
    asset_key = dg.AssetKey.from_user_string(key) if isinstance(key, str) else key
    record = _latest_partition_event(instance, asset_key, partition)
    if record is None:
        whole = instance.get_latest_materialization_event(asset_key)
        if whole is None or whole.asset_materialization is None:
            return None
        return _partition_entry(whole.asset_materialization, PARTITION_VERSIONS_KEY, partition)
    if record.asset_materialization is None:
        return None
    materialization = record.asset_materialization
    return _partition_entry(
        materialization, PARTITION_VERSIONS_KEY, partition
    ) or materialization.tags.get(DATA_VERSION_TAG)


@dataclass(frozen=True)
class PartitionOutput:
    """One partition's share of a partitioned step: skipped (the previous output stands) or
    computed, with its version and metadata."""

    partition: str
    fingerprint: str
    data_version: str
    metadata: Mapping[str, object]
    skipped: bool


def run_partitioned_step(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    step_for: Callable[[str], Step],
    *,
    settings_for: Callable[[str], Mapping[str, object]],
    force: bool,
    work: Callable[[DataLayout, str], StepOutput],
    work_together: Callable[[DataLayout, list[str]], dict[str, StepOutput]] | None = None,
) -> dg.MaterializeResult:
    """:func:`run_step` for each partition of the run, one after the other.

    Each partition is fingerprinted with the data versions of the same partition of its
    upstream assets (``step_for(p).upstream``) and skipped on its own when nothing changed.
    One partition: its metadata as :func:`run_step` records it. Several (a range): per
    partition counts in a table, their sums, and a data version over all of them.

    ``work_together``, when given, does the partitions that are not skipped in one call (on a
    cluster, at once), in one working copy holding every one's folders.
    """
    outputs: list[PartitionOutput] = []
    todo: dict[str, tuple[Step, str]] = {}
    with input_errors_fail_the_step():
        for partition in context.partition_keys:
            step = step_for(partition)
            if step.requires is not None:
                require_upstream(storage, step.requires)
            fingerprint = input_fingerprint(
                context,
                upstream=step.upstream,
                settings=settings_for(partition),
                storage_uri=storage.uri(),
                partition=partition,
            )
            previous = None
            if not (force or not step.cached) and storage.exists(step.output):
                previous = _unchanged_partition(context, partition, fingerprint)
            if previous is not None:
                outputs.append(previous)
            else:
                todo[partition] = (step, fingerprint)
        if work_together is not None and todo:
            steps = [step for step, _ in todo.values()]
            with storage.working_copy(
                pull=[path for step in steps for path in step.pull],
                push=[path for step in steps for path in step.push],
            ) as layout:
                done = work_together(layout, list(todo))
        else:
            done = {}
            for partition, (step, _) in todo.items():
                with storage.working_copy(pull=step.pull, push=step.push) as layout:
                    done[partition] = work(layout, partition)
        for partition, (_, fingerprint) in todo.items():
            output = done[partition]
            outputs.append(
                PartitionOutput(partition, fingerprint, output.data_version, output.metadata, False)
            )
    return _partitioned_result(context, sorted(outputs, key=lambda o: o.partition))


def _unchanged_partition(
    context: dg.AssetExecutionContext, partition: str, fingerprint: str
) -> PartitionOutput | None:
    record = _latest_partition_event(context.instance, context.asset_key, partition)
    if record is None or record.asset_materialization is None:
        return None
    materialization = record.asset_materialization
    if _partition_entry(materialization, PARTITION_FINGERPRINTS_KEY, partition) != fingerprint:
        return None
    version = _partition_entry(materialization, PARTITION_VERSIONS_KEY, partition)
    if version is None:
        return None
    context.log.info(
        f"Partition {partition}: inputs, code and settings unchanged since run "
        f"{record.run_id}; skipping its work and keeping data version {version}."
    )
    metadata = {
        key: value
        for key, value in materialization.metadata.items()
        if key not in (PARTITION_FINGERPRINTS_KEY, PARTITION_VERSIONS_KEY, "partitions")
    }
    return PartitionOutput(partition, fingerprint, version, metadata, True)


def _partitioned_result(
    context: dg.AssetExecutionContext, outputs: Sequence[PartitionOutput]
) -> dg.MaterializeResult:
    versions = {o.partition: o.data_version for o in outputs}
    facts: dict[str, object] = {
        PARTITION_FINGERPRINTS_KEY: {o.partition: o.fingerprint for o in outputs},
        PARTITION_VERSIONS_KEY: versions,
        SKIPPED_KEY: all(o.skipped for o in outputs),
        "computed_in_run": context.run.run_id,
    }
    if len(outputs) == 1:
        only = outputs[0]
        metadata = {**only.metadata, **facts, "data_version": only.data_version}
        return dg.MaterializeResult(
            metadata=metadata, data_version=dg.DataVersion(only.data_version)
        )
    # A range: what a person compares across partitions (counts), per partition and summed.
    numbers = {
        o.partition: {
            key: value
            for key, value in o.metadata.items()
            if isinstance(value, int | float)
            and not isinstance(value, bool)
            and not key.startswith("dagster/")
            and "_per_s" not in key  # a rate does not add up
        }
        for o in outputs
    }
    totals: dict[str, float] = {}
    for counts in numbers.values():
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    # Words every partition says alike (where the work ran, say) hold for the range.
    shared = {
        key: value
        for key, value in outputs[0].metadata.items()
        if isinstance(value, str) and all(o.metadata.get(key) == value for o in outputs)
    }
    version = json_version(versions)
    return dg.MaterializeResult(
        metadata={
            **shared,
            **{key: round(value, 2) for key, value in totals.items()},
            "partitions": dg.MetadataValue.json(
                {o.partition: {**numbers[o.partition], SKIPPED_KEY: o.skipped} for o in outputs}
            ),
            **facts,
            "data_version": version,
        },
        data_version=dg.DataVersion(version),
    )
