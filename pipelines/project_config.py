"""The project configuration file: the defaults of every run, in one YAML file.

Its top-level keys are asset names, each with a ``config:`` mapping: exactly what would go
under ``ops:`` in a Dagster run config::

    listing_manifest:
      config:
        manifest_path: /data/listings/final_data.csv
    train_dcgan:
      config:
        epochs: 170

The file is ``$CARMODELS_CONFIG`` when that is set (it must then exist), else
``$DAGSTER_HOME/carmodels.yaml`` when that exists. Its values become the defaults of the
assets' config schemas when the code location loads, so every way of starting a run sees
them: the UI's launchpad (which shows them), the schedule, the sensors, ``dagster asset
materialize`` and ``dagster job execute``. A run config given explicitly overrides them, field
by field. Every value is checked against the asset's config class when the code location
loads: an unknown asset, an unknown setting or a value of the wrong type is an error that names
the file, the key and what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import pydantic
import yaml
from pydantic.fields import FieldInfo

from carmodels.errors import InputError

#: Names the project configuration file.
CONFIG_ENV = "CARMODELS_CONFIG"
#: The file looked for in $DAGSTER_HOME when $CARMODELS_CONFIG is not set.
DEFAULT_CONFIG_NAME = "carmodels.yaml"

ConfigClass = TypeVar("ConfigClass", bound=type[dg.Config])


class ProjectConfigError(InputError):
    """The project configuration file is missing, unreadable or names unknown settings."""


def config_path() -> Path | None:
    """The project configuration file in force, or None when there is none."""
    explicit = os.environ.get(CONFIG_ENV, "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ProjectConfigError(
                f"${CONFIG_ENV} names {path}, which is not a file: create it, or unset "
                f"${CONFIG_ENV} to use $DAGSTER_HOME/{DEFAULT_CONFIG_NAME}."
            )
        return path
    home = os.environ.get("DAGSTER_HOME", "").strip()
    if home and (Path(home) / DEFAULT_CONFIG_NAME).is_file():
        return Path(home) / DEFAULT_CONFIG_NAME
    return None


def _read(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ProjectConfigError(
            f"{path}: not valid YAML{where} ({getattr(exc, 'problem', exc)}); fix the file."
        ) from None
    except OSError as exc:
        raise ProjectConfigError(f"{path}: cannot be read ({exc.strerror}).") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ProjectConfigError(
            f"{path}: expected a mapping of asset names to `config:` mappings, got "
            f"{type(loaded).__name__}."
        )
    sections: dict[str, dict[str, Any]] = {}
    for asset, section in loaded.items():
        if section is None:
            continue
        if not isinstance(section, dict) or set(section) - {"config"}:
            raise ProjectConfigError(
                f"{path}: `{asset}` must hold one key, `config:`, with the asset's settings "
                "(as under `ops:` in a Dagster run config)."
            )
        values = section.get("config") or {}
        if not isinstance(values, dict):
            raise ProjectConfigError(f"{path}: `{asset}.config` must be a mapping of settings.")
        sections[str(asset)] = values
    return sections


def project_config() -> dict[str, dict[str, Any]]:
    """The file's settings by asset name (empty when there is no file)."""
    return _read(config_path())


def describe() -> str:
    """One line saying which configuration file is in force."""
    path = config_path()
    if path is None:
        return (
            f"project config: none (set ${CONFIG_ENV} or create "
            f"$DAGSTER_HOME/{DEFAULT_CONFIG_NAME})"
        )
    assets = sorted(project_config())
    return f"project config: {path} ({', '.join(assets) if assets else 'no settings'})"


#: Asset name -> its config class, as registered by :func:`defaults_from_file`.
_REGISTERED: dict[str, type[dg.Config]] = {}


def defaults_from_file(asset: str) -> Callable[[ConfigClass], ConfigClass]:
    """Class decorator: the config class of ``asset`` with the file's values as its defaults.

    Returns a subclass (same name and docs) whose field defaults are the file's values, so
    Dagster's config schema, and with it every launch path, carries them.
    """

    def apply(cls: ConfigClass) -> ConfigClass:
        _REGISTERED[asset] = cls
        values = project_config().get(asset, {})
        if not values:
            return cls
        path = config_path()
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            raise ProjectConfigError(
                f"{path}: `{asset}` has no setting {', '.join(map(repr, unknown))}; its "
                f"settings are {', '.join(sorted(cls.model_fields))}."
            )
        try:
            cls.model_validate(values)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ProjectConfigError(
                f"{path}: `{asset}.config.{field}`: {first['msg']} (got {first.get('input')!r})."
            ) from None
        fields: dict[str, Any] = {
            name: (
                cls.model_fields[name].annotation,
                FieldInfo.merge_field_infos(cls.model_fields[name], default=value),
            )
            for name, value in values.items()
        }
        return pydantic.create_model(  # type: ignore[call-overload,no-any-return]
            cls.__name__, __base__=cls, __module__=cls.__module__, __doc__=cls.__doc__, **fields
        )

    return apply


def check_asset_names(known: Mapping[str, object]) -> None:
    """Fail when the file configures an asset the code location does not have."""
    unknown = sorted(set(project_config()) - set(known))
    if unknown:
        raise ProjectConfigError(
            f"{config_path()}: no asset named {', '.join(map(repr, unknown))}; the configurable "
            f"assets are {', '.join(sorted(known))}."
        )


def registered_configs() -> dict[str, type[dg.Config]]:
    """Asset name -> config class, for every asset whose config the file may set."""
    return dict(_REGISTERED)
