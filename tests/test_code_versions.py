"""Code versions: an asset's code version is a hash of the library code it runs, so upgrading
the library invalidates the cached outputs of exactly the steps whose code changed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from carmodels.versioning import source_modules, source_version
from pipelines.assets import ALL_ASSETS
from pipelines.designs import DESIGN_ASSETS
from pipelines.promotion import PROMOTION_ASSETS


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A small package: ``a`` imports ``b`` lazily, ``b`` loads ``data/model.npz``, ``c`` is
    used by nobody."""
    root = tmp_path / "pkgv"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text('"""A package."""\n')
    (root / "a.py").write_text("def run():\n    from pkgv import b\n    return b.VALUE\n")
    (root / "b.py").write_text('MODEL = "model.npz"\nVALUE = 1\n')
    (root / "c.py").write_text("VALUE = 3\n")
    (root / "data" / "model.npz").write_bytes(b"weights-1")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [m for m in sys.modules if m == "pkgv" or m.startswith("pkgv.")]:
        del sys.modules[name]


def test_the_version_follows_imports_and_named_data_files(package: Path) -> None:
    assert source_modules(["pkgv.a"], prefix="pkgv") == [
        "pkgv",
        "pkgv.a",
        "pkgv.b",
        "pkgv.b:model.npz",
    ]
    before = source_version(["pkgv.a"], prefix="pkgv")

    (package / "c.py").write_text("VALUE = 33  # changed, but a does not use it\n")
    assert source_version(["pkgv.a"], prefix="pkgv") == before

    (package / "b.py").write_text('MODEL = "model.npz"\nVALUE = 2  # an upgrade\n')
    after_code = source_version(["pkgv.a"], prefix="pkgv")
    assert after_code != before

    (package / "data" / "model.npz").write_bytes(b"weights-2, refitted")
    assert source_version(["pkgv.a"], prefix="pkgv") not in {before, after_code}


def _code_version(name: str) -> str:
    asset = next(a for a in ALL_ASSETS if a.key.path[-1] == name)
    return asset.code_versions_by_key[asset.key]


def test_each_asset_versions_the_library_code_it_runs() -> None:
    assert _code_version("unique_images") == source_version(["carmodels.dedup"])
    assert _code_version("car_shards") == source_version(["carmodels.shards"])
    assert _code_version("train_dcgan") == source_version(["carmodels.train"])
    # Dedup does not run the trainer: a change to training leaves its cache valid ...
    dedup_code = source_modules(["carmodels.dedup"])
    assert "carmodels.train" not in dedup_code and "carmodels.models" not in dedup_code
    # ... while the shards depend on the fitted facing model as much as on code.
    assert "carmodels.facing:facing_model.npz" in source_modules(["carmodels.shards"])
    # No asset keeps a hand-set version that nobody remembers to bump.
    for asset in [*ALL_ASSETS, *PROMOTION_ASSETS, *DESIGN_ASSETS]:
        version = asset.code_versions_by_key[asset.key]
        assert version is not None and len(version) == 16, asset.key
