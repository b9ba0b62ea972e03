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

from collections.abc import Mapping, Sequence

import dagster as dg

from carmodels.versioning import json_version

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
) -> str:
    """A short hash of everything that decides this step's output."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
    return json_version(
        {
            "code_version": code_version,
            "settings": dict(settings),
            "storage": storage_uri,
            "upstream": {key: latest_data_version(context.instance, key) for key in upstream},
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
