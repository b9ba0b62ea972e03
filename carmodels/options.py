"""Settings a person may set, described once: on the library's config dataclass.

A stage's config dataclass is the one source of each setting's default. The fields a person
may set also carry a one-line help, and where only some values are valid their list, in the
field's metadata::

    threshold: int = field(default=10, metadata={"help": "largest Hamming distance ..."})
    framing: str = field(default="letterbox", metadata={"help": "...", "choices": FRAMINGS})

From those, :func:`add_dataclass_options` makes the command line's options (flag, type,
choices, and help that shows the default) and :func:`from_args` makes the dataclass back from
the parsed options. An option left out is None on the command line and is not passed on, so
the dataclass's own default applies. :func:`field_help` and :func:`field_default` give the
same text and values to other front ends (the Dagster config classes in ``pipelines/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

#: Field metadata key: the setting's help, one line, lower case, no full stop.
HELP = "help"
#: Field metadata key: the values the setting accepts, when only some strings are valid.
CHOICES = "choices"

Config = TypeVar("Config")

#: Field types an option can parse, by how a ``from __future__ import annotations`` module
#: spells them.
_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def config_field(cls: type, name: str) -> dataclasses.Field[Any]:
    """The dataclass field ``name`` of ``cls``."""
    for candidate in dataclasses.fields(cls):
        if candidate.name == name:
            return candidate
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def field_help(cls: type, name: str) -> str:
    """The one-line help of setting ``name`` of ``cls``."""
    text = config_field(cls, name).metadata.get(HELP)
    if not text:
        raise AttributeError(f"{cls.__name__}.{name} has no {HELP!r} in its field metadata")
    return str(text)


def field_choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The values setting ``name`` of ``cls`` accepts, or None when it takes any."""
    choices = config_field(cls, name).metadata.get(CHOICES)
    return tuple(choices) if choices is not None else None


def field_default(cls: type, name: str) -> Any:
    """The default of setting ``name`` of ``cls``."""
    found = config_field(cls, name)
    if found.default is not dataclasses.MISSING:
        return found.default
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    raise AttributeError(f"{cls.__name__}.{name} has no default")


def _scalar_type(cls: type, name: str) -> type:
    """int, float, str or bool: the type of a field, ``| None`` removed."""
    annotation = config_field(cls, name).type
    if isinstance(annotation, str):
        names = {part.strip() for part in annotation.split("|")} - {"None"}
        parts = {_SCALARS.get(part) for part in names}
    else:
        parts = set(typing.get_args(annotation)) - {types.NoneType} or {annotation}
    scalar = parts.pop() if len(parts) == 1 else None
    if scalar not in _SCALARS.values():
        raise TypeError(f"{cls.__name__}.{name}: an option needs int, float, str or bool")
    return scalar  # type: ignore[return-value]


def _shown(default: object) -> str:
    return "''" if default == "" else str(default)


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str],
    *,
    flags: Mapping[str, str] | None = None,
) -> None:
    """Add an option to ``parser`` for each field ``names`` of the dataclass ``cls``.

    The flag is ``--field-name`` unless ``flags`` names another; the option's dest is the
    field's name either way. A field off by default becomes a switch that turns it on; a
    field on by default needs a ``--no-...`` flag in ``flags``, which turns it off; a
    ``bool | None`` field whose default is None (unset = decided elsewhere) gets both
    ``--flag`` and ``--no-flag`` and stays None when neither is given. Other options take the
    field's type and choices, default to None, and show the field's default in their help.
    """
    for name in names:
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        text = field_help(cls, name).replace("%", "%%")  # argparse formats help with %
        default = field_default(cls, name)
        kind = _scalar_type(cls, name)
        if kind is bool:
            if default is None:
                parser.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
                )
                continue
            if not default:
                parser.add_argument(flag, dest=name, action="store_true", help=text)
                continue
            if not flag.startswith("--no-"):
                raise ValueError(f"{cls.__name__}.{name} is on by default: give it a --no- flag")
            parser.add_argument(flag, dest=name, action="store_false", help=f"turn off: {text}")
            continue
        choices = field_choices(cls, name)
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            choices=choices,
            # As argparse would name it from the flag (a renamed flag keeps its own name).
            metavar=None if choices else flag.lstrip("-").replace("-", "_").upper(),
            help=text if default is None else f"{text} (default: {_shown(default)})",
        )


def from_args(
    cls: type[Config], args: argparse.Namespace, names: Iterable[str], **overrides: object
) -> Config:
    """``cls`` made from the options ``names`` (added by `add_dataclass_options`) and
    ``overrides``; those that are None (left out) keep the dataclass's default."""
    given: dict[str, object] = {name: getattr(args, name) for name in names}
    given.update(overrides)
    return cls(**{key: value for key, value in given.items() if value is not None})
