"""How far planted copies and false candidates sit from ``DedupConfig``'s two thresholds.

For every photo of ``--images DIR`` (default ``../shared/data/cars-sample``) one copy of each
kind is made (bench/dedup.py's four kinds, plus ``crop6``: 3% cut from every side, and
``all``: q60 + 80% resize + 1.5%-a-side crop + mirror at once), and each photo is hashed the
way ``deduplicate`` hashes it. Printed per kind: the phash distance of copy to original
(flip-aware) against ``threshold``, and their colour distance against
``max_colour_distance``; then the false candidates among the originals (pairs within
``threshold`` bits) and their smallest colour distance. These are the figures quoted in the
comments of ``DedupConfig.threshold`` and ``DedupConfig.max_colour_distance``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carmodels.dedup import DedupConfig, colour_distances, find_near_duplicates  # noqa: E402
from carmodels.dedup.hashing import _hash_chunk, _HashTask  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "cars-sample"


def make_copy(img: Image.Image, kind: str) -> bytes:
    """The JPEG bytes of one kind of near duplicate of ``img``."""
    width, height = img.size
    quality = 95

    def crop(share: float) -> Image.Image:
        dx, dy = round(width * share), round(height * share)
        return img.crop((dx, dy, width - dx, height - dy))

    if kind == "q60":
        copy, quality = img, 60
    elif kind == "resize80":
        small = img.resize((round(width * 0.8), round(height * 0.8)), Image.Resampling.LANCZOS)
        copy = small.resize((width, height), Image.Resampling.LANCZOS)
    elif kind == "crop3":
        copy = crop(0.015)
    elif kind == "crop6":
        copy = crop(0.03)
    elif kind == "mirror":
        copy = ImageOps.mirror(img)
    elif kind == "all":
        small = img.resize((round(width * 0.8), round(height * 0.8)), Image.Resampling.LANCZOS)
        copy = ImageOps.mirror(small.resize((width, height), Image.Resampling.LANCZOS))
        dx, dy = round(width * 0.015), round(height * 0.015)
        copy, quality = copy.crop((dx, dy, width - dx, height - dy)), 60
    else:
        raise ValueError(kind)
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


KINDS = ("q60", "resize80", "crop3", "crop6", "mirror", "all")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--limit", type=int, default=0, help="first N photos only (0: all)")
    args = parser.parse_args(argv)
    config = DedupConfig()
    manifest = args.images / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(
            f"{manifest} not found: pass --images, a folder with a manifest.csv whose `image` "
            "column names the photos (../shared/data/cars-sample has one)"
        )
    with manifest.open(newline="") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    names = names[: args.limit] if args.limit else names
    if not names:
        raise SystemExit(f"{manifest} lists no images")
    originals = [(args.images / name).read_bytes() for name in names]
    tasks = [_HashTask(str(k), data) for k, data in enumerate(originals)]
    for kind in KINDS:
        for k, data in enumerate(originals):
            with Image.open(io.BytesIO(data)) as source:
                img = ImageOps.exif_transpose(source).convert("RGB")
            tasks.append(_HashTask(f"{kind}:{k}", make_copy(img, kind)))
    rows = _hash_chunk(tasks, config)
    index = {row["sha256"]: i for i, row in enumerate(rows)}
    hashes = np.array([row["hash"] for row in rows], dtype=np.uint64)
    flipped = np.array([row["hash_flipped"] for row in rows], dtype=np.uint64)
    thumbs = np.stack(
        [np.frombuffer(row["thumbnails"], np.uint8).reshape(config.thumbnail_shape) for row in rows]
    )
    n = len(originals)
    print(
        f"{n} photos of {args.images}, threshold {config.threshold}, "
        f"max_colour_distance {config.max_colour_distance}"
    )
    for kind in KINDS:
        copies = np.array([index[f"{kind}:{k}"] for k in range(n)])
        bits = np.minimum(
            np.bitwise_count(hashes[:n] ^ hashes[copies]),
            np.bitwise_count(flipped[:n] ^ hashes[copies]),
        )
        colour = colour_distances(thumbs, np.arange(n), copies, config.flip_aware)
        within = (bits <= config.threshold).mean()
        both = ((bits <= config.threshold) & (colour <= config.max_colour_distance)).mean()
        print(
            f"{kind:8s} bits: max {bits.max():2d}, p99 {np.percentile(bits, 99):4.1f}, "
            f"within threshold {within:.3f}; colour: max {colour.max():5.2f}, "
            f"p99 {np.percentile(colour, 99):5.2f}; found (both checks) {both:.3f}"
        )
    pairs = find_near_duplicates(hashes[:n], config.threshold, flipped[:n])
    colour = colour_distances(thumbs, pairs["i"].to_numpy(), pairs["j"].to_numpy(), True)
    smallest = np.sort(colour)[:5]
    print(
        f"hash candidates among the originals: {len(pairs)}; colour distances, smallest: "
        f"{', '.join(f'{c:.1f}' for c in smallest)}; accepted: "
        f"{int((colour <= config.max_colour_distance).sum())}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
