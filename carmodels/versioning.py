"""Content versions of a stage's outputs: short hashes that change exactly when the data does.

The orchestration layer reports them as data versions, so that a step whose inputs have the
same versions as last time can skip its work and its downstream stays in sync. They hash
content, never modification times: a working copy pulled from object storage, or a rewrite of
identical files, gives the same version.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

#: Hex digits kept of a sha256: 64 bits, plenty to tell a dataset's versions apart.
VERSION_LENGTH = 16
#: Read size when hashing files.
_CHUNK_BYTES = 1 << 20

# Hashes of files already read in this process, keyed by (path, size, mtime_ns): an unchanged
# file is hashed once however often its version is asked for.
_file_digests: dict[tuple[str, int, int], str] = {}


def _short(digest: hashlib._Hash) -> str:
    return digest.hexdigest()[:VERSION_LENGTH]


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _file_digests.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def files_version(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Version of a set of files: their names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return _short(digest)


def contents_version(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Version of a set of files' contents only: renaming or re-chunking keeps it if the bytes
    of each file are unchanged (shard generations get new names when rewritten)."""
    digest = hashlib.sha256()
    for file_hash in sorted(file_digest(p) for p in paths):
        digest.update(f"{file_hash}\n".encode())
    return _short(digest)


def frame_version(frame: pd.DataFrame, columns: Iterable[str] | None = None) -> str:
    """Version of a table's content, independent of its row order.

    Rows are hashed one by one (pandas' stable row hash) and the sorted row hashes hashed
    again, so the same rows written in another order or shard layout give the same version.
    """
    selected = frame if columns is None else frame[list(columns)]
    digest = hashlib.sha256(",".join(map(str, selected.columns)).encode())
    rows = np.sort(pd.util.hash_pandas_object(selected, index=False).to_numpy())
    digest.update(rows.tobytes())
    return _short(digest)


def json_version(value: object) -> str:
    """Version of a JSON-serialisable value (keys sorted, so dict order does not matter)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return _short(hashlib.sha256(text.encode()))


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), or None when it is
    not a plain source module (a builtin, an extension, or not importable)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported_names(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Absolute names of the modules ``tree`` imports anywhere (lazy imports in functions
    included), resolving relative imports against module ``name``."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # ``from package import submodule`` imports a module too.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _data_files(tree: ast.Module, source: Path) -> list[Path]:
    """Files beside a module (or in its ``data/`` folder) that it names in a string literal,
    such as a fitted model it loads: they change its results as much as its code does."""
    files = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value:
            # A file name: one short path component with a suffix, not Python source.
            name = node.value
            if len(name) > 100 or "." not in name or any(c in name for c in "/\\\n "):
                continue
            if name.endswith(".py"):
                continue
            for folder in (source.parent, source.parent / "data"):
                candidate = folder / name
                if candidate.is_file():
                    files.append(candidate)
    return files


@cache
def _closure(roots: tuple[str, ...], prefix: str) -> tuple[tuple[str, Path], ...]:
    """Every module under ``prefix`` reachable from ``roots`` by imports, with its data
    files. A package below ``prefix`` brings all its submodules: its public names are often
    re-exported lazily (PEP 562), which no import statement shows. ``prefix`` itself does not
    (every module imports ``carmodels.__version__`` or a sibling through it)."""
    seen: dict[str, Path] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen or not (name == prefix or name.startswith(prefix + ".")):
            continue
        found = _module_links(name)
        if found is None:
            continue
        path, imported, data_files = found
        seen[name] = path
        pending.extend(imported)
        if path.name == "__init__.py" and name != prefix:
            pending.extend(
                f"{name}.{child.stem}"
                for child in path.parent.glob("*.py")
                if child.stem != "__init__"
            )
        for data in data_files:
            seen[f"{name}:{data.name}"] = data
    return tuple(sorted(seen.items()))


@cache
def _module_links(name: str) -> tuple[Path, set[str], list[Path]] | None:
    """``(source file, imported module names, named data files)`` of module ``name``, or None
    when it has no source. Parsed once per process: the assets' closures share most modules,
    and every Dagster step process computes all of them when the code location loads."""
    path = _module_file(name)
    if path is None:
        return None
    tree = ast.parse(path.read_bytes(), filename=str(path))
    return path, _imported_names(tree, name, path.name == "__init__.py"), _data_files(tree, path)


def source_version(modules: Iterable[str], prefix: str = "carmodels") -> str:
    """Version of the code that ``modules`` run: the bytes of every module under ``prefix``
    they import, directly or not, and of the data files those modules name.

    Used as an asset's code version, so that upgrading the library invalidates the cached
    outputs of exactly the steps whose code changed. Third-party libraries are left out: their
    versions are pinned by the install, not by this repository.
    """
    digest = hashlib.sha256()
    for name, path in _closure(tuple(sorted(modules)), prefix):
        digest.update(f"{name}\0{file_digest(path)}\n".encode())
    return _short(digest)


def source_modules(modules: Iterable[str], prefix: str = "carmodels") -> list[str]:
    """The module names (and ``module:datafile`` entries) :func:`source_version` hashes."""
    return [name for name, _ in _closure(tuple(sorted(modules)), prefix)]


__all__ = [
    "VERSION_LENGTH",
    "contents_version",
    "file_digest",
    "files_version",
    "frame_version",
    "json_version",
    "source_modules",
    "source_version",
]
