"""The Dagster code location: assets, resources, and their settings."""

from __future__ import annotations

import dagster as dg

from pipelines.assets import ALL_ASSETS
from pipelines.resources import StorageResource, default_settings

defs = dg.Definitions(
    assets=ALL_ASSETS,
    resources={
        "storage": StorageResource(),
        "settings": default_settings(),
    },
)
