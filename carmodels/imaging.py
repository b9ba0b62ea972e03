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
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

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
    #: ``letterbox`` keeps the whole car and pads the short side; ``crop`` fills the square by
    #: cutting the long side (and often the car's bumpers) away.
    framing: str = "letterbox"
    #: Photos whose shorter side is below this many pixels are rejected as ``too_small``.
    min_side: int = 64
    #: Photos whose long/short side ratio exceeds this are rejected as ``bad_aspect`` (banners,
    #: panoramas, thumbnails strips).
    max_aspect: float = 3.5
    #: Direction every car should face after normalisation; ``none`` leaves photos as they are.
    face: str = "left"
    #: Reject photos whose car is seen from the front or rear.
    drop_front_rear: bool = False
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


#: JPEG end-of-image marker. libjpeg pads a truncated file with grey and only warns; a JPEG
#: that does not end with this marker (truncated, or with bytes after the image) is decoded by
#: Pillow, which reports truncation as an error.
_JPEG_END = b"\xff\xd9"
#: DCT scales (1/s) libjpeg can decode at.
_JPEG_SCALES = (1, 2, 4, 8)
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


#: Start-of-frame markers of the Huffman-coded JPEGs that Pillow and OpenCV both decode at a
#: DCT scale: baseline, extended sequential and progressive.
_JPEG_SOF_HUFFMAN = frozenset({0xC0, 0xC1, 0xC2})
#: Every start-of-frame marker (0xC4, 0xC8 and 0xCC are other segments).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers that stand alone, without a length: TEM and the restart markers.
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})
#: Segments after which Pillow would see more than the size: APP1 (EXIF or XMP, either of
#: which can carry an orientation) and APP14 (Adobe's colour transform).
_JPEG_PILLOW_SEGMENTS = frozenset({0xE1, 0xEE})


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a three-component, Huffman-coded JPEG with no EXIF, XMP or Adobe
    segment, from its markers; None for any other data, which takes Pillow's parse.

    For such a file Pillow's header parse learns nothing else that decoding here uses (its
    mode is RGB, there is no orientation), and walking the ~10 markers costs ~1/5 of opening
    it with Pillow: time that hashing threads otherwise spend holding the GIL.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    size = None
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            position += 2
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return size
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _JPEG_PILLOW_SEGMENTS or length < 2 or position + 2 + length > end:
            return None  # or a segment cut short
        if marker in _JPEG_SOF:
            if marker not in _JPEG_SOF_HUFFMAN or size is not None or length < 8:
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            if data[position + 9] != 3 or not width or not height:
                return None
            size = (width, height)
        position += 2 + length
    return None


def _pillow_draft_scale(size: tuple[int, int], requested: tuple[int, int]) -> int:
    """The s at which Pillow's ``JpegImageFile.draft`` decodes a JPEG of ``size`` asked for
    ``requested``: the largest DCT scale that fits in both sides' ratios."""
    ratio = min(size[0] // requested[0], size[1] // requested[1])
    return max((scale for scale in _JPEG_SCALES if scale <= ratio), default=1)


def _draft_scale(draft_size: tuple[int, int], full_size: tuple[int, int]) -> int:
    """The s of a JPEG draft decoded at 1/s: the draft has ceil(W / s) x ceil(H / s) pixels."""
    (width, height), (full_width, full_height) = draft_size, full_size
    for scale in _JPEG_SCALES:
        if -(-full_width // scale) == width and -(-full_height // scale) == height:
            return scale
    return 1


def _decode_jpeg_opencv(data: bytes, scale: int, shape: tuple[int, int]) -> np.ndarray | None:
    """RGB pixels of a JPEG decoded at 1/``scale`` by OpenCV; None when it cannot.

    The same libjpeg-turbo DCT scaling and colour conversion as Pillow's draft decoding, so
    the same pixels (tested), in one C call that releases the GIL: decoding threads then run
    in parallel, where Pillow's Python-level decoder loop serialises part of each decode.
    """
    import cv2  # lazy: ~0.1 s to import, and only this fast path needs it here

    flag = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }[scale]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None or bgr.shape[:2] != shape or bgr.ndim != 3:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


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


# --------------------------------------------------------------------------- facing


@dataclass(frozen=True)
class FacingHeuristic:
    """Constants of ``estimate_facing``'s silhouette heuristic (see its docstring)."""

    #: Thickness of the image border whose colours define "background".
    border_px: int = 4
    #: A pixel is foreground when its largest per-channel difference from the background
    #: colour exceeds max(min_contrast, spread_factor * border spread).
    min_contrast: int = 28
    spread_factor: float = 1.5
    #: Columns with fewer foreground pixels than this fraction of the height are background.
    min_column_fraction: float = 0.08
    #: Below this many car columns (fraction of the width) the silhouette is not trusted.
    min_car_width_fraction: float = 0.25
    #: Offset of the roof mass from the car's centre (fraction of the car's length, summed over
    #: the photo and its mirror image) that counts as full confidence.
    full_confidence_offset: float = 0.3
    #: A silhouette narrower than this (length / height) and this left-right symmetric is a
    #: front or rear view; side views are 2-3x as long as high, three-quarter views ~1.6-2.
    frontal_max_aspect: float = 1.5
    frontal_max_asymmetry: float = 0.12


FACING_HEURISTIC = FacingHeuristic()


#: How `estimate_facing` decides: the linear model of `carmodels.facing` (measured on
#: hand-labelled photos, see docs/BENCHMARKS.md) or the older silhouette heuristic.
FACING_METHODS: tuple[str, ...] = ("model", "silhouette")


def estimate_facing(arr: np.ndarray, method: str = "model") -> tuple[str, float]:
    """Which way the car in ``arr`` (HxWx3 uint8) points: ``left``, ``right`` or ``front_or_rear``.

    Returns the answer and a confidence in [0, 1]. Either method is exactly antisymmetric: the
    mirrored photo gets the opposite facing with the same confidence. ``model`` (the default)
    scored 0.93 facing accuracy on real side and three-quarter photos by cross-validation, the
    silhouette heuristic 0.6 (near chance) on the same photos; the heuristic is kept for clean
    silhouettes on plain backgrounds (drawn cars) and as the baseline.
    """
    if method == "silhouette":
        return estimate_facing_silhouette(arr)
    if method != "model":
        raise ValueError(f"Unknown facing method {method!r}; expected one of {FACING_METHODS}.")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"estimate_facing expects an HxWx3 array, got shape {arr.shape}")
    from carmodels.facing import load_model  # lazily: only the shard builder needs it

    facing, confidence, p_side = load_model().predict(arr)
    if p_side < 0.5:
        return "front_or_rear", float(1.0 - 2.0 * p_side)
    return facing, confidence


def estimate_facing_silhouette(
    arr: np.ndarray, heuristic: FacingHeuristic = FACING_HEURISTIC
) -> tuple[str, float]:
    """Which way the car in ``arr`` (HxWx3 uint8) points, from its silhouette.

    Heuristic (at chance on real listing photos, whose backgrounds are cluttered; good on
    clean silhouettes):

    1. Silhouette: each side of the image border gives a background colour (its median; sky
       above, road below) and the border's spread (75th percentile of its distances to the
       nearest of them); pixels clearly farther than that from every side colour are the car.
       Pass the photo's content, not letterbox bars (``normalise`` does).
    2. Upper profile: per column, the silhouette's height above the car's bottom row.
    3. Seen from the side, the cabin and roof sit toward the rear and the hood is long and low
       at the front, so the mass of the profile above its median height ("roof mass") lies
       behind the car's centre. Roof mass right of centre means the car faces left.
    4. A front or rear view is short (length / height small) and left-right symmetric.

    The direction score is computed as ``g(arr) - g(mirror(arr))``. Since floating-point
    subtraction is exactly antisymmetric, mirroring the input gives exactly the opposite
    facing with exactly the same confidence; the frontal test uses only quantities that are
    exactly mirror-invariant (integer counts, medians, percentiles).
    """
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"estimate_facing expects an HxWx3 array, got shape {arr.shape}")
    if min(arr.shape[:2]) < 4 * heuristic.border_px:
        return "front_or_rear", 0.0  # too small to tell a border from a car
    mask = _foreground_mask(arr, heuristic)
    mirrored_mask = mask[:, ::-1]
    profile = _upper_profile(mask, heuristic)
    if profile is None:
        return "front_or_rear", 0.0
    heights, length = profile
    tallest = int(heights.max())
    aspect = length / max(tallest, 1)
    # |h(x) - h(mirror x)| summed in integers: exact, and the same for the mirrored photo.
    asymmetry = int(np.abs(heights - heights[::-1]).sum()) / max(int(heights.sum()), 1)
    if aspect < heuristic.frontal_max_aspect and asymmetry < heuristic.frontal_max_asymmetry:
        confidence = 1.0 - asymmetry / heuristic.frontal_max_asymmetry
        return "front_or_rear", float(np.clip(confidence, 0.0, 1.0))

    score = _roof_offset(heights) - _roof_offset(_upper_profile(mirrored_mask, heuristic)[0])
    if score == 0.0:
        return "front_or_rear", 0.0
    confidence = float(min(1.0, abs(score) / heuristic.full_confidence_offset))
    return ("left" if score > 0 else "right"), confidence


def _foreground_mask(arr: np.ndarray, heuristic: FacingHeuristic) -> np.ndarray:
    pixels = arr.astype(np.int16)
    b = heuristic.border_px
    sides = [
        pixels[:b].reshape(-1, 3),  # usually sky or wall
        pixels[-b:].reshape(-1, 3),  # usually road or floor
        pixels[b:-b, :b].reshape(-1, 3),
        pixels[b:-b, -b:].reshape(-1, 3),
    ]
    # One background colour per side (median: robust to the car touching the border). Medians
    # and percentiles depend on the multiset of values only, not their order, and the minimum
    # over the sides does not care that mirroring swaps left and right, so the mask of a
    # mirrored photo is exactly the mirrored mask.
    backgrounds = np.stack([np.median(side, axis=0) for side in sides])

    def distance_to_background(values: np.ndarray) -> np.ndarray:
        per_side = [np.abs(values - colour).max(axis=-1) for colour in backgrounds]
        return np.minimum.reduce(per_side)

    border_distance = distance_to_background(np.concatenate(sides))
    threshold = max(
        heuristic.min_contrast, heuristic.spread_factor * np.percentile(border_distance, 75)
    )
    return distance_to_background(pixels) > threshold


def _upper_profile(mask: np.ndarray, heuristic: FacingHeuristic) -> tuple[np.ndarray, int] | None:
    """Silhouette height per car column (integers) and the car's length in columns."""
    height, width = mask.shape
    column_counts = mask.sum(axis=0)
    car_columns = np.flatnonzero(column_counts >= heuristic.min_column_fraction * height)
    if len(car_columns) < heuristic.min_car_width_fraction * width:
        return None
    first, last = int(car_columns[0]), int(car_columns[-1])
    car = mask[:, first : last + 1]
    rows = np.flatnonzero(car.sum(axis=1) >= heuristic.min_column_fraction * car.shape[1])
    if len(rows) == 0:
        return None
    bottom = int(rows[-1])
    has_pixels = car.any(axis=0)
    top = np.where(has_pixels, car.argmax(axis=0), bottom + 1)
    heights = np.clip(bottom + 1 - top, 0, None).astype(np.int64)
    return heights, last - first + 1


def _roof_offset(heights: np.ndarray) -> float:
    """Centroid of the profile above its median, minus the car's centre, in car lengths."""
    roof = np.clip(heights - np.median(heights), 0, None)
    total = roof.sum()
    if total <= 0 or len(heights) < 2:
        return 0.0
    position = np.linspace(0.0, 1.0, len(heights))
    return float((roof * position).sum() / total - 0.5)


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
