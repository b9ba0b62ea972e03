"""Decode a listing photo and turn it into a square, facing-normalised RGB array.

The steps, each a plain function so that dedup and the shard builder share them:

- ``decode_image``: bytes -> RGB ``PIL.Image`` with the EXIF orientation applied (phones store
  portrait shots as rotated landscape pixels plus a tag) and JPEG draft mode, which lets libjpeg
  decode at 1/2, 1/4 or 1/8 scale when the target is much smaller than the photo.
- ``to_square``: letterbox (pad) or centre-crop to ``size x size`` with an antialiased resize.
- ``estimate_facing``: which way the car points (the model of `carmodels.facing`, or the
  silhouette heuristic).
- ``normalise``: all of the above plus the quality gates, giving a ``NormalisedImage`` or a
  ``Rejection`` that says why the photo is unfit for training.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

# Facing lives in carmodels.facing; these names stay importable from here.
from carmodels.facing import FACING_HEURISTIC as FACING_HEURISTIC
from carmodels.facing import (
    FACING_METHODS,
    FacingHeuristic,
    estimate_facing,
    estimate_facing_silhouette,
)

# JPEG markers and draft scales live in carmodels.jpeg.
from carmodels.jpeg import JPEG_END as _JPEG_END
from carmodels.jpeg import decode_jpeg_opencv as _decode_jpeg_opencv
from carmodels.jpeg import draft_scale as _draft_scale
from carmodels.jpeg import pillow_draft_scale as _pillow_draft_scale
from carmodels.jpeg import plain_jpeg_size as _plain_jpeg_size

Framing = Literal["letterbox", "crop"]
Face = Literal["left", "right", "none"]
Facing = Literal["left", "right", "front_or_rear"]

FRAMINGS: tuple[str, ...] = ("letterbox", "crop")
FACES: tuple[str, ...] = ("left", "right", "none")
#: Reasons ``normalise`` rejects a photo for.
REJECT_REASONS: tuple[str, ...] = ("corrupt", "too_small", "bad_aspect", "front_or_rear")

#: Pillow refuses images above this many pixels (decompression-bomb guard); listing photos are
#: far smaller, so anything bigger is treated as corrupt rather than decoded.
MAX_IMAGE_PIXELS = 80_000_000
#: EXIF tag holding the orientation; values 5-8 swap width and height.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode completely."""


@dataclass(frozen=True)
class ImagingConfig:
    """How a photo becomes a training image."""

    #: Side of the square output in pixels.
    size: int = 128
    framing: str = field(
        default="letterbox",
        metadata={
            "help": "letterbox keeps the whole car and pads the short side; crop fills the "
            "square by cutting the long side (and often the car's bumpers) away",
            "choices": FRAMINGS,
        },
    )
    min_side: int = field(
        default=64,
        metadata={"help": "photos whose shorter side is below this many pixels are rejected"},
    )
    #: Photos whose long/short side ratio exceeds this are rejected as ``bad_aspect`` (banners,
    #: panoramas, thumbnails strips).
    max_aspect: float = 3.5
    face: str = field(
        default="left",
        metadata={
            "help": "direction every car should face after normalisation; none leaves photos "
            "as they are",
            "choices": FACES,
        },
    )
    drop_front_rear: bool = field(
        default=False,
        metadata={"help": "reject photos whose car is seen from the front or rear"},
    )
    #: Facing estimates below this confidence are not acted on (no mirroring, no dropping).
    facing_min_confidence: float = 0.25
    #: ``model`` (measured on real photos) or ``silhouette`` (see `estimate_facing`).
    facing_method: str = "model"
    #: JPEG draft decoding keeps at least this many times the target size, so the final
    #: antialiased resize still has detail to average over.
    draft_oversample: int = 2

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ValueError(
                f"ImagingConfig.framing must be one of {FRAMINGS}, got {self.framing!r}"
            )
        if self.face not in FACES:
            raise ValueError(f"ImagingConfig.face must be one of {FACES}, got {self.face!r}")
        if self.size < 8:
            raise ValueError(f"ImagingConfig.size must be at least 8 pixels, got {self.size}")
        if self.min_side < 1:
            raise ValueError(f"ImagingConfig.min_side must be positive, got {self.min_side}")
        if self.max_aspect < 1.0:
            raise ValueError(f"ImagingConfig.max_aspect must be >= 1, got {self.max_aspect}")
        if self.facing_method not in FACING_METHODS:
            raise ValueError(
                f"ImagingConfig.facing_method must be one of {FACING_METHODS}, "
                f"got {self.facing_method!r}"
            )
        if not 0.0 <= self.facing_min_confidence <= 1.0:
            raise ValueError(
                "ImagingConfig.facing_min_confidence must be in [0, 1], "
                f"got {self.facing_min_confidence}"
            )

    @property
    def draft_size(self) -> tuple[int, int]:
        side = self.size * self.draft_oversample
        return side, side


@dataclass(frozen=True)
class NormalisedImage:
    """A photo ready for a shard."""

    #: ``size x size x 3`` uint8, RGB, HWC.
    pixels: np.ndarray
    #: Size of the photo after EXIF orientation, before any resizing.
    source_width: int
    source_height: int
    #: Facing of ``pixels`` (after any mirroring) and the estimator's confidence.
    facing: str
    facing_confidence: float
    #: Whether ``pixels`` is the mirror image of the source photo.
    mirrored: bool


@dataclass(frozen=True)
class Rejection:
    """Why a photo did not become a training image."""

    reason: str
    detail: str


# --------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Turn Pillow's ways of rejecting bytes into ``ImageDecodeError``; oversized images too."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns below its hard limit; make oversized images an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as exc:
        # Pillow signals bad data with any of these (UnidentifiedImageError is an OSError).
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc


def _open_photo(data: bytes) -> tuple[Image.Image, int, int, int | None]:
    """The image (header read, nothing decoded), its stored size and its EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"{width}x{height} exceeds {MAX_IMAGE_PIXELS} pixels")
    return img, width, height, img.getexif().get(_EXIF_ORIENTATION)


def decode_with_size(
    data: bytes, draft_size: tuple[int, int] | None = None
) -> tuple[Image.Image, int, int]:
    """Decode ``data`` to RGB with EXIF orientation applied; also return the full oriented size.

    ``draft_size`` lets JPEGs decode at a reduced scale that is still at least that large, which
    is several times faster for big photos; the returned width and height are those of the
    full-resolution photo, so size gates judge the source and not the draft.
    """
    with _decode_errors():
        img, width, height, orientation = _open_photo(data)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()  # decode now, so truncated files fail here and not later
        # exif_transpose copies even an upright image: ask the tag first (10% of a decode).
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return img, width, height


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to an RGB ``PIL.Image``, EXIF orientation applied.

    Raises ``ImageDecodeError`` when the bytes are not a complete image.
    """
    return decode_with_size(data, draft_size)[0]


#: Orientation tag value -> (transpose, flip rows, flip columns), applied in that order, that
#: turn stored pixels upright as ``ImageOps.exif_transpose`` does (2: mirror, 3: 180 degrees,
#: 4: flip, 5: transpose, 6: 90 degrees clockwise, 7: transverse, 8: 90 degrees anticlockwise).
_ORIENT: dict[int, tuple[bool, bool, bool]] = {
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


#: A part of an image: (left, upper, right, lower) in pixels, fractional.
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Draft:
    """A photo decoded small (see ``decode_draft``)."""

    #: H x W x 3 uint8 RGB, upright.
    pixels: np.ndarray
    #: The photo inside ``pixels`` (left, upper, right, lower; fractional): a JPEG draft's last
    #: row and column can be mostly the encoder's padding (a 530 px wide photo at 1/4 is
    #: 132.5 px wide in a 133 px draft).
    box: Box
    #: Size of the upright full-resolution photo.
    width: int
    height: int


def decode_draft(data: bytes, min_side: int) -> Draft:
    """Decode a photo small: JPEGs at the smallest DCT scale (1, 1/2, 1/4 or 1/8) that keeps
    both sides at least ``min_side`` pixels, other formats whole; EXIF orientation applied.

    Hashing and thumbnailing the ``Draft.box`` rather than the whole draft keeps a photo and
    its mirror image, or two copies of different sizes, aligned to a fraction of a draft pixel
    (the encoder's padding is on the right and bottom of the stored image, so a mirrored
    repost has it on the other side of the car). Colour JPEGs that end with their end marker
    decode through OpenCV (the same pixels as Pillow's draft, tested, faster in threads), and
    those with no EXIF, XMP or Adobe segment (most listing photos) skip Pillow altogether;
    anything else decodes through Pillow. Raises ``ImageDecodeError`` when the bytes are not
    a complete image.
    """
    rgb = None
    plain_size = _plain_jpeg_size(data) if data.endswith(_JPEG_END) else None
    if plain_size is not None and plain_size[0] * plain_size[1] <= MAX_IMAGE_PIXELS:
        (width, height), orientation = plain_size, None
        scale = _pillow_draft_scale(plain_size, (min_side, min_side))
        shape = (-(-height // scale), -(-width // scale))
        rgb = _decode_jpeg_opencv(data, scale, shape)
    if rgb is None:
        with _decode_errors():
            img, width, height, orientation = _open_photo(data)
            scale = 1
            if img.format == "JPEG":
                img.draft("RGB", (min_side, min_side))  # sets the scale; decodes nothing yet
                scale = _draft_scale(img.size, (width, height))
            if img.format == "JPEG" and img.mode == "RGB" and data.endswith(_JPEG_END):
                rgb = _decode_jpeg_opencv(data, scale, (img.height, img.width))
            if rgb is None:
                img.load()  # decode now, so truncated files fail here and not later
                rgb = np.asarray(_to_rgb(img))
    rows, columns = rgb.shape[:2]
    # Margins (left, top, right, bottom) of padding around the photo, stored orientation.
    margins = (0.0, 0.0, columns - width / scale, rows - height / scale)
    if orientation in _ORIENT:
        transpose, flip_rows, flip_columns = _ORIENT[orientation]
        left, top, right, bottom = margins
        if transpose:
            rgb = rgb.transpose(1, 0, 2)
            left, top, right, bottom = top, left, bottom, right
            width, height = height, width
        if flip_rows:
            rgb = rgb[::-1]
            top, bottom = bottom, top
        if flip_columns:
            rgb = rgb[:, ::-1]
            left, right = right, left
        margins = (left, top, right, bottom)
    rows, columns = rgb.shape[:2]
    left, top, right, bottom = margins
    box = (left, top, columns - right, rows - bottom)
    return Draft(np.ascontiguousarray(rgb), box, width, height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (listing cut-outs are shown on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- squaring

#: Rows (or columns) of the photo's edge averaged for the letterbox padding colour.
LETTERBOX_EDGE_PX = 2


def to_square(img: Image.Image, size: int, framing: str = "letterbox") -> np.ndarray:
    """Fit ``img`` into a ``size x size`` square; returns HxWx3 uint8.

    ``letterbox`` scales the long side to ``size`` and pads the short side. The padding of
    each side is the mean colour of the photo's adjacent edge (sky above, road below, ...),
    not white: a hard white bar against a grey street is a strong edge the GAN would
    spend capacity learning, while an edge-mean bar continues the background.
    ``crop`` scales the short side to ``size`` and cuts the centre square.

    The resize uses ``reducing_gap``, i.e. Pillow first shrinks by an integer factor with
    ``Image.reduce`` (a box filter, exact and fast) and finishes with LANCZOS, which gives
    the antialiased quality of a full LANCZOS at a fraction of the cost.
    """
    content = _fit(img, size, framing)
    return content if framing == "crop" else _letterbox(content, size)


def _fit(img: Image.Image, size: int, framing: str) -> np.ndarray:
    """The photo resized (and for ``crop`` cut) to fit the square, before any padding."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
    img = _to_rgb(img)
    width, height = img.size
    if framing == "crop":
        # Short side to `size`; the long side keeps at least `size` so the centre square fits.
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    else:
        # Long side to `size`; the short side keeps at least one pixel.
        scale = size / max(width, height)
        new_size = (
            min(size, max(1, round(width * scale))),
            min(size, max(1, round(height * scale))),
        )
    resized = img.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    arr = np.asarray(resized, dtype=np.uint8)
    if framing == "crop":
        top = (new_size[1] - size) // 2
        left = (new_size[0] - size) // 2
        return np.ascontiguousarray(arr[top : top + size, left : left + size])
    return arr


def _letterbox(arr: np.ndarray, size: int) -> np.ndarray:
    height, width = arr.shape[:2]
    out = np.empty((size, size, 3), dtype=np.uint8)
    top = (size - height) // 2
    left = (size - width) // 2
    edge = LETTERBOX_EDGE_PX
    if height < size:  # wide photo: bars above and below
        out[:top] = _mean_colour(arr[:edge])
        out[top + height :] = _mean_colour(arr[-edge:])
    if width < size:  # tall photo: bars left and right
        out[:, :left] = _mean_colour(arr[:, :edge])
        out[:, left + width :] = _mean_colour(arr[:, -edge:])
    out[top : top + height, left : left + width] = arr
    return out


def _mean_colour(strip: np.ndarray) -> np.ndarray:
    return np.rint(strip.reshape(-1, 3).mean(axis=0)).astype(np.uint8)


# --------------------------------------------------------------------------- normalise


def normalise(
    data: bytes, config: ImagingConfig, mirror_source: bool = False
) -> NormalisedImage | Rejection:
    """Decode, gate, square and facing-normalise one photo.

    ``mirror_source`` mirrors the photo before facing normalisation (for sites whose photos
    are known to be mirrored as a whole). ``mirrored`` in the result is the net effect.
    """
    try:
        img, source_width, source_height = decode_with_size(data, config.draft_size)
    except ImageDecodeError as exc:
        return Rejection("corrupt", str(exc))
    short, long = sorted((source_width, source_height))
    if short < config.min_side:
        return Rejection(
            "too_small", f"{source_width}x{source_height}: shorter side below {config.min_side}"
        )
    if long / short > config.max_aspect:
        return Rejection(
            "bad_aspect",
            f"{source_width}x{source_height}: aspect {long / short:.2f} above {config.max_aspect}",
        )
    content = _fit(img, config.size, config.framing)
    if mirror_source:
        content = content[:, ::-1]
    mirrored = mirror_source
    # Facing is judged on the photo itself: letterbox bars would pollute the border colours.
    facing, confidence = estimate_facing(content, config.facing_method)
    pixels = content if config.framing == "crop" else _letterbox(content, config.size)
    trusted = confidence >= config.facing_min_confidence
    if facing == "front_or_rear" and trusted and config.drop_front_rear:
        return Rejection("front_or_rear", f"front or rear view (confidence {confidence:.2f})")
    if trusted and config.face != "none" and facing in ("left", "right") and facing != config.face:
        pixels = pixels[:, ::-1]
        mirrored = not mirrored
        facing = config.face
    return NormalisedImage(
        pixels=np.ascontiguousarray(pixels),
        source_width=source_width,
        source_height=source_height,
        facing=facing,
        facing_confidence=confidence,
        mirrored=mirrored,
    )


def normalise_keyed(
    items: list[tuple[str, bytes, bool]], config: ImagingConfig
) -> list[tuple[str, NormalisedImage | Rejection]]:
    """``normalise`` over ``(key, data, mirror_source)`` items, keeping each key.

    The unit of work of a process-pool worker; it lives here, not in ``carmodels.shards``, so
    that workers import Pillow and numpy only (``shards`` imports torch, seconds per worker).
    """
    return [(key, normalise(data, config, mirror_source=mirror)) for key, data, mirror in items]


__all__ = [
    "FACES",
    "FRAMINGS",
    "REJECT_REASONS",
    "FacingHeuristic",
    "ImageDecodeError",
    "ImagingConfig",
    "NormalisedImage",
    "Rejection",
    "Box",
    "Draft",
    "decode_draft",
    "decode_image",
    "decode_with_size",
    "FACING_METHODS",
    "estimate_facing",
    "estimate_facing_silhouette",
    "normalise",
    "normalise_keyed",
    "to_square",
]
