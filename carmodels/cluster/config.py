"""`FanoutConfig`: how a download spreads over a Ray cluster (the scrape settings themselves
stay in `carmodels.scrape.ScrapeConfig`, and mean the same there)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FanoutConfig:
    """Every knob of a Ray download (:func:`carmodels.cluster.download_on_ray`)."""

    address: str = field(
        default="",
        metadata={
            "help": "Ray cluster to download on: ray://head:10001, head:6379, auto, or local "
            "(a head on this machine, on 127.0.0.1); empty = download on this machine"
        },
    )
    urls_per_task: int = field(
        default=1000,
        metadata={
            "help": "URLs per Ray task at most; each task writes one raw shard, and a host's "
            "URLs fill as few tasks as possible"
        },
    )
    task_retries: int = field(
        default=3,
        metadata={"help": "times a task that failed or whose node was lost is run again"},
    )
    #: CPUs Ray reserves for each task. One event loop fetches and one decode pool decodes
    #: per task, so one CPU is its natural size.
    task_cpus: float = 1.0
    #: Seconds between a task's renewals of its share of a host that several tasks fetch
    #: (carmodels.cluster.politeness): how fast slots move to a task that joins the host.
    lease_s: float = 0.2
    #: Seconds after which a task not heard from (its node lost) no longer holds a share of
    #: a host's slots. Generous: a task whose event loop stalls longer than this stops
    #: starting requests until it has renewed.
    lease_ttl_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("urls_per_task", "task_cpus", "lease_s", "lease_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FanoutConfig.{name} must be positive, got {getattr(self, name)}")
        if self.task_retries < 0:
            raise ValueError(f"FanoutConfig.task_retries must be >= 0, got {self.task_retries}")
        if self.lease_ttl_s < 4 * self.lease_s:
            raise ValueError(
                f"FanoutConfig.lease_ttl_s ({self.lease_ttl_s}) must be at least 4 lease_s "
                f"({self.lease_s}): a lease must survive a late renewal or two"
            )
