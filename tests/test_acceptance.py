"""Acceptance: the pipeline used as a person uses it, through the command line.

1. Your own photos on your own web server: a plain static HTTP server on 127.0.0.1 serves car
   photos (the shared real sample when ``../shared`` is there, else photos drawn by the demo's
   drawing code), a manifest CSV lists them, and a project config file says where the manifest
   is, allows the loopback server and keeps training small. The `retrain` job runs under the
   `full` profile with nothing but that file (``dagster job execute``), twice: the second run
   trains nothing. New rows in the manifest: a third run downloads only the new URLs.
2. ``make demo`` twice (``python -m pipelines.demo`` with the environment `make` sets): the
   second run trains nothing.

Each run is a real subprocess against a Dagster instance in a temporary home; what the runs did
is read back from that instance, as the UI would show it.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import CARS_SAMPLE

REPO = Path(__file__).resolve().parents[1]
#: The venv's executables (the test runs in it): what an activated venv puts first on PATH.
VENV_BIN = Path(sys.executable).parent
#: Photos in the first manifest, and photos the manifest gains before the third run.
FIRST_PHOTOS = 40
NEW_PHOTOS = 12
#: Each pipeline run as a subprocess may take this long at most (a loaded 2-core machine).
RUN_TIMEOUT_S = 900
#: Metadata and tag names a person reads in the UI (see the README's "Caching" section).
SKIPPED = "skipped"
DATA_VERSION = "dagster/data_version"


# --------------------------------------------------------------------------- photos and server


def _shared_photos(count: int) -> tuple[Path, list[dict[str, object]]]:
    """The first ``count`` photos of the shared sample, served from its own folder."""
    sample = pd.read_csv(CARS_SAMPLE / "manifest.csv").head(count)
    rows = [
        {
            "path": row.image,
            "make": row.make,
            "model": row.model,
            "year": int(row.year),
            "type": row.type,
        }
        for row in sample.itertuples()
    ]
    return CARS_SAMPLE, rows


def _drawn_photos(folder: Path, count: int) -> tuple[Path, list[dict[str, object]]]:
    """``count`` car photos drawn by the demo's drawing code, saved as JPEGs under ``folder``."""
    from carmodels.demo import BODY_TYPES, CAR_COLOURS, FACINGS, VIEWS, draw_car
    from carmodels.demo.drawing import random_size

    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = list(CAR_COLOURS)
    rows = []
    for index in range(count):
        rng = np.random.default_rng([7, index])
        body_type = BODY_TYPES[index % len(BODY_TYPES)]
        image = draw_car(
            rng,
            body_type=body_type,
            colour=colours[int(rng.integers(len(colours)))],
            facing=FACINGS[int(rng.integers(len(FACINGS)))],
            view=VIEWS[int(rng.integers(len(VIEWS)))],
            size=random_size(rng),
        )
        path = f"images/drawn-{index:04d}.jpg"
        image.convert("RGB").save(folder / path, format="JPEG", quality=90)
        rows.append({"path": path, "make": "Demo", "model": body_type, "type": body_type})
    return folder, rows


def _photos(tmp_path: Path, count: int) -> tuple[Path, list[dict[str, object]]]:
    """A folder to serve and its photos (relative path and metadata), real ones if we can."""
    if (CARS_SAMPLE / "manifest.csv").exists():
        return _shared_photos(count)
    return _drawn_photos(tmp_path / "photos", count)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextmanager
def _static_server(folder: Path) -> Iterator[str]:
    """A plain static file server for ``folder`` on a free port of 127.0.0.1; its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _write_manifest(path: Path, base_url: str, photos: list[dict[str, object]]) -> None:
    frame = pd.DataFrame(
        [
            {
                "url": f"{base_url}/{photo['path']}",
                **{k: v for k, v in photo.items() if k != "path"},
            }
            for photo in photos
        ]
    )
    frame.to_csv(path, index=False)


# --------------------------------------------------------------------------- runs


def _home(folder: Path) -> Path:
    """A fresh Dagster home with the repository's instance settings (and no project config)."""
    folder.mkdir(parents=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", folder / "dagster.yaml")
    return folder


def _environment(**settings: str) -> dict[str, str]:
    """This environment without any carmodels setting of the caller's, plus ``settings``.

    Kept: the per-test caches conftest points ``CARMODELS_CACHE`` and ``TORCH_HOME`` at.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CARMODELS_") or key == "CARMODELS_CACHE"
    }
    env.pop("DAGSTER_HOME", None)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return {**env, **settings}


def _run(command: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        pytest.fail(f"{what} did not finish in {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, (
        f"{what} failed (exit {proc.returncode}): {' '.join(command)}\n"
        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-5000:]}"
    )
    return proc


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def _latest(
    home: Path, monkeypatch: pytest.MonkeyPatch, *assets: str
) -> dict[str, dg.EventLogEntry]:
    """The latest materialisation event of each asset, read from the instance in ``home``."""
    with monkeypatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            events = {
                name: instance.get_latest_materialization_event(dg.AssetKey(name))
                for name in assets
            }
    missing = [name for name, event in events.items() if event is None]
    assert not missing, f"no materialisation of {missing} in {home}"
    return events  # type: ignore[return-value]


def _meta(event: dg.EventLogEntry, key: str) -> object:
    materialization = event.asset_materialization
    assert materialization is not None
    assert key in materialization.metadata, (
        f"{materialization.asset_key.to_user_string()} has no metadata {key!r}: "
        f"{sorted(materialization.metadata)}"
    )
    return materialization.metadata[key].value


def _version(event: dg.EventLogEntry) -> str | None:
    materialization = event.asset_materialization
    assert materialization is not None
    return materialization.tags.get(DATA_VERSION)


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_retrain_job_on_your_own_photos_with_a_project_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, photos = _photos(tmp_path, FIRST_PHOTOS + NEW_PHOTOS)
    home = _home(tmp_path / "dagster_home")
    data = tmp_path / "data"
    manifest = tmp_path / "listings.csv"
    config = tmp_path / "carmodels.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listing_manifest": {"config": {"manifest_path": str(manifest)}},
                # My own server on this machine: the private-address guard must let it through.
                "raw_images": {"config": {"allow_private_networks": True}},
                "train_dcgan": {
                    "config": {"preset": "small", "image_size": 32, "epochs": 1, "batch_size": 16}
                },
                "evaluate_dcgan": {"config": {"offline": True, "n_samples": 16, "fid_samples": 16}},
            },
            sort_keys=False,
        )
    )
    env = _environment(
        CARMODELS_PROFILE="full",
        CARMODELS_CONFIG=str(config),
        CARMODELS_DATA=str(data),
        DAGSTER_HOME=str(home),
    )
    retrain = [str(VENV_BIN / "dagster"), "job", "execute", "-m", "pipelines.definitions"]
    retrain += ["-j", "retrain"]
    assets = ("raw_images", "car_shards", "train_dcgan", "evaluate_dcgan")

    with _static_server(folder) as base_url:
        _write_manifest(manifest, base_url, photos[:FIRST_PHOTOS])

        _run(retrain, env, "retrain run 1")
        first = _latest(home, monkeypatch, *assets)
        for name in assets:
            assert _meta(first[name], SKIPPED) is False, name
        assert _meta(first["raw_images"], "fetched") == FIRST_PHOTOS
        assert _meta(first["raw_images"], "ok") == FIRST_PHOTOS
        assert (data / "eval" / "metrics.json").is_file()

        _run(retrain, env, "retrain run 2 (nothing changed)")
        second = _latest(home, monkeypatch, *assets)
        for name in assets:
            assert second[name].run_id != first[name].run_id, f"{name} was not rematerialised"
            assert _meta(second[name], SKIPPED) is True, f"{name} redid its work"
            assert _version(second[name]) == _version(first[name]), name
        assert _meta(second["train_dcgan"], "computed_in_run") == first["train_dcgan"].run_id

        _write_manifest(manifest, base_url, photos)
        _run(retrain, env, "retrain run 3 (new rows in the manifest)")
        third = _latest(home, monkeypatch, *assets)
        raw = third["raw_images"]
        assert _meta(raw, SKIPPED) is False
        assert _meta(raw, "urls") == FIRST_PHOTOS + NEW_PHOTOS
        assert _meta(raw, "fetched") == NEW_PHOTOS, "only the new URLs are downloaded"
        assert _meta(raw, "skipped_existing") == FIRST_PHOTOS
        assert _meta(raw, "ok") == NEW_PHOTOS
        # New training data: new shards, a newly trained and evaluated generator.
        assert _version(third["car_shards"]) != _version(first["car_shards"])
        for name in ("train_dcgan", "evaluate_dcgan"):
            assert _meta(third[name], SKIPPED) is False, name
            assert _version(third[name]) != _version(first[name]), name


@pytest.mark.slow
def test_make_demo_twice_trains_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = _home(tmp_path / "dagster_home")
    data = tmp_path / "data"
    # What `make demo` runs, with the DAGSTER_HOME it exports, on a shrunken demo catalog.
    demo = [sys.executable, "-m", "pipelines.demo"]
    env = _environment(
        DAGSTER_HOME=str(home),
        CARMODELS_DATA=str(data),
        CARMODELS_DEMO_LISTINGS="24",
        CARMODELS_DEMO_EPOCHS="2",
    )

    proc = _run(demo, env, "make demo (first run)")
    assert "project config: none" in proc.stdout
    assert (data / "eval" / "samples_ema.png").is_file()
    first = _latest(home, monkeypatch, "train_dcgan", "evaluate_dcgan")
    assert _meta(first["train_dcgan"], SKIPPED) is False

    _run(demo, env, "make demo (second run)")
    second = _latest(home, monkeypatch, "train_dcgan", "evaluate_dcgan")
    for name in ("train_dcgan", "evaluate_dcgan"):
        assert second[name].run_id != first[name].run_id, f"{name} was not rematerialised"
        assert _meta(second[name], SKIPPED) is True, f"{name} redid its work"
        assert _version(second[name]) == _version(first[name]), name
