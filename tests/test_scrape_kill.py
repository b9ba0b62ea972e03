"""SIGKILL a download midway, run it again: every URL ends up exactly once, nothing is lost."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from carmodels.scrape import download_images, read_raw
from carmodels.scrape.raw import raw_shard_paths
from tests.test_scrape import FAST, ScrapeTestServer, manifest_for

REPO = Path(__file__).resolve().parents[1]
N_URLS = 1200
SHARD_SIZE = 50
#: Kill once this many shards exist: well past the start, well before the end.
KILL_AFTER_SHARDS = 4

DOWNLOADER = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    import pandas as pd
    from carmodels.scrape import download_images
    from tests.test_scrape import FAST
    manifest, out = sys.argv[1], sys.argv[2]
    config = replace(FAST, shard_size={shard_size}, fetch_processes={processes})
    download_images(pd.read_parquet(manifest), out, config)
    """
)


def _children(pid: int) -> set[int]:
    """Direct child processes of ``pid`` (Linux), by the parent id in each ``/proc/N/stat``.

    Not ``/proc/pid/task/*/children``: a thread that ends while those files are read takes
    its file with it, and its children move to a sibling thread that may already be read.
    """
    children: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process ended after the listing
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            children.add(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):  # gone, possibly reaped in between
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "fetch-processes"])
def test_sigkill_midway_then_rerun_leaves_every_url_exactly_once(tmp_path, processes):
    server = ScrapeTestServer()
    server.image_delay_s = 0.02  # 8 workers: about 400 URLs/s, so the run lasts seconds
    server.start()
    try:
        urls = [server.url(f"/img/kill-{i}.jpg") for i in range(N_URLS)]
        manifest = manifest_for(urls, make=[f"make{i % 7}" for i in range(N_URLS)])
        manifest_path = tmp_path / "manifest.parquet"
        manifest.to_parquet(manifest_path)
        out = tmp_path / "raw"

        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                DOWNLOADER.format(shard_size=SHARD_SIZE, processes=processes),
                str(manifest_path),
                str(out),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        deadline = time.monotonic() + 90
        while not out.exists() or len(raw_shard_paths(out)) < KILL_AFTER_SHARDS:
            assert process.poll() is None, "the download ended before it could be killed"
            assert time.monotonic() < deadline, "the download made no progress"
            time.sleep(0.01)
        fetchers = _children(process.pid)
        assert len(fetchers) >= processes - 1  # the fetch processes, when there are any
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        assert process.returncode == -signal.SIGKILL
        # Fetch processes notice their parent is gone and exit: none fetches on unobserved.
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in fetchers):
            assert time.monotonic() < deadline, "a fetch process outlived its killed parent"
            time.sleep(0.05)

        written = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw_shard_paths(out)}
        rows_before = sum(pq.read_metadata(p).num_rows for p in written)
        assert KILL_AFTER_SHARDS * SHARD_SIZE <= rows_before < N_URLS, "killed midway"

        result = download_images(manifest, out, replace(FAST, shard_size=SHARD_SIZE))
        assert result.n_skipped_existing == rows_before
        assert result.n_fetched == N_URLS - rows_before
        assert result.outcome_counts == {"ok": N_URLS - rows_before}

        # The shards written before the kill are untouched and whole.
        assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in written} == written
        # Every URL is present exactly once over all shards (not only after read_raw's
        # latest-row selection), and nothing but the manifest's URLs.
        per_url = Counter(
            url
            for p in raw_shard_paths(out)
            for url in pq.read_table(p, columns=["url"])["url"].to_pylist()
        )
        assert set(per_url) == set(urls)
        assert set(per_url.values()) == {1}
        raw = read_raw(out, columns=["url", "outcome", "make"])
        assert (raw["outcome"] == "ok").all() and len(raw) == N_URLS
        assert raw.set_index("url").loc[urls[8], "make"] == "make1"
    finally:
        server.stop()
