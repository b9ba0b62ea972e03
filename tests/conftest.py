from __future__ import annotations

import socket
from pathlib import Path

import pytest

#: The shared real data beside the repository (absent in a user's fresh clone).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CARS_SAMPLE = SHARED_DATA / "cars-sample"
SEED_MANIFEST = SHARED_DATA / "seed-manifest" / "final_data.csv"

requires_cars_sample = pytest.mark.skipif(
    not (CARS_SAMPLE / "manifest.csv").exists(),
    reason=f"real photos not found at {CARS_SAMPLE} (../shared is absent in a fresh clone)",
)
requires_seed_manifest = pytest.mark.skipif(
    not SEED_MANIFEST.exists(),
    reason=f"seed manifest not found at {SEED_MANIFEST} (../shared is absent in a fresh clone)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
