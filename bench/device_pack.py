"""What a lent GPU machine needs for ``bench/quality.py --budget gpu128``, in one folder of the
checkout that git ignores (``.device-pack/``), small enough to travel with it.

The device tool sends the checkout and the paths a call names in ``carry``, 64 MiB in all, and
not the ``../shared`` photos beside it (86 MB for ``cars-train-6k``). Nor can the GPU machine
train the judge in its time: the judge trains on CPU cores, 18 minutes here. So the pack holds:

* ``photos/``: the photos of ``--images`` and their ``manifest.csv``, each scaled down until its
  short side is at most 128 px (the shards' side: neither framing loses pixels it would keep)
  and saved again as JPEG quality 85, about 9 KB a photo. A photo's train/val split follows
  its bytes' hash (``carmodels.shards.split_for``), so each packed photo carries a JPEG
  comment chosen to put it in its original's split: the GPU study trains and scores on the
  photos the judge was validated with;
* ``judge/``: the judge validated here (``bench/judge.py``) for the shards of the original
  photos, from the judge cache (trained there first if missing), and ``judge.json``: the data
  version and classifier code it belongs to. ``quality.py --judge-pack`` scores with it as it
  is, and refuses a pack made by other classifier code;
* ``site/``: pure-Python packages carmodels imports that the GPU machine's image lacks.

The pack is built from the photos on demand and never committed (``.gitignore``). On the GPU
machine, ``bench/gpu_session.sh`` runs the study from it (docs/benchmarks/quality.md). Last
line::

    device pack: N photos (X MiB), judge K, Y MiB in all (with the checkout Z of 64 MiB), in DIR

Usage: ``python bench/device_pack.py [--images DIR] [--out .device-pack] [--work DIR]
[--judge-cache DIR]``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when a test loads this

from _common import (  # noqa: E402
    JUDGE_PACK_FILE,
    REPO,
    SHARED_DATA,
    STUDY_SHARD_SIZE,
    STUDY_VAL_FRACTION,
    add_judge_cache_option,
    build_sample_shards,
    lacks_manifest,
    study_judge,
)

from carmodels.shards import data_version_of, split_for  # noqa: E402
from carmodels.versioning import source_version  # noqa: E402

DEFAULT_IMAGES = SHARED_DATA / "cars-train-6k"
DEFAULT_OUT = REPO / ".device-pack"
JPEG_QUALITY = 85
#: Imported by carmodels, pure Python, and missing from the GPU machines' image
#: (/work/.library/device/KINDS.md lists what it has).
MISSING_THERE = ("protego",)
#: What the device tool carries in one call: the checkout's tracked and unignored files and
#: the carried paths together. The pack must leave room for the checkout and a margin.
CARRY_LIMIT_MIB = 64
MARGIN_MIB = 2


def shrink_photo(
    data: bytes, short_side: int = STUDY_SHARD_SIZE, quality: int = JPEG_QUALITY
) -> bytes:
    """A photo scaled down (never up) until its short side is at most ``short_side``, as JPEG."""
    with Image.open(io.BytesIO(data)) as photo:
        photo = photo.convert("RGB")
        scale = short_side / min(photo.size)
        if scale < 1:
            size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
            photo = photo.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        photo.save(out, "JPEG", quality=quality)
    return out.getvalue()


def in_split_of(packed: bytes, original: bytes, val_fraction: float = STUDY_VAL_FRACTION) -> bytes:
    """``packed`` (a JPEG) with a comment segment that puts its content hash in the same
    train/val split as ``original``'s; the pixels are untouched. On average 1.25 tries for a
    train photo and 5 for a val one, a fifth being held out."""
    split = split_for(hashlib.sha256(original).hexdigest(), val_fraction)
    assert packed[:2] == b"\xff\xd8", "a JPEG starts with its SOI marker"
    at = 2
    if packed[2:4] == b"\xff\xe0":  # JFIF wants its APP0 segment right after SOI
        at = 4 + int.from_bytes(packed[4:6], "big")
    for attempt in range(10_000):
        text = f"carmodels split {attempt}".encode()
        comment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text  # COM segment
        candidate = packed[:at] + comment + packed[at:]
        if split_for(hashlib.sha256(candidate).hexdigest(), val_fraction) == split:
            return candidate
    raise RuntimeError(f"no comment put the photo in the {split} split")  # odds: 0.8**10_000


def pack_photos(images: Path, out: Path) -> int:
    """Shrunk copies of the manifest's photos and the manifest, under ``out``; how many."""
    with (images / "manifest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames or []), list(reader)
    for row in rows:
        target = out / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        original = (images / row["image"]).read_bytes()
        target.write_bytes(in_split_of(shrink_photo(original), original))
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def pack_modules(out: Path, names: tuple[str, ...] = MISSING_THERE) -> None:
    """Copies of installed pure-Python packages (or modules), for ``PYTHONPATH`` there."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"{name} is not installed here to pack")
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, out / name, ignore=shutil.ignore_patterns("*.pyc"))
        else:
            shutil.copy2(origin, out / origin.name)


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def checkout_mib(repo: Path = REPO) -> float:
    """The size of what travels of the checkout besides the pack: tracked and unignored files."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    files = [repo / name for name in listed.decode().split("\0") if name]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="photos + manifest")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the pack (replaced)")
    parser.add_argument("--work", type=Path, help="keep (or reuse) the original photos' shards")
    add_judge_cache_option(parser)
    args = parser.parse_args(argv)
    if lacks_manifest(args.images, "device pack"):
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        shards_dir, source = build_sample_shards(args.images, work, STUDY_SHARD_SIZE)
        print(f"device pack: {source}", flush=True)
        judge = study_judge(shards_dir, args.judge_cache, STUDY_SHARD_SIZE)
        data_version = data_version_of(shards_dir)
    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    n_photos = pack_photos(args.images, staging / "photos")
    (staging / "judge").mkdir()
    shutil.copy2(judge.cache_path, staging / "judge" / judge.cache_path.name)
    record = {
        "file": judge.cache_path.name,
        "data_version": data_version,
        "code_version": source_version(["carmodels.classifier"]),
        "judged_side": STUDY_SHARD_SIZE,
        "photos": str(args.images.resolve()),
        "accuracies": judge.accuracies,
    }
    (staging / "judge" / JUDGE_PACK_FILE).write_text(json.dumps(record, indent=2) + "\n")
    pack_modules(staging / "site")
    total, checkout = folder_mib(staging), checkout_mib()
    if total + checkout + MARGIN_MIB > CARRY_LIMIT_MIB:
        print(
            f"device pack: {total:.1f} MiB and the checkout's {checkout:.1f} MiB are over the "
            f"{CARRY_LIMIT_MIB} MiB a device call carries (less {MARGIN_MIB} MiB of margin); "
            f"lower JPEG_QUALITY in {Path(__file__).name} or pack fewer photos",
            file=sys.stderr,
        )
        shutil.rmtree(staging)
        return 1
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(
        f"device pack: {n_photos} photos ({folder_mib(args.out / 'photos'):.1f} MiB), judge "
        f"{judge.key}, {total:.1f} MiB in all (with the checkout {total + checkout:.1f} of "
        f"{CARRY_LIMIT_MIB} MiB), in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
