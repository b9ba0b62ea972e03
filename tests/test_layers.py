"""The import layers of carmodels/: `lint-imports` keeps the contracts of pyproject.toml's
``[tool.importlinter]`` (the layers of docs/ARCHITECTURE.md, no cycle inside a package, no
Dagster in the library), so ``make test`` fails on an import that breaks them, as CI's
``.ci/run`` does.

Read-only: the import graph is built without a cache, so nothing is written into the tree.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lint_imports_keeps_every_contract() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.is_file(), f"{lint_imports} is missing: pip install -e '.[dev]'"
    done = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert f"Contracts: {len(contracts['contracts'])} kept, 0 broken." in done.stdout
