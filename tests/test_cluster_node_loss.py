"""A Ray download that loses a worker node mid-run: a head and two one-CPU worker nodes on
127.0.0.1 (``ray.cluster_utils.Cluster``), the demo catalog, moto's S3 as the shared root.

In a module of its own: the module-scoped Ray head of tests/test_cluster_ray.py must be shut
down first, since a process holds one Ray connection at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from carmodels.cluster import FanoutConfig, download_on_ray, plan_tasks, ray_session  # noqa: E402
from carmodels.demo import DemoServer, build_catalog  # noqa: E402
from carmodels.demo import server as demo_server  # noqa: E402
from carmodels.scrape.download import prepare_manifest  # noqa: E402
from carmodels.storage import StorageRoot  # noqa: E402
from tests.test_cluster_ray import MIB, RAY_ENV, demo_config  # noqa: E402
from tests.test_storage import MotoS3, moto_s3_server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with moto_s3_server() as server:
        yield server


def shard_urls(s3: MotoS3, raw_prefix: str) -> dict[str, list[str]]:
    """Shard name → its URLs, read from every raw shard under ``raw_prefix`` (all rows, not
    the latest per URL, so that a duplicate would show)."""
    fs = StorageRoot.parse(s3.url(raw_prefix), storage_options=s3.storage_options).fs
    names = sorted(k for k in s3.keys(raw_prefix) if k.startswith("raw-"))
    return {
        name: pq.read_table(f"{s3.bucket}/{raw_prefix}/{name}", columns=["url"], filesystem=fs)
        .column("url")
        .to_pylist()
        for name in names
    }


def warm_up(nodes: list) -> None:
    """A worker process with carmodels imported on each node, so that the first two tasks
    start together: the two then share the host's 3 slots 2 to 1 (the coordinator's fair
    split), and when the first finishes the other is about half done."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    plan_remotely = ray.remote(plan_tasks)  # a cheap library call that imports the package
    ray.get(
        [
            plan_remotely.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
            ).remote([], 1)
            for node in nodes
        ],
        timeout=120,
    )


#: Seconds the second task's first photo takes to serve (the others take 0.2 s).
STUCK_S = 8.0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


@pytest.mark.timeout(400)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_a_lost_node_loses_no_url_and_duplicates_none(s3, monkeypatch):
    """A head and two one-CPU worker nodes; when the first task finishes, the other worker
    node (the one without a done-marker yet) is killed with its processes. The run completes,
    every URL is in exactly one shard, and the lost task's URLs were fetched again on the
    surviving node.

    The second task's first photo is served slowly, so the node running it is surely mid-task
    when the first task finishes: symmetric tasks would finish within moments of each other,
    and the node killed could then be one that had not started its next task yet."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another Ray session is open in this process"
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    catalog = build_catalog(seed=0, n_listings=30)
    # Keep every node on 127.0.0.1 (see carmodels.cluster.connect._loopback_addresses).
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    node_args = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * MIB}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args,
            "num_cpus": 0,  # tasks run on the worker nodes only
            "include_dashboard": False,
            # Notice a dead node within seconds rather than the default half minute.
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
            },
        },
    )
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    killed: list[str] = []

    def kill_the_busy_node(done: int, total: int) -> None:
        if not done or killed:
            return
        client = s3.client()
        listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/raw/_tasks/")
        finished_on = {
            json.loads(client.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read())["node"]
            for o in listed.get("Contents", [])
        }
        busy = [node for node in workers if node.node_id not in finished_on]
        victim = busy[0] if busy else workers[0]
        # A lost machine takes its task processes along; Ray's remove_node kills the node's
        # own processes, and a worker busy in a task would outlive its raylet for a while.
        raylet = victim.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        doomed = descendants(raylet)
        cluster.remove_node(victim, allow_graceful=False)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed.append(victim.node_id)

    # The plan is the driver's: URLs on one host, in tasks of 8 in manifest order.
    planned = prepare_manifest(catalog.manifest_frame("http://127.0.0.1:0").head(40))["url"]
    second_task = plan_tasks(planned.tolist(), 8).tasks[1]
    stuck_name = planned[second_task.rows[0]].rsplit("/", 1)[1]
    serve_image = demo_server._image

    async def one_photo_stuck(request):
        if request.match_info["name"] == stuck_name:
            await asyncio.sleep(STUCK_S)
        return await serve_image(request)

    monkeypatch.setattr(demo_server, "_image", one_photo_stuck)  # the server reads it at start

    try:
        workers = [cluster.add_node(num_cpus=1, **node_args) for _ in range(2)]
        cluster.wait_for_nodes()
        with DemoServer(catalog=catalog, image_delay_s=0.2, record_requests=True) as server:
            manifest = catalog.manifest_frame(server.base_url).head(40)
            with ray_session(cluster.address):
                warm_up(workers)
                result = download_on_ray(
                    manifest,
                    s3.url(f"{prefix}/raw"),
                    demo_config(server, per_host_limit=3),
                    FanoutConfig(urls_per_task=8, lease_s=0.05, lease_ttl_s=2.0),
                    s3.storage_options,
                    on_progress=kill_the_busy_node,
                )
        image_requests = len(server.request_log.records("/images/"))  # the server stopped
    finally:
        cluster.shutdown()

    assert killed, "a node was killed mid-run"
    urls = prepare_manifest(manifest)["url"].tolist()
    assert sum(result.outcome_counts.values()) == result.n_fetched == len(urls)
    found = [url for shard in shard_urls(s3, f"{prefix}/raw").values() for url in shard]
    assert len(found) == len(set(found)), "no URL twice"
    assert sorted(found) == sorted(urls), "every URL once"
    assert image_requests > len(urls), "the lost task's URLs were fetched again elsewhere"
    markers = [key for key in s3.keys(f"{prefix}/raw") if key.startswith("_tasks/")]
    assert len(markers) == len(plan_tasks(urls, 8).tasks) == 5
