"""Is a downloaded body a usable image? Magic bytes first, then a full Pillow decode.

:func:`inspect_image` is a plain function of bytes so that it can run in a thread or a
process pool, away from the event loop that keeps the downloads flowing.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps

from carmodels.imaging import LETTERBOX_EDGE_PX, to_square

#: Leading bytes of the formats a listing photo comes in. Anything else (HTML error pages
#: served as ``image/jpeg``, SVG, PDFs) is ``not_image`` whatever its Content-Type says.
_MAGIC_PREFIXES: dict[bytes, str] = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
}
#: ``Accept`` header of image requests: only what the validator can check, so that CDNs that
#: negotiate formats do not answer with AVIF or JPEG XL.
ACCEPTED_IMAGE_TYPES = "image/jpeg,image/png,image/webp,image/gif;q=0.8"
#: Bytes needed to recognise every format above (WebP needs 12: ``RIFF<size>WEBP``).
MAGIC_BYTES_NEEDED = 12


def sniff_image_format(head: bytes) -> str | None:
    """``JPEG``, ``PNG``, ``GIF`` or ``WEBP`` from the first bytes of a body, else None."""
    for prefix, name in _MAGIC_PREFIXES.items():
        if head.startswith(prefix):
            return name
    if len(head) >= MAGIC_BYTES_NEEDED and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass(frozen=True)
class ImageCheck:
    """Verdict on one body: ``outcome`` is ``ok``, ``not_image``, ``corrupt`` or ``bomb``."""

    outcome: str
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    format: str | None = None
    #: ``size x size x 3`` uint8 RGB bytes when a thumbnail was asked for and the image is ok.
    thumbnail: bytes | None = None


def inspect_image(data: bytes, max_pixels: int, thumbnail_size: int = 0) -> ImageCheck:
    """Decode ``data`` fully and report its size and content hash, optionally a thumbnail.

    The pixel count is checked from the header, before ``load()`` allocates anything, so a
    tiny file claiming 100k x 100k pixels costs nothing. Pillow's own decompression-bomb
    guard is left in place as a second line of defence.

    With ``thumbnail_size``, a JPEG is decoded with libjpeg's DCT scaling (Pillow ``draft``)
    straight to the smallest 1/2, 1/4 or 1/8 scale whose long side still covers the
    thumbnail, which costs a fraction of a full decode and still reads (so validates) every
    byte of the file; the image is then letterboxed to a square with the car shards' framing
    (:func:`carmodels.imaging.to_square`: long side to ``thumbnail_size``, bars the mean
    colour of the adjacent edge), EXIF orientation applied. The one decode serves both the
    validation and the thumbnail.
    """
    image_format = sniff_image_format(data[:MAGIC_BYTES_NEEDED])
    if image_format is None:
        return ImageCheck("not_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    return ImageCheck("bomb", width, height, format=image_format)
                if thumbnail_size and image.format == "JPEG":
                    scale = thumbnail_size / max(width, height)
                    image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
                image.load()  # truncated or undecodable data raises here, not at open()
                thumbnail = _thumbnail(image, thumbnail_size) if thumbnail_size else None
    except Image.DecompressionBombError:
        return ImageCheck("bomb", format=image_format)
    except (OSError, ValueError, SyntaxError, EOFError):
        # Pillow reports broken files with any of these, depending on the plugin.
        return ImageCheck("corrupt", format=image_format)
    return ImageCheck(
        "ok", width, height, hashlib.sha256(data).hexdigest(), image_format, thumbnail
    )


#: Modes resized directly (after a cheap ``L`` → ``RGB``); others (alpha, palette, CMYK)
#: take :func:`carmodels.imaging.to_square`, which composites transparency on white.
_FAST_MODES = frozenset({"RGB", "L"})
#: EXIF orientation tag (values 2-8 mean the pixels are stored mirrored or rotated).
_ORIENTATION_TAG = 0x0112


def _thumbnail(image: Image.Image, size: int) -> bytes:
    """``size x size x 3`` RGB bytes of ``image`` letterboxed like the car shards.

    RGB and grey photos (nearly every JPEG) stay inside Pillow from decode to bytes: the
    resize (antialiased bicubic for the 1-2x reductions left after DCT scaling: closer to the
    car shards' full-resolution LANCZOS than an area average, docs/BENCHMARKS.md), the
    edge-mean bars and the paste run in C with the GIL released, so the decode threads leave
    the event loop's thread alone; a round trip through NumPy copies the pixels under the
    GIL. Anything else goes through :func:`carmodels.imaging.to_square` itself.
    """
    # exif_transpose copies the image even when there is nothing to turn: ask first.
    turned = image.getexif().get(_ORIENTATION_TAG, 1) not in (1, None)
    oriented = ImageOps.exif_transpose(image) if turned else image
    if oriented.mode not in _FAST_MODES:
        square = to_square(oriented, size, "letterbox")
        return np.ascontiguousarray(square, dtype=np.uint8).tobytes()
    content = oriented.convert("RGB") if oriented.mode == "L" else oriented
    width, height = content.size
    # The car shards' rounding (carmodels.imaging._fit): long side to `size`, short side >= 1.
    scale = size / max(width, height)
    new_width = min(size, max(1, round(width * scale)))
    new_height = min(size, max(1, round(height * scale)))
    if (new_width, new_height) != (width, height):
        shrinking = new_width <= width and new_height <= height
        resample = Image.Resampling.BICUBIC if shrinking else Image.Resampling.LANCZOS
        content = content.resize((new_width, new_height), resample)
    if new_width == new_height == size:
        return content.tobytes()
    square = Image.new("RGB", (size, size))
    top, left = (size - new_height) // 2, (size - new_width) // 2
    edge = LETTERBOX_EDGE_PX
    if new_height < size:  # wide photo: bars above and below
        square.paste(_edge_colour(content, (0, 0, new_width, edge)), (0, 0, size, top))
        bottom = (0, new_height - edge, new_width, new_height)
        square.paste(_edge_colour(content, bottom), (0, top + new_height, size, size))
    if new_width < size:  # tall photo: bars left and right
        square.paste(_edge_colour(content, (0, 0, edge, new_height)), (0, 0, left, size))
        right = (new_width - edge, 0, new_width, new_height)
        square.paste(_edge_colour(content, right), (left + new_width, 0, size, size))
    square.paste(content, (left, top))
    return square.tobytes()


def _edge_colour(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """Mean RGB of ``image`` inside ``box`` (clipped to the image), by a 1x1 box reduction."""
    left, top, right, bottom = box
    box = (max(0, left), max(0, top), min(image.width, right), min(image.height, bottom))
    return image.resize((1, 1), Image.Resampling.BOX, box=box).getpixel((0, 0))
