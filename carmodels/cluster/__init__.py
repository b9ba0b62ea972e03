"""Scale-out on a Ray cluster: downloads fanned out as Ray tasks, with per-host politeness
that holds across every worker.

``download_on_ray`` is the Ray form of :func:`carmodels.scrape.download_images` (same rows,
same shards, resumable), ``ray_session`` connects (``local`` starts a head on 127.0.0.1), and
``FanoutConfig`` holds the settings. Ray is an optional extra (``carmodels[ray]``) imported
only when one of these runs, so importing this package needs no Ray.
"""

from carmodels.cluster.config import FanoutConfig
from carmodels.cluster.connect import RAY_MISSING, ray_session, require_ray
from carmodels.cluster.ingest import FanoutFailed, download_on_ray
from carmodels.cluster.plan import FanoutPlan, PlannedTask, plan_tasks

__all__ = [
    "RAY_MISSING",
    "FanoutConfig",
    "FanoutFailed",
    "FanoutPlan",
    "PlannedTask",
    "download_on_ray",
    "plan_tasks",
    "ray_session",
    "require_ray",
]
