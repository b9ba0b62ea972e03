"""Find manifest files that are new or changed in a watched folder.

Used by the Dagster sensor that starts ingest when someone drops a manifest into a folder;
kept here, free of Dagster, so that the rule for "changed" is tested on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from carmodels.scrape.manifest import MANIFEST_SUFFIXES

#: Every suffix read_manifest understands.
WATCHED_SUFFIXES: tuple[str, ...] = tuple(s for group in MANIFEST_SUFFIXES.values() for s in group)


@dataclass(frozen=True)
class FileState:
    """What identifies one version of a file: its size and modification time (ns)."""

    size: int
    mtime_ns: int

    def token(self) -> str:
        return f"{self.size}-{self.mtime_ns}"


def scan_manifests(folder: str | os.PathLike[str]) -> dict[str, FileState]:
    """The manifest files directly inside ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    states = {}
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        # Editors and partial copies leave hidden or temporary files: wait for the real one.
        if name.startswith(".") or not path.is_file() or not name.endswith(WATCHED_SUFFIXES):
            continue
        stat = path.stat()
        states[str(path.resolve())] = FileState(stat.st_size, stat.st_mtime_ns)
    return states


def changed_manifests(
    current: dict[str, FileState], previous: dict[str, str]
) -> list[tuple[str, FileState]]:
    """Files in ``current`` that are new or whose token differs from ``previous`` (path→token)."""
    return [(path, state) for path, state in current.items() if previous.get(path) != state.token()]
