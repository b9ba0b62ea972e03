"""Storage roots: local folders in place, S3 through a synchronised working copy.

S3 is a moto server on 127.0.0.1 started by the tests (`moto_s3_server`), so nothing leaves
the machine. `moto_s3_server` is a plain context manager so other test modules can import it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch

from carmodels import shards
from carmodels.dedup import RECORD_FILE, DedupConfig, deduplicate_incremental
from carmodels.storage import DEFAULT_MARKERS, StorageError, StorageRoot
from tests.conftest import free_port, write_blocky_shards
from tests.test_dedup import jpeg, photo, write_raw_shard

#: Fake credentials: moto accepts any, and real AWS would refuse these.
FAKE_CREDENTIALS = {"key": "testing", "secret": "testing"}
REGION = "us-east-1"


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server with one bucket."""

    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options reaching this server, with explicit fake credentials (no env needed)."""
        return {
            **FAKE_CREDENTIALS,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    @property
    def env(self) -> dict[str, str]:
        """The same credentials as environment variables, for subprocesses and boto3."""
        return {
            "AWS_ACCESS_KEY_ID": FAKE_CREDENTIALS["key"],
            "AWS_SECRET_ACCESS_KEY": FAKE_CREDENTIALS["secret"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=FAKE_CREDENTIALS["key"],
            aws_secret_access_key=FAKE_CREDENTIALS["secret"],
        )

    def keys(self, prefix: str) -> set[str]:
        """Object keys under ``prefix/``, relative to it."""
        pages = (
            self.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.bucket, Prefix=f"{prefix}/")
        )
        return {o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])}


@contextmanager
def moto_s3_server(bucket: str = "carmodels-test") -> Iterator[MotoS3]:
    """Run moto's S3 on a free port of 127.0.0.1 with ``bucket`` created; stop it afterwards."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = MotoS3(endpoint_url=f"http://127.0.0.1:{port}", bucket=bucket)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    with moto_s3_server() as s3:
        yield s3


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests sharing the bucket never see each other's files."""
    return f"t-{uuid.uuid4().hex[:10]}"


def s3_root(moto_s3: MotoS3, prefix: str, cache: Path) -> StorageRoot:
    return StorageRoot.parse(
        moto_s3.url(prefix), cache_dir=cache, storage_options=moto_s3.storage_options
    )


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_files(root: Path, folder: str) -> dict[str, bytes]:
    base = root / folder
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


@contextmanager
def recording(
    monkeypatch: pytest.MonkeyPatch, root: StorageRoot, *methods: str
) -> Iterator[list[tuple[str, str]]]:
    """Record (method, path relative to the root) of each call of ``methods`` on the remote fs."""
    fs = root.fs
    base = root.remote.path + "/"
    calls: list[tuple[str, str]] = []

    def recorder(method: str, original: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            # put_file(local, remote), get_file(remote, local), rm(path or paths)
            target = args[1] if method == "put_file" else args[0]
            for path in target if isinstance(target, list) else [target]:
                calls.append((method, path.removeprefix(base)))
            return original(*args, **kwargs)

        return recorded

    with monkeypatch.context() as patch:
        for method in methods:
            patch.setattr(fs, method, recorder(method, getattr(fs, method)))
        yield calls


BLOBS = {
    "raw/raw-00000.parquet": os.urandom(3000),
    "raw/raw-00001.parquet": os.urandom(10),
    "raw/nested/deep/file.bin": b"",
    "train/checkpoints/epoch-0001.pt": os.urandom(5000),
    "train/checkpoints/latest.pt": os.urandom(5000),
}


# ---------------------------------------------------------------------- local roots


def test_local_root_is_used_in_place(tmp_path: Path) -> None:
    root = StorageRoot.parse(str(tmp_path / "data"))
    assert not root.is_remote
    assert root.local_root == (tmp_path / "data").resolve()
    assert root.layout.shards_dir == root.local_root / "shards"
    assert root.uri("shards") == str(root.local_root / "shards")
    assert root.uri() == str(root.local_root)
    write_files(root.local_root, {"shards/a.parquet": b"x"})
    assert root.pull("shards").copied == ()
    assert root.push("shards", "missing").copied == ()
    assert root.exists_remote("shards") and not root.exists_remote("raw")
    assert (root.local_root / "shards" / "a.parquet").read_bytes() == b"x"
    assert list(tmp_path.rglob("*sync*")) == []  # no sync records for a local root

    url_root = StorageRoot.parse(f"file://{tmp_path}/data")
    assert not url_root.is_remote and url_root.local_root == root.local_root


def test_local_root_rejects_storage_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only apply to remote roots"):
        StorageRoot.parse(str(tmp_path), storage_options={"anon": True})


def test_relative_folders_must_stay_below_the_root(tmp_path: Path) -> None:
    root = StorageRoot.parse(str(tmp_path))
    for bad in ("../outside", "/etc", "s3://other/x"):
        with pytest.raises(ValueError, match="not a path below the storage root"):
            root.pull(bad)
    with pytest.raises(ValueError, match="Name the folders"):
        root.push("")


# ---------------------------------------------------------------------- errors


def test_unknown_protocol_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"'foo://x'.*'foo' is not a protocol fsspec knows"):
        StorageRoot.parse("foo://x", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="names no bucket"):
        StorageRoot.parse("s3://", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Storage root is empty"):
        StorageRoot.parse("  ")


def test_missing_s3fs_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a user without s3fs sees: fsspec knows "s3" but cannot import its implementation.
    monkeypatch.setitem(sys.modules, "s3fs", None)
    fsspec_registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is the dict
    monkeypatch.delitem(fsspec_registry._registry, "s3", raising=False)
    with pytest.raises(StorageError, match=r"s3://bucket/x.*pip install 'carmodels\[s3\]'"):
        StorageRoot.parse("s3://bucket/x", cache_dir=tmp_path)


def test_missing_bucket_names_the_root(moto_s3: MotoS3, tmp_path: Path) -> None:
    root = StorageRoot.parse(
        "s3://no-such-bucket/data", cache_dir=tmp_path, storage_options=moto_s3.storage_options
    )
    with pytest.raises(StorageError, match=r"'no-such-bucket' of the storage root s3://no-such"):
        root.check()
    with pytest.raises(StorageError, match="does not exist"):
        root.pull("shards")


def test_missing_credentials_names_the_root(
    moto_s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # Nowhere else to find credentials: no files, no instance metadata service.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    root = StorageRoot.parse(
        moto_s3.url("creds"),
        cache_dir=tmp_path,
        storage_options={"client_kwargs": {"endpoint_url": moto_s3.endpoint_url}},
    )
    with pytest.raises(StorageError, match=r"s3://carmodels-test/creds.*check the credentials"):
        root.check()


# ---------------------------------------------------------------------- S3 round trips


def test_remote_root_paths_and_uri(moto_s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    root = s3_root(moto_s3, prefix, tmp_path / "cache")
    assert root.is_remote
    assert root.local_root.is_relative_to(tmp_path / "cache")
    assert root.uri("shards") == f"s3://carmodels-test/{prefix}/shards"
    assert root.uri() == f"s3://carmodels-test/{prefix}"
    # Another endpoint for the same URL is another working copy; secrets stay out of its name.
    other = StorageRoot.parse(
        moto_s3.url(prefix),
        cache_dir=tmp_path / "cache",
        storage_options={**moto_s3.storage_options, "client_kwargs": {"endpoint_url": "http://x"}},
    )
    assert other.local_root != root.local_root
    assert "testing" not in str(root.local_root)
    root.check()
    assert not root.exists_remote("raw")


def test_push_then_pull_reproduces_files(moto_s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    writer = s3_root(moto_s3, prefix, tmp_path / "writer")
    write_files(writer.local_root, BLOBS)
    report = writer.push("raw", "train")
    assert sorted(report.copied) == sorted(BLOBS)
    assert report.bytes_copied == sum(len(b) for b in BLOBS.values())
    assert moto_s3.keys(prefix) == set(BLOBS)
    assert writer.exists_remote("raw") and writer.exists_remote("train/checkpoints")

    reader = s3_root(moto_s3, prefix, tmp_path / "reader")
    assert reader.local_root != writer.local_root
    pulled = reader.pull("raw", "train", "never-written")  # a missing folder is not an error
    assert sorted(pulled.copied) == sorted(BLOBS)
    assert read_files(reader.local_root, "raw") | read_files(reader.local_root, "train") == BLOBS
    assert reader.pull("raw", "train").copied == ()  # nothing changed: nothing downloaded


def test_push_uploads_only_what_changed(
    moto_s3: MotoS3, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = s3_root(moto_s3, prefix, tmp_path / "cache")
    write_files(root.local_root, BLOBS)
    root.push("raw", "train")

    with recording(monkeypatch, root, "put_file") as puts:
        assert root.push("raw", "train").copied == ()
    assert puts == []

    # latest.pt rewritten with the same size (as every epoch does), one file added.
    latest = root.local_root / "train/checkpoints/latest.pt"
    latest.write_bytes(os.urandom(5000))
    write_files(root.local_root, {"train/checkpoints/epoch-0002.pt": b"new"})
    with recording(monkeypatch, root, "put_file") as puts:
        report = root.push("raw", "train")
    assert sorted(puts) == [
        ("put_file", "train/checkpoints/epoch-0002.pt"),
        ("put_file", "train/checkpoints/latest.pt"),
    ]
    assert report.unchanged == len(BLOBS) - 1
    assert (
        moto_s3.client()
        .get_object(Bucket=moto_s3.bucket, Key=f"{prefix}/train/checkpoints/latest.pt")["Body"]
        .read()
        == latest.read_bytes()
    )

    # A fresh working copy holding the same bytes (no sync record yet): MD5 = ETag, no upload.
    twin = s3_root(moto_s3, prefix, tmp_path / "twin")
    write_files(twin.local_root, read_files(root.local_root, "raw"))
    with recording(monkeypatch, twin, "put_file") as puts:
        assert twin.push("raw").unchanged == 3
    assert puts == []


def test_pull_downloads_only_what_changed(
    moto_s3: MotoS3, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = s3_root(moto_s3, prefix, tmp_path / "writer")
    reader = s3_root(moto_s3, prefix, tmp_path / "reader")
    write_files(writer.local_root, BLOBS)
    writer.push("raw")
    reader.pull("raw")

    changed = {"raw/raw-00001.parquet": os.urandom(10)}  # same size, new bytes
    write_files(writer.local_root, changed)
    writer.push("raw")
    with recording(monkeypatch, reader, "get_file") as gets:
        report = reader.pull("raw")
    assert gets == [("get_file", "raw/raw-00001.parquet")]
    assert report.copied == ("raw/raw-00001.parquet",) and report.unchanged == 2
    assert (reader.local_root / "raw/raw-00001.parquet").read_bytes() == changed[
        "raw/raw-00001.parquet"
    ]

    # A local edit in the working copy is undone by the next pull: the remote is the truth.
    (reader.local_root / "raw/raw-00000.parquet").write_bytes(b"local edit")
    assert reader.pull("raw").copied == ("raw/raw-00000.parquet",)
    assert (reader.local_root / "raw/raw-00000.parquet").read_bytes() == BLOBS[
        "raw/raw-00000.parquet"
    ]


def test_deletions_propagate_both_ways(moto_s3: MotoS3, prefix: str, tmp_path: Path) -> None:
    writer = s3_root(moto_s3, prefix, tmp_path / "writer")
    reader = s3_root(moto_s3, prefix, tmp_path / "reader")
    write_files(writer.local_root, BLOBS)
    writer.push("raw")
    reader.pull("raw")

    (writer.local_root / "raw/raw-00000.parquet").unlink()
    report = writer.push("raw")
    assert report.deleted == ("raw/raw-00000.parquet",)
    assert "raw/raw-00000.parquet" not in moto_s3.keys(prefix)

    report = reader.pull("raw")
    assert report.deleted == ("raw/raw-00000.parquet",)
    assert not (reader.local_root / "raw/raw-00000.parquet").exists()
    assert (reader.local_root / "raw/raw-00001.parquet").exists()


def test_broken_working_copy_never_wipes_the_remote(
    moto_s3: MotoS3, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = s3_root(moto_s3, prefix, tmp_path / "writer")
    write_files(writer.local_root, BLOBS)
    writer.push("raw", "train")
    expected = moto_s3.keys(prefix)

    fresh = s3_root(moto_s3, prefix, tmp_path / "fresh")
    with pytest.raises(StorageError, match=r"Refusing to push 'raw'.*does not exist"):
        fresh.push("raw")

    (fresh.local_root / "raw").mkdir(parents=True)
    with pytest.raises(StorageError, match=r"empty folder .* over 3 files"):
        fresh.push("raw")
    assert moto_s3.keys(prefix) == expected

    # A pull that breaks off half-way leaves a partial copy, which push must not publish.
    original = fresh.fs.get_file
    calls = {"n": 0}

    def flaky_get_file(rpath: str, lpath: str, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("connection reset")
        original(rpath, lpath, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(fresh.fs, "get_file", flaky_get_file)
        with pytest.raises(StorageError, match=r"pulling raw failed .*connection reset"):
            fresh.pull("raw")
    with pytest.raises(StorageError, match="last pull of it .* did not finish"):
        fresh.push("raw")
    assert moto_s3.keys(prefix) == expected

    fresh.pull("raw")  # a complete pull makes the copy pushable again
    assert fresh.push("raw").copied == ()

    # Emptying a folder on purpose is allowed when asked for.
    for path in (fresh.local_root / "raw").rglob("*.parquet"):
        path.unlink()
    (fresh.local_root / "raw/nested/deep/file.bin").unlink()
    assert len(fresh.push("raw", allow_empty=True).deleted) == 3
    assert moto_s3.keys(prefix) == {k for k in expected if not k.startswith("raw/")}


def test_markers_are_pushed_after_data_and_before_deletions(
    moto_s3: MotoS3, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = s3_root(moto_s3, prefix, tmp_path / "writer")
    gen1 = {f"shards/car-g0001-{i:05d}.parquet": os.urandom(100) for i in range(3)}
    write_files(root.local_root, {**gen1, "shards/summary.json": b'{"generation": 1}'})
    root.push("shards")

    # A new generation: new shards, a new summary naming them, the old shards removed.
    for name in gen1:
        (root.local_root / name).unlink()
    gen2 = {f"shards/car-g0002-{i:05d}.parquet": os.urandom(100) for i in range(3)}
    write_files(
        root.local_root,
        {**gen2, "shards/preview.png": b"png", "shards/summary.json": b'{"generation": 2}'},
    )
    with recording(monkeypatch, root, "put_file", "rm") as calls:
        root.push("shards")
    summary_at = calls.index(("put_file", "shards/summary.json"))
    data_puts = [i for i, c in enumerate(calls) if c[0] == "put_file" and c[1] in gen2]
    deletions = [i for i, c in enumerate(calls) if c[0] == "rm"]
    assert len(data_puts) == 3 and ("put_file", "shards/preview.png") in calls
    assert sorted(c[1] for c in calls if c[0] == "rm") == sorted(gen1)
    assert max(data_puts) < summary_at < min(deletions)

    # A reader gets the marker first, then the data listed after it.
    reader = s3_root(moto_s3, prefix, tmp_path / "reader")
    with recording(monkeypatch, reader, "get_file") as gets:
        reader.pull("shards")
    assert gets[0] == ("get_file", "shards/summary.json") and len(gets) == 5


def test_the_dedup_record_is_pushed_after_the_members_file_it_names(
    moto_s3: MotoS3, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Uploaded before its members file, the record would name a file a reader cannot find,
    # and the next incremental dedup there would start afresh.
    assert RECORD_FILE in DEFAULT_MARKERS
    root = s3_root(moto_s3, prefix, tmp_path / "writer")
    partitions = {
        name: write_raw_shard(
            tmp_path / "raw" / name / "raw-00000.parquet",
            [
                {"url": f"https://{name}.example/{k}.jpg", "data": jpeg(photo(seed + k))}
                for k in (0, 1)
            ],
        ).parent
        for name, seed in (("p1", 0), ("p2", 10))
    }
    config = DedupConfig(workers=1)
    deduplicate_incremental({"p1": partitions["p1"]}, root.layout.unique_dir, config)
    root.push("unique")
    deduplicate_incremental(partitions, root.layout.unique_dir, config)
    with recording(monkeypatch, root, "put_file", "rm") as calls:
        root.push("unique")
    record_at = calls.index(("put_file", f"unique/{RECORD_FILE}"))
    data_puts = [i for i, c in enumerate(calls) if c[0] == "put_file" and i != record_at]
    assert ("put_file", "unique/members-00002.parquet") in calls
    assert ("put_file", "unique/unique.parquet") in calls
    assert max(data_puts) < record_at < calls.index(("rm", "unique/members-00001.parquet"))

    reader = s3_root(moto_s3, prefix, tmp_path / "reader")
    with recording(monkeypatch, reader, "get_file") as gets:
        reader.pull("unique")
    assert gets[0] == ("get_file", f"unique/{RECORD_FILE}")


def test_memory_filesystem_without_etags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stores that give no ETag are compared by the sync record (size and time) alone.
    url = f"memory://carmodels-{uuid.uuid4().hex[:8]}/data"
    root = StorageRoot.parse(url, cache_dir=tmp_path)
    write_files(root.local_root, {"eval/metrics.json": b"{}", "eval/grid.png": b"png"})
    assert len(root.push("eval").copied) == 2
    with recording(monkeypatch, root, "put_file") as puts:
        root.push("eval")
    assert puts == []
    reader = StorageRoot.parse(url, cache_dir=tmp_path / "reader")
    reader.pull("eval")
    assert read_files(reader.local_root, "eval") == read_files(root.local_root, "eval")
    assert reader.uri("eval") == f"{url}/eval"


def test_shards_written_locally_load_the_same_after_a_trip_through_s3(
    moto_s3: MotoS3, prefix: str, tmp_path: Path
) -> None:
    writer = s3_root(moto_s3, prefix, tmp_path / "writer")
    write_blocky_shards(writer.layout.shards_dir, ["train", "val", "train", "train"], seed=3)
    expected = shards.load_images(writer.layout.shards_dir)
    writer.push("shards")

    reader = s3_root(moto_s3, prefix, tmp_path / "reader")
    with reader.working_copy(pull=["shards"]) as layout:
        loaded = shards.load_images(layout.shards_dir)
        train_only = shards.load_images(layout.shards_dir, split="train")
    assert loaded.dtype == torch.uint8 and loaded.shape == (4, 3, 32, 32)
    assert torch.equal(loaded, expected)
    assert np.array_equal(train_only.numpy(), expected[[0, 2, 3]].numpy())
