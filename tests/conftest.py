from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


@pytest.fixture(autouse=True)
def _no_machine_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test sees empty caches of its own, never this machine's.

    Otherwise a machine whose torch hub cache (``~/.cache/torch/hub/checkpoints``) holds the
    Inception weights computes FID where the tests expect "not computed" (or fails on a bad
    file there), and the storage working copies (``~/.cache/carmodels``) outlive the tests.
    """
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))  # torch.hub and torch-fidelity
    monkeypatch.setenv("CARMODELS_CACHE", str(cache / "carmodels"))  # carmodels.storage
    monkeypatch.delenv("CARMODELS_INCEPTION_WEIGHTS", raising=False)  # carmodels.fid
    hub = sys.modules.get("torch.hub")
    if hub is not None:  # a torch.hub.set_dir() call would take precedence over TORCH_HOME
        monkeypatch.setattr(hub, "_hub_dir", None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_blocky_shards(folder: Path, splits: Sequence[str], size: int = 32, seed: int = 0) -> Path:
    """One car shard of random 4x4 colour blocks scaled up to ``size`` px, one image a split.

    The trainer, evaluation, generation and restoration tests train tiny models on these.
    """
    n_images = len(splits)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_images, 4, 4, 3), dtype=np.uint8)
    images = blocks.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "image": [image.tobytes() for image in images],
            "height": [size] * n_images,
            "width": [size] * n_images,
            "split": list(splits),
            "sha256": [hashlib.sha256(image.tobytes()).hexdigest() for image in images],
        }
    )
    pq.write_table(table, folder / "car-00000.parquet")
    return folder


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a Dagster process (`dagster dev`, `dagster-daemon run`) and everything it started
    (webserver, daemon, code servers, runs).

    SIGINT to the whole group is what Ctrl-C in a terminal does, the shutdown Dagster's
    processes are written for; whatever is still there after a grace period is killed.
    """
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=30)
