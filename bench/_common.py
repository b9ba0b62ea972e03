"""What the benchmarks share: the machine facts and the JSON report every one can write, and
shards built from a folder of photos with a ``manifest.csv``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a bare checkout

from carmodels.checkpoint import load_generator  # noqa: E402
from carmodels.classifier import ClassifierConfig, TrainedClassifier, train_classifier  # noqa: E402
from carmodels.dedup import DedupConfig, deduplicate  # noqa: E402
from carmodels.device import resolve_device  # noqa: E402
from carmodels.errors import InputError  # noqa: E402
from carmodels.generate import sample_images  # noqa: E402
from carmodels.imaging import ImagingConfig  # noqa: E402
from carmodels.metrics.domain import feature_scores  # noqa: E402
from carmodels.metrics.pixel import to_uint8  # noqa: E402
from carmodels.pictures import save_image_grid  # noqa: E402
from carmodels.scrape.raw import local_photo_row, raw_schema, shard_path  # noqa: E402
from carmodels.shards import (  # noqa: E402
    ShardConfig,
    build_shards,
    data_version_of,
    fit_image_size,
    load_images,
)
from carmodels.versioning import source_version  # noqa: E402

#: The shared photos beside the project (a user's clone has none).
SHARED_DATA = REPO.parent / "shared" / "data"
#: The share of the photos the benches hold out as val photos (by content hash).
STUDY_VAL_FRACTION = 0.2
#: The side of the study's shards (``quality.py``), which the judge is trained and packed for.
STUDY_SHARD_SIZE = 128
#: Manifest columns carried into the shards (``type`` and ``make`` label the judge).
METADATA_COLUMNS = ("make", "model", "year", "type")


def default_judge_cache() -> Path:
    """Where ``bench/judge.py``, ``quality.py`` and ``truncation.py`` keep the judges they
    train, shared and kept between runs: training the judge takes about as long as the recipe
    study's runs (18 and 17 min on 2 cores for ``cars-train-6k``), and the study should score
    with the very judge that ``bench/judge.py`` validated. A judge is found by its photos' data
    version and its settings (:func:`carmodels.classifier.train_classifier`); the folder is
    named by the classifier's code version, so a changed classifier trains anew."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "carmodels" / "judges" / source_version(["carmodels.classifier"])


def add_judge_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--judge-cache",
        type=Path,
        default=None,
        help="keep and reuse trained judges here (default: ~/.cache/carmodels/judges/<code "
        "version>, shared by bench/judge.py, quality.py and truncation.py)",
    )


def lacks_manifest(images: Path, tool: str) -> bool:
    """Whether ``images`` has no ``manifest.csv``; if so, says so in one line on stderr."""
    if (images / "manifest.csv").is_file():
        return False
    print(f"{tool}: {images} has no manifest.csv; pass --images DIR", file=sys.stderr)
    return True


#: What ``bench/device_pack.py`` writes beside a judge it packs: which photos trained it.
JUDGE_PACK_FILE = "judge.json"


def study_judge(
    shards_dir: Path,
    judge_cache: Path | None,
    judged_side: int | None,
    judge_pack: Path | None = None,
) -> TrainedClassifier:
    """The judge every bench scores with: the cached one for these shards' photos, or trained
    and cached (``--judge-cache``, else :func:`default_judge_cache`).

    ``judge_pack`` (``bench/device_pack.py``'s folder, for a machine without the photos the
    judge was trained on) names a judge trained elsewhere on the same photos: it is used as it
    is, and never trained anew here; a pack made by other classifier code is refused."""
    if judge_pack is None:
        cache, data_version = judge_cache or default_judge_cache(), data_version_of(shards_dir)
    else:
        cache, data_version = judge_pack, _packed_data_version(judge_pack, judged_side)
    judge = train_classifier(
        shards_dir, cache, data_version, ClassifierConfig(), print, judged_side=judged_side
    )
    assert judge_pack is None or judge.from_cache, "same code, photos and side: the pack's key"
    return judge


def _packed_data_version(judge_pack: Path, judged_side: int | None) -> str:
    """The data version the packed judge was trained for, once the pack is known to hold it
    and to come from this classifier code at this side (so its cache key is found here)."""
    try:
        packed = json.loads((judge_pack / JUDGE_PACK_FILE).read_text())
    except (OSError, ValueError) as error:
        raise InputError(
            f"{judge_pack / JUDGE_PACK_FILE} is missing or unreadable ({error}); "
            "make the pack again with bench/device_pack.py"
        ) from None
    code_version = source_version(["carmodels.classifier"])
    if packed["code_version"] != code_version or packed["judged_side"] != judged_side:
        raise InputError(
            f"the judge in {judge_pack} was made by classifier code {packed['code_version']} "
            f"for {packed['judged_side']} px, this is code {code_version} for {judged_side} "
            "px; make the pack again with bench/device_pack.py"
        )
    if not (judge_pack / packed["file"]).is_file():
        raise InputError(f"{judge_pack / packed['file']} is missing; make the pack again")
    return packed["data_version"]


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


def build_sample_shards(
    images_dir: Path,
    work: Path,
    image_size: int,
    val_fraction: float = STUDY_VAL_FRACTION,
    framing: str = "letterbox",
) -> tuple[Path, str]:
    """The photos of ``images_dir/manifest.csv`` through raw shard, dedup and shards; shards
    already in ``work`` (a kept ``--work`` folder) are reused, and so is the judge cached
    for them."""
    raw_dir, unique_dir, shards_dir = work / "raw", work / "unique", work / "shards"
    if (shards_dir / "summary.json").is_file():
        summary = json.loads((shards_dir / "summary.json").read_text())
        return shards_dir, f"shards reused from {shards_dir}: {summary.get('counts', summary)}"
    manifest = images_dir / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("image", *METADATA_COLUMNS) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{manifest} needs an image column and {METADATA_COLUMNS}; {missing=}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.glob("raw-*.parquet"):
        stale.unlink()
    fetched_at = datetime.now(UTC)
    records = [
        local_photo_row(
            f"file://{images_dir.resolve() / row['image']}",
            (images_dir / row["image"]).read_bytes(),
            fetched_at,
            **{c: row[c] for c in METADATA_COLUMNS},
        )
        for row in rows
    ]
    table = pa.Table.from_pylist(records, schema=raw_schema(list(METADATA_COLUMNS)))
    pq.write_table(table, shard_path(raw_dir, 0), compression="zstd")
    deduplicate(raw_dir, unique_dir, DedupConfig(workers=1))
    config = ShardConfig(
        imaging=ImagingConfig(size=image_size, framing=framing),
        val_fraction=val_fraction,
        workers=1,
    )
    result = build_shards(unique_dir, raw_dir, shards_dir, config)
    return shards_dir, (
        f"{len(rows)} photos -> {result.n_written} images ({result.n_train} train, "
        f"{result.n_val} val) at {image_size} px"
    )


class RealReference:
    """The val photos of a shards folder and the judge's features of them at each side a
    generator needs: read and judged once, however many generators are scored against them."""

    def __init__(self, judge: TrainedClassifier, shards_dir: Path) -> None:
        self.judge, self.shards_dir = judge, shards_dir
        self._val: Any = None
        self._features: dict[int, Any] = {}

    def features(self, side: int) -> Any:
        """The judge's features (N x D) of the val photos scaled to ``side``."""
        if side not in self._features:
            if self._val is None:
                self._val = load_images(self.shards_dir, "val")
            val = fit_image_size(self._val, side, str(self.shards_dir))
            self._features[side] = self.judge.features_and_predictions(val)[0]
        return self._features[side]

    def __getstate__(self) -> dict[str, Any]:
        """Sent to a worker process with the judge and the features computed so far, without
        the val photos (read again there if another side is asked for)."""
        return {**self.__dict__, "_val": None}


def score_generator(
    reference: RealReference, checkpoint: Path, grid_path: Path, seed: int, ema: bool = True
) -> dict[str, float | None]:
    """The judge's scores of a generator's samples (as many as the val photos, drawn with
    ``seed``) against the val photos at the generator's size; its first 64 samples go to
    ``grid_path``. The samples are drawn on the GPU where there is one (the ``gpu128`` study's
    128 px generators: seconds each there, far longer on CPU cores), from the same latents."""
    device = str(resolve_device("auto"))
    generator, spec, _ = load_generator(checkpoint, device=device, ema=ema)
    real = reference.features(spec.image_size)
    with torch.no_grad():
        generated = to_uint8(sample_images(generator, len(real), seed=seed))
    save_image_grid(generated[:64].float().div(127.5).sub(1), grid_path, nrow=8)
    generated_features = reference.judge.features_and_predictions(generated)[0]
    return feature_scores(real, generated_features)
