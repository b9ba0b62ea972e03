"""Dagster config fields made from the library's config dataclasses.

A setting an asset passes on to a library stage takes its default and its description from
the stage's dataclass field (`carmodels.options`), so the launchpad shows what the setting
means and the default is stated once, in the library::

    class UniqueImagesConfig(CachedConfig):
        threshold: int = library_field(dedup.DedupConfig, "threshold")

and the asset builds the dataclass back with ``DedupConfig(**library_kwargs(config,
DedupConfig))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic

from carmodels.options import field_choices, field_default, field_help

#: `library_field`'s ``default`` when the library's default applies.
_LIBRARY_DEFAULT: Any = object()


def library_field(cls: type, name: str, *, default: Any = _LIBRARY_DEFAULT) -> Any:
    """A pydantic field for setting ``name`` of the dataclass ``cls``: its help as the
    description (with the accepted values, if only some are) and its default, unless
    ``default`` sets another one here."""
    description = field_help(cls, name)
    choices = field_choices(cls, name)
    if choices:
        description += f" (one of: {', '.join(choices)})"
    if default is _LIBRARY_DEFAULT:
        default = field_default(cls, name)
    return pydantic.Field(default=default, description=description)


def library_kwargs(config: pydantic.BaseModel, cls: type) -> dict[str, Any]:
    """The settings of ``config`` that are fields of the dataclass ``cls``, by name."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {name: getattr(config, name) for name in type(config).model_fields if name in names}
