"""The project configuration file: the defaults of every run, checked when the code loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from pipelines.project_config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    ProjectConfigError,
    check_asset_names,
    config_path,
    defaults_from_file,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write the project config file and point $CARMODELS_CONFIG at it."""
    path = tmp_path / "carmodels.yaml"

    def write(text: str) -> Path:
        path.write_text(text)
        monkeypatch.setenv(CONFIG_ENV, str(path))
        return path

    return write


class _Settings(dg.Config):
    path: str | None = None
    epochs: int = 3
    urls: list[str] = []


def test_file_values_become_the_defaults_and_a_run_config_overrides_them(config_file) -> None:
    config_file("probe:\n  config:\n    path: /data/a.csv\n    epochs: 7\n")
    settings = defaults_from_file("probe")(_Settings)
    assert settings().path == "/data/a.csv" and settings().epochs == 7
    assert settings().urls == []  # what the file leaves alone keeps its default

    seen: list[tuple[str | None, int]] = []

    def probe_fn(config) -> None:
        seen.append((config.path, config.epochs))

    # The annotation must be the class object itself (this module has postponed annotations).
    probe_fn.__annotations__["config"] = settings
    probe = dg.asset(name="probe")(probe_fn)

    assert dg.materialize([probe]).success
    assert dg.materialize([probe], run_config={"ops": {"probe": {"config": {"epochs": 9}}}}).success
    assert seen == [("/data/a.csv", 7), ("/data/a.csv", 9)]


def test_no_file_leaves_the_class_as_it_is(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert config_path() is None
    assert defaults_from_file("probe")(_Settings) is _Settings
    (tmp_path / DEFAULT_CONFIG_NAME).write_text("probe:\n  config:\n    epochs: 4\n")
    assert config_path() == tmp_path / DEFAULT_CONFIG_NAME
    assert defaults_from_file("probe")(_Settings)().epochs == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("probe:\n  config:\n    epoch: 7\n", "has no setting 'epoch'"),
        ("probe:\n  config:\n    epochs: many\n", "probe.config.epochs"),
        ("probe:\n  settings:\n    epochs: 7\n", "must hold one key, `config:`"),
        ("probe:\n  config: [1, 2]\n", "must be a mapping"),
        ("- probe\n", "expected a mapping of asset names"),
        ("probe:\n  config:\n    epochs: [\n", "not valid YAML at line"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(config_file, text, expected) -> None:
    path = config_file(text)
    with pytest.raises(ProjectConfigError) as error:
        defaults_from_file("probe")(_Settings)
    message = str(error.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_an_unknown_asset_is_named(config_file) -> None:
    config_file("train_dcgna:\n  config:\n    epochs: 2\n")
    with pytest.raises(ProjectConfigError, match="no asset named 'train_dcgna'.*train_dcgan"):
        check_asset_names({"train_dcgan": object()})


def test_a_missing_named_file_is_an_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "nope.yaml"))
    with pytest.raises(ProjectConfigError, match="nope.yaml, which is not a file"):
        config_path()


def _load_definitions(env: dict[str, str], code: str) -> dict:
    """Run ``code`` after importing the code location in a fresh interpreter, as Dagster
    does, and return the JSON it prints."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import json\nimport pipelines.definitions as d\n{code}"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_SCHEDULE_PROBE = """
import dagster as dg
from pipelines.assets import ListingManifestConfig, TrainDcganConfig
schedule = d.defs.get_schedule_def("weekly_retrain")
with dg.instance_for_test() as instance:
    data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
print(json.dumps({
    "manifest_path": ListingManifestConfig().manifest_path,
    "epochs": TrainDcganConfig().epochs,
    "run_requests": len(data.run_requests or []),
    "skip": data.skip_message,
}))
"""


@pytest.mark.slow
def test_the_full_profile_schedule_runs_from_the_config_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    base = {"CARMODELS_PROFILE": "full", "DAGSTER_HOME": str(home)}
    base.pop(CONFIG_ENV, None)
    env_without = {**base, CONFIG_ENV: ""}
    # No source anywhere: the tick starts nothing and says what to set, instead of a run that
    # would fail at its first step.
    without = _load_definitions(env_without, _SCHEDULE_PROBE)
    assert without["run_requests"] == 0
    assert "manifest_path" in without["skip"] and DEFAULT_CONFIG_NAME in without["skip"]

    # The file in $DAGSTER_HOME names a manifest: every tick starts a run with it.
    (home / DEFAULT_CONFIG_NAME).write_text(
        "listing_manifest:\n  config:\n    manifest_path: /srv/listings.csv\n"
        "train_dcgan:\n  config:\n    epochs: 5\n"
    )
    with_file = _load_definitions(env_without, _SCHEDULE_PROBE)
    assert with_file == {
        "manifest_path": "/srv/listings.csv",
        "epochs": 5,
        "run_requests": 1,
        "skip": None,
    }


@pytest.mark.slow
def test_a_broken_file_stops_the_code_location_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "carmodels.yaml"
    path.write_text("raw_images:\n  config:\n    concurrency: lots\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import pipelines.definitions"],
        cwd=REPO,
        env={**os.environ, CONFIG_ENV: str(path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert f"{path}: `raw_images.config.concurrency`" in proc.stderr
