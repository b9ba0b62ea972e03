"""Scale-out on a Ray cluster: downloads fanned out as Ray tasks, with per-host politeness
that holds across every worker.

``download_on_ray`` is the Ray form of :func:`carmodels.scrape.download_images` (same rows,
same shards, resumable), ``ray_session`` connects (``local`` starts a head on 127.0.0.1), and
``FanoutConfig`` holds the settings. ``ray_chunk_mapper`` (``ray_chunk_mapping`` also
connects) runs a shard build's normalising as Ray tasks (``build_shards(map_chunks=...)``).
Ray is an optional extra (``carmodels[ray]``) imported only when one of these runs, so
importing this package needs no Ray.
"""

from carmodels.cluster.config import FanoutConfig
from carmodels.cluster.connect import RAY_MISSING, ray_session, require_ray
from carmodels.cluster.ingest import FanoutFailed, download_on_ray
from carmodels.cluster.normalise import RayChunkMapper, ray_chunk_mapper, ray_chunk_mapping
from carmodels.cluster.plan import FanoutPlan, PlannedTask, plan_tasks

__all__ = [
    "RAY_MISSING",
    "FanoutConfig",
    "FanoutFailed",
    "FanoutPlan",
    "PlannedTask",
    "RayChunkMapper",
    "download_on_ray",
    "plan_tasks",
    "ray_chunk_mapper",
    "ray_chunk_mapping",
    "ray_session",
    "require_ray",
]
