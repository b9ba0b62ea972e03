"""``StorageRoot``: a storage root, its working copy, and ``pull``/``push`` between them.

See :mod:`carmodels.storage` for the rules a sync follows.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import upath
from filelock import FileLock

from carmodels.layout import DataLayout
from carmodels.storage.errors import (
    StorageError,
    StorageInputError,
    explain,
    is_setup_problem,
    require_implementation,
)
from carmodels.storage.files import (
    LocalFile,
    RemoteFile,
    SyncReport,
    in_parallel,
    remote_file,
    same_bytes,
    sync_record,
)

#: Environment variable naming the folder that holds the working copies of remote roots.
CACHE_ENV = "CARMODELS_CACHE"
#: File names (fnmatch patterns) that commit the files beside them: pushed after every other
#: file and pulled before them. ``summary.json`` lists the current shard set, ``champion.json``
#: the generator in use, ``latest.pt``/``best.pt`` point at an epoch checkpoint, and
#: ``record.json`` (``carmodels.dedup.RECORD_FILE``, named here because storage sits below the
#: stages) the incremental dedup's members file: uploaded before it, a reader of the remote
#: would take the record with no members file and start the dedup afresh.
DEFAULT_MARKERS: tuple[str, ...] = (
    "summary.json",
    "champion.json",
    "latest.pt",
    "best.pt",
    "metrics.json",
    "record.json",
    "_SUCCESS",
)
#: Protocols that name the local file system: such roots are used in place.
LOCAL_PROTOCOLS = frozenset({"file", "local"})

#: Temporary files of `carmodels.io.atomic_write` (``name.tmp-<pid>``): never synchronised.
_TMP_FILE = re.compile(r"\.tmp-\d+$")
#: Storage options that hold secrets; left out of the working copy's folder name.
_SECRET_OPTION = re.compile(r"key|secret|token|password|credential|sas", re.IGNORECASE)
_STATE_VERSION = 1


@dataclass(frozen=True)
class StorageRoot:
    """Where asset data lives: ``local_root`` is always a folder the library can write to.

    Build it with `StorageRoot.parse`. For a remote root, ``remote`` is the root as a
    `upath.UPath` and ``local_root`` its working copy; for a local root ``remote`` is None.
    """

    url: str
    local_root: Path
    remote: upath.UPath | None = field(default=None, compare=False)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    markers: tuple[str, ...] = DEFAULT_MARKERS
    #: Per-folder sync records and locks of a remote root's working copy.
    state_dir: Path | None = None

    @classmethod
    def parse(
        cls,
        root: str | os.PathLike[str],
        cache_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        markers: Sequence[str] = DEFAULT_MARKERS,
    ) -> StorageRoot:
        """A local path / ``file://`` URL, or any fsspec URL such as ``s3://bucket/prefix``.

        ``cache_dir`` holds the working copies of remote roots (default ``$CARMODELS_CACHE``,
        else ``$XDG_CACHE_HOME/carmodels`` or ``~/.cache/carmodels``); each root gets its own
        folder in it, named after the URL and its storage options. ``storage_options`` go to
        the fsspec file system (for S3 e.g. ``{"client_kwargs": {"endpoint_url": ...}}``,
        ``key``/``secret``, ``profile``). Nothing is contacted here; `check` does that.
        """
        text = os.fspath(root).strip()
        if not text:
            raise StorageInputError(
                "Storage root is empty: give a folder or a URL like s3://bucket/prefix."
            )
        options = dict(storage_options or {})
        protocol, path = fsspec.core.split_protocol(text)
        if protocol is None or protocol in LOCAL_PROTOCOLS:
            if options:
                raise StorageInputError(
                    f"storage_options {sorted(options)} were given for the local root {text!r}; "
                    "they only apply to remote roots (s3://..., gcs://...). Drop them or use a URL."
                )
            local = Path(urllib.parse.unquote(path) if protocol else path).expanduser()
            return cls(url=text, local_root=local.resolve(), markers=tuple(markers))

        require_implementation(text, protocol)
        url = text.rstrip("/")
        if not path.strip("/"):
            raise StorageInputError(
                f"Storage root {text!r} names no bucket or folder: "
                f"use e.g. {protocol}://bucket/prefix."
            )
        remote = upath.UPath(url, **options)
        working = _cache_base(cache_dir) / _working_copy_name(url, options)
        return cls(
            url=url,
            local_root=working / "data",
            remote=remote,
            storage_options=options,
            markers=tuple(markers),
            state_dir=working / "sync",
        )

    # ------------------------------------------------------------------ queries

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The remote's fsspec file system (a remote root only)."""
        return self._remote().fs

    @property
    def layout(self) -> DataLayout:
        """The stage paths inside the local root (the working copy for a remote root)."""
        return DataLayout(self.local_root)

    def uri(self, relative: str = "") -> str:
        """The user-facing address of ``relative``: its URL on a remote root, else an absolute path.

        Meant for Dagster's ``dagster/uri`` metadata and for messages.
        """
        rel = _clean_relative(relative, allow_root=True)
        if self.remote is None:
            return str(self.local_root / rel) if rel else str(self.local_root)
        return f"{self.url}/{rel}" if rel else self.url

    def exists_remote(self, relative: str) -> bool:
        """Whether ``relative`` (a file or a non-empty folder) exists in the root itself.

        On a local root this is the local path; on a remote root the remote, not the working
        copy, so a step can tell "upstream never materialised" from "not pulled yet".
        """
        rel = _clean_relative(relative)
        if self.remote is None:
            return (self.local_root / rel).exists()
        with self._errors(f"checking {self.uri(rel)}"):
            path = self._remote_path(rel)
            self.fs.invalidate_cache(path)
            return bool(self.fs.exists(path))

    def check(self) -> None:
        """Contact a remote root once, so bad credentials or a missing bucket fail early."""
        if self.remote is None:
            return
        with self._errors("opening the storage root", input_errors=True):
            path = self._remote_path("")
            self.fs.invalidate_cache(path)
            try:
                self.fs.ls(path, detail=False)
            except FileNotFoundError:
                self._require_container()  # else the prefix is only empty so far

    # ------------------------------------------------------------------ sync

    def pull(self, *relative_dirs: str) -> SyncReport:
        """Make the working copy of each folder equal to the remote one (no-op on a local root).

        Downloads files that are missing or differ, deletes local files that are gone remotely
        (e.g. an older shard generation). A folder missing remotely is not an error: it leaves an
        empty local folder (check `exists_remote` where an input is required). Markers are
        fetched first and the data listed after them; see the module docstring.
        """
        rels = [_clean_relative(r) for r in relative_dirs]
        if self.remote is None or not rels:
            return SyncReport()
        started = time.monotonic()
        copied: list[str] = []
        deleted: list[str] = []
        unchanged = 0
        n_bytes = 0
        with self._errors(f"pulling {', '.join(rels)}"), self._locked(rels):
            for rel in rels:
                state = self._load_state(rel)
                state["complete"] = False  # a push refuses a folder whose pull broke off
                self._save_state(rel, state)
                records: dict[str, Any] = state["files"]

                listed = self._list_remote(rel)
                markers = {n: f for n, f in listed.items() if self._is_marker(n)}
                local = self._list_local(rel)
                fetch_markers = [
                    n for n, f in markers.items() if not same_bytes(n, local.get(n), f, records)
                ]
                unchanged += len(markers) - len(fetch_markers)
                self._download(fetch_markers, markers, records)
                data = {n: f for n, f in self._list_remote(rel).items() if not self._is_marker(n)}
                fetch_data = [
                    n for n, f in data.items() if not same_bytes(n, local.get(n), f, records)
                ]
                unchanged += len(data) - len(fetch_data)
                self._download(fetch_data, data, records)

                wanted = {**markers, **data}
                for name in sorted(local.keys() - wanted.keys()):
                    local[name].path.unlink(missing_ok=True)
                    records.pop(name, None)
                    deleted.append(name)
                fetched = fetch_markers + fetch_data
                for name in wanted.keys() - set(fetched):  # refresh records found equal by MD5
                    records[name] = sync_record(self.local_root / name, wanted[name])
                copied += fetched
                n_bytes += sum(wanted[name].size for name in fetched)
                state["complete"] = True
                self._save_state(rel, state)
        return SyncReport(
            tuple(copied), tuple(deleted), unchanged, n_bytes, time.monotonic() - started
        )

    def push(self, *relative_dirs: str, allow_empty: bool = False) -> SyncReport:
        """Publish the working copy of each folder to the remote (no-op on a local root).

        Uploads new and changed files (data first, then markers), then deletes remote files that
        no longer exist locally. Refuses a folder that is missing locally, whose last pull did
        not finish, or that is empty while the remote one is not (unless ``allow_empty``).
        """
        rels = [_clean_relative(r) for r in relative_dirs]
        if self.remote is None or not rels:
            return SyncReport()
        started = time.monotonic()
        for rel in rels:
            folder = self.local_root / rel
            if not folder.is_dir():
                raise StorageError(
                    f"Refusing to push {rel!r} to {self.uri(rel)}: its working copy {folder} does "
                    "not exist, and pushing it would delete the remote files. Run the step that "
                    "writes it (or pull it) first."
                )
        with self._errors(f"pushing {', '.join(rels)}"), self._locked(rels):
            states = {rel: self._load_state(rel) for rel in rels}
            broken = [rel for rel, state in states.items() if not state["complete"]]
            if broken:
                raise StorageError(
                    f"Refusing to push {', '.join(broken)} to {self.url}: the last pull of it into "
                    f"{self.local_root} did not finish, so the working copy may lack files that "
                    "the push would then delete remotely. Pull it again first."
                )
            plans = []
            for rel in rels:
                local = self._list_local(rel)
                remote = self._list_remote(rel)
                if not local and remote and not allow_empty:
                    raise StorageError(
                        f"Refusing to push the empty folder {self.local_root / rel} over "
                        f"{len(remote)} files at {self.uri(rel)}: that would delete them all. "
                        "Pass allow_empty=True if that is meant."
                    )
                records = states[rel]["files"]
                changed = [
                    n for n, f in local.items() if not same_bytes(n, f, remote.get(n), records)
                ]
                plans.append((rel, local, remote, changed))

            data = [(n, loc[n]) for _, loc, _, ch in plans for n in ch if not self._is_marker(n)]
            marks = [(n, loc[n]) for _, loc, _, ch in plans for n in ch if self._is_marker(n)]
            in_parallel(lambda item: self._upload(*item), data)
            for item in marks:  # after every data file, in the order the folders were given
                self._upload(*item)
            stale = [self._remote_path(n) for _, loc, rem, _ in plans for n in rem if n not in loc]
            if stale:
                self.fs.rm(stale)

            copied: list[str] = []
            deleted: list[str] = []
            unchanged = 0
            n_bytes = 0
            for rel, local, remote, changed in plans:
                after = self._list_remote(rel) if changed else remote
                records = {}
                for name, file in local.items():
                    if name in after:
                        records[name] = sync_record(file.path, after[name])
                states[rel]["files"] = records
                self._save_state(rel, states[rel])
                copied += changed
                deleted += [n for n in remote if n not in local]
                unchanged += len(local) - len(changed)
                n_bytes += sum(local[n].size for n in changed)
        return SyncReport(
            tuple(copied), tuple(deleted), unchanged, n_bytes, time.monotonic() - started
        )

    @contextmanager
    def working_copy(
        self, pull: Sequence[str] = (), push: Sequence[str] = ()
    ) -> Iterator[DataLayout]:
        """Pull ``pull``, yield the local layout, push ``push`` if the block did not raise."""
        self.pull(*pull)
        yield self.layout
        self.push(*push)

    # ------------------------------------------------------------------ internals

    def _remote(self) -> upath.UPath:
        if self.remote is None:
            raise StorageError(f"{self.url} is a local root: it has no remote file system.")
        return self.remote

    def _remote_path(self, relative: str) -> str:
        """The file system path (no protocol) of ``relative`` under the remote root."""
        remote = self._remote()
        return (remote / relative).path if relative else remote.path.rstrip("/")

    def _is_marker(self, name: str) -> bool:
        base = posixpath.basename(name)
        return any(fnmatch.fnmatchcase(base, pattern) for pattern in self.markers)

    def _find(self, path: str) -> dict[str, dict[str, Any]]:
        """``fs.find`` read afresh; a missing folder is empty, a missing bucket an error."""
        fs = self.fs
        fs.invalidate_cache(path)
        try:
            return fs.find(path, detail=True)
        except FileNotFoundError:
            self._require_container()
            return {}

    def _require_container(self) -> None:
        """Raise a `StorageError` if the bucket (first path segment) of the root is missing.

        Lists it rather than calling ``exists``, which answers False for bad credentials too.
        """
        container = self._remote().path.lstrip("/").split("/", 1)[0]
        self.fs.invalidate_cache(container)
        try:
            self.fs.ls(container, detail=False)
        except FileNotFoundError:
            raise StorageInputError(
                f"The bucket or container {container!r} of the storage root {self.url} does "
                "not exist: create it or fix the root."
            ) from None

    def _list_remote(self, rel: str) -> dict[str, RemoteFile]:
        base = self._remote_path("")
        prefix = base + "/"
        files = {}
        for path, info in self._find(self._remote_path(rel)).items():
            if info.get("type") != "file" or path.endswith("/") or not path.startswith(prefix):
                continue  # folder placeholders that some tools create on object stores
            name = path[len(prefix) :]
            if _TMP_FILE.search(name):
                continue
            files[name] = remote_file(path, info)
        return files

    def _list_local(self, rel: str) -> dict[str, LocalFile]:
        folder = self.local_root / rel
        files = {}
        if folder.is_dir():
            for path in folder.rglob("*"):
                if _TMP_FILE.search(path.name) or not path.is_file():
                    continue
                stat = path.stat()
                name = path.relative_to(self.local_root).as_posix()
                files[name] = LocalFile(path, stat.st_size, stat.st_mtime_ns)
        return files

    def _download(
        self, names: list[str], files: dict[str, RemoteFile], records: dict[str, Any]
    ) -> None:
        def fetch(name: str) -> None:
            target = self.local_root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            try:
                self.fs.get_file(files[name].path, str(tmp))
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            records[name] = sync_record(target, files[name])

        in_parallel(fetch, names)

    def _upload(self, name: str, file: LocalFile) -> None:
        self.fs.put_file(str(file.path), self._remote_path(name))

    def _state_path(self, rel: str, suffix: str) -> Path:
        if self.state_dir is None:
            raise StorageError(f"{self.url} is a local root: it keeps no sync records.")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self.state_dir / f"{urllib.parse.quote(rel, safe='')}{suffix}"

    def _load_state(self, rel: str) -> dict[str, Any]:
        path = self._state_path(rel, ".json")
        try:
            state = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            state = None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            # Never synced (or an unreadable record): nothing is known to be unchanged, and a
            # folder never pulled may still be pushed (the first publication of a step's output).
            return {"version": _STATE_VERSION, "complete": True, "files": {}}
        return state

    def _save_state(self, rel: str, state: dict[str, Any]) -> None:
        path = self._state_path(rel, ".json")
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, path)

    @contextmanager
    def _locked(self, rels: Iterable[str]) -> Iterator[None]:
        """Hold the working copy's lock of each folder (in a fixed order: no deadlock)."""
        with ExitStack() as stack:
            for rel in sorted(set(rels)):
                stack.enter_context(FileLock(self._state_path(rel, ".lock")))
            yield

    @contextmanager
    def _errors(self, action: str, input_errors: bool = False) -> Iterator[None]:
        """Re-raise a file system error as a `StorageError` that names the root and the fix.

        With ``input_errors`` (`check`, the first contact), refused credentials and a missing
        bucket or prefix raise `StorageInputError`: the root or its credentials are wrong,
        which a person fixes, rather than a store that failed.
        """
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            error = StorageInputError if input_errors and is_setup_problem(exc) else StorageError
            raise error(explain(self.url, action, exc)) from exc


def _cache_base(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser().resolve() / "carmodels"


def _working_copy_name(url: str, options: dict[str, Any]) -> str:
    """A readable, unique folder name per root: the same bucket behind another endpoint differs."""
    public = {k: v for k, v in options.items() if not _SECRET_OPTION.search(k)}
    digest = hashlib.sha256(
        json.dumps([url, public], sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", url).strip("-")[:60]
    return f"{readable}-{digest}"


def _clean_relative(relative: str, allow_root: bool = False) -> str:
    """A folder below the root as a normalised POSIX path; refuses escapes and absolute paths."""
    text = os.fspath(relative).replace("\\", "/")
    norm = posixpath.normpath(text) if text else ""
    if norm == ".":
        norm = ""
    if text.startswith("/") or norm == ".." or norm.startswith("../") or ":" in norm:
        raise ValueError(
            f"{relative!r} is not a path below the storage root: "
            "use a relative folder like 'shards'."
        )
    if not norm and not allow_root:
        raise ValueError(
            "Name the folders to synchronise (e.g. 'shards'); "
            "the whole root is never synced at once."
        )
    return norm
