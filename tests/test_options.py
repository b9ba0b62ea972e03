"""Command-line options made from a config dataclass's fields (`carmodels.options`), and the
Dagster config fields made from them (`pipelines.config_fields`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from carmodels.options import add_dataclass_options, field_default, field_help, from_args


@dataclass(frozen=True)
class Settings:
    size: int = field(default=64, metadata={"help": "side in pixels, 100% of it"})
    rate: float | None = field(default=None, metadata={"help": "rate; unset = none"})
    mode: str = field(default="fast", metadata={"help": "how", "choices": ("fast", "slow")})
    verbose: bool = field(default=False, metadata={"help": "say more"})
    mirror: bool = field(default=True, metadata={"help": "mirror the images"})
    hidden: int = 3


NAMES = ("size", "rate", "mode", "verbose", "mirror")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test")
    add_dataclass_options(p, Settings, NAMES, flags={"mode": "--how", "mirror": "--no-mirror"})
    return p


def test_left_out_options_keep_the_dataclass_defaults() -> None:
    assert from_args(Settings, parser().parse_args([]), NAMES) == Settings()


def test_given_options_are_parsed_with_the_field_types() -> None:
    args = parser().parse_args(
        ["--size", "32", "--rate", "0.5", "--how", "slow", "--verbose", "--no-mirror"]
    )
    assert from_args(Settings, args, NAMES) == Settings(
        size=32, rate=0.5, mode="slow", verbose=True, mirror=False
    )


def test_overrides_win_and_none_overrides_are_left_out() -> None:
    args = parser().parse_args(["--size", "32"])
    assert from_args(Settings, args, NAMES, size=16, hidden=None).size == 16


def test_help_shows_the_field_help_and_default() -> None:
    text = " ".join(parser().format_help().split())
    assert "--size SIZE side in pixels, 100% of it (default: 64)" in text
    assert "--rate RATE rate; unset = none" in text  # no default shown for None
    assert "--how {fast,slow} how (default: fast)" in text
    assert "--no-mirror turn off: mirror the images" in text


def test_a_bad_choice_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--how", "medium"])


def test_fields_without_help_or_on_by_default_without_a_no_flag_are_refused() -> None:
    with pytest.raises(AttributeError, match="hidden"):
        field_help(Settings, "hidden")
    with pytest.raises(ValueError, match="--no-"):
        add_dataclass_options(argparse.ArgumentParser(), Settings, ["mirror"])


# --------------------------------------------------------------------------- Dagster config


def _library_fields() -> list[tuple[type, str, type, str]]:
    """(Dagster config class, its setting, library dataclass, the dataclass's field)."""
    from carmodels.evaluate import EvalConfig
    from carmodels.generate import GenerateConfig
    from carmodels.metrics.fid import FidConfig
    from carmodels.train import TrainConfig
    from pipelines.assets import EvaluateDcganConfig, TrainDcganConfig
    from pipelines.designs import DesignSamplesConfig

    return [
        (TrainDcganConfig, "memory_budget_mb", TrainConfig, "memory_budget_mb"),
        (EvaluateDcganConfig, "n_samples", EvalConfig, "n_samples"),
        (EvaluateDcganConfig, "seed", EvalConfig, "seed"),
        (EvaluateDcganConfig, "inception_weights", FidConfig, "weights_path"),
        (EvaluateDcganConfig, "fid_samples", FidConfig, "n_samples"),
        *(
            (DesignSamplesConfig, name, GenerateConfig, name)
            for name in ("n", "seed", "truncation", "interpolation_steps")
        ),
    ]


@pytest.mark.parametrize(
    ("config", "setting", "library", "name"),
    _library_fields(),
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_dagster_settings_take_default_and_description_from_the_library(
    config: type, setting: str, library: type, name: str
) -> None:
    # (Assumes no project config file sets these: its values would be the defaults.)
    found = config.model_fields[setting]  # type: ignore[attr-defined]
    assert found.default == field_default(library, name)
    assert found.description and found.description.startswith(field_help(library, name))


def test_design_samples_device_has_the_library_description_and_its_own_default() -> None:
    from carmodels.generate import GenerateConfig
    from pipelines.designs import DesignSamplesConfig

    device = DesignSamplesConfig.model_fields["device"]
    assert device.description == field_help(GenerateConfig, "device")
    assert device.default == "auto"  # the asset uses the GPU when there is one
