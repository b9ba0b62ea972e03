"""Scheduled retraining: weekly by default, off until automation is switched on."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import dagster as dg

from pipelines.jobs import retrain_job

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

#: Environment settings (read when the code location loads).
AUTOMATION_ENV = "CARMODELS_AUTOMATION"
RETRAIN_CRON_ENV = "CARMODELS_RETRAIN_CRON"
RETRAIN_TIMEZONE_ENV = "CARMODELS_RETRAIN_TIMEZONE"
#: Mondays at 03:00.
DEFAULT_RETRAIN_CRON = "0 3 * * 1"
DEFAULT_RETRAIN_TIMEZONE = "UTC"


def automation_enabled() -> bool:
    """Schedules and sensors run when ``CARMODELS_AUTOMATION`` is ``on`` (or 1/true/yes)."""
    return os.environ.get(AUTOMATION_ENV, "off").strip().lower() in {"on", "1", "true", "yes"}


def default_status() -> dg.DefaultScheduleStatus:
    return (
        dg.DefaultScheduleStatus.RUNNING
        if automation_enabled()
        else dg.DefaultScheduleStatus.STOPPED
    )


def build_retrain_schedule(
    missing_source: str | None,
    job: UnresolvedAssetJobDefinition = retrain_job,
    partitions: str | None = None,
) -> dg.ScheduleDefinition:
    """The weekly retraining schedule.

    ``missing_source`` says why a run could not read any listings (no source in the project
    config file and none from the profile), or is None. A tick then records that reason and
    starts nothing, rather than a run that is bound to fail at its first step. The listing
    source and every other setting come from the project config file, as for any run.

    Under partitioned ingest, ``partitions`` names the dynamic partitions: a tick before the
    first manifest was added starts nothing and says so.
    """

    @dg.schedule(
        name="weekly_retrain",
        job=job,
        cron_schedule=os.environ.get(RETRAIN_CRON_ENV, DEFAULT_RETRAIN_CRON),
        execution_timezone=os.environ.get(RETRAIN_TIMEZONE_ENV, DEFAULT_RETRAIN_TIMEZONE),
        default_status=default_status(),
        description="Refresh ingest, retrain and evaluate the DCGAN.",
    )
    def weekly_retrain(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        if missing_source is not None:
            return dg.SkipReason(missing_source)
        if partitions is not None and not context.instance.get_dynamic_partitions(partitions):
            return dg.SkipReason(
                "no manifest partition yet: drop a manifest into the watched folder "
                "($CARMODELS_WATCH_DIR, default <data>/incoming) and switch on the manifest "
                "sensor, or add partitions in the UI."
            )
        return dg.RunRequest()

    return weekly_retrain
