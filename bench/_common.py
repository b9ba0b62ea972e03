"""What the benchmarks share: the machine facts and the JSON report every one can write."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def write_report(path: Path, args: argparse.Namespace, **figures: Any) -> None:
    """Write ``figures`` to ``path`` as JSON, with the date, the machine, its load and the
    command-line arguments, so that a result can be told apart from another run's."""
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "args": {key: str(value) for key, value in vars(args).items()},
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
