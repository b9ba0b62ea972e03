"""Tests for carmodels.imaging: decoding, squaring, facing and the reject gates."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from carmodels import imaging
from carmodels.imaging import (
    Draft,
    ImageDecodeError,
    ImagingConfig,
    NormalisedImage,
    Rejection,
    _plain_jpeg_size,
    decode_draft,
    decode_image,
    decode_with_size,
    estimate_facing,
    normalise,
    to_square,
)

SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars-sample" / "images"
OPPOSITE = {"left": "right", "right": "left", "front_or_rear": "front_or_rear"}


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def side_view_car(width: int = 240, height: int = 140) -> Image.Image:
    """A car silhouette facing left: long low hood at the left, cabin toward the right."""
    img = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    body_top, body_bottom = int(height * 0.55), int(height * 0.8)
    draw.rectangle(
        [int(width * 0.08), body_top, int(width * 0.92), body_bottom], fill=(180, 20, 20)
    )
    cabin = [
        (int(width * 0.45), body_top),
        (int(width * 0.58), int(height * 0.25)),
        (int(width * 0.82), int(height * 0.25)),
        (int(width * 0.9), body_top),
    ]
    draw.polygon(cabin, fill=(150, 15, 15))
    for x in (0.22, 0.75):
        cx, cy, r = int(width * x), body_bottom, int(height * 0.1)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(20, 20, 20))
    return img


def front_view_car(size: int = 160) -> Image.Image:
    """A left-right symmetric car seen from the front."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle(
        [int(size * 0.2), int(size * 0.5), int(size * 0.8), int(size * 0.8)], fill=(20, 60, 160)
    )
    draw.polygon(
        [
            (int(size * 0.28), int(size * 0.5)),
            (int(size * 0.35), int(size * 0.28)),
            (int(size * 0.65), int(size * 0.28)),
            (int(size * 0.72), int(size * 0.5)),
        ],
        fill=(15, 45, 120),
    )
    return img


def test_decode_applies_exif_rotation():
    # Landscape pixels tagged "rotate 90 clockwise to display" (orientation 6) show as portrait.
    img = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(img).rectangle([0, 0, 49, 99], fill="red")  # red on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(img, exif=exif.tobytes()))
    assert decoded.size == (100, 200)
    top_middle = np.asarray(decoded)[10, 50]
    assert top_middle[0] > 200 and top_middle[1] < 80  # the red edge is now at the top


def test_decode_rejects_garbage_and_converts_to_rgb():
    with pytest.raises(ImageDecodeError):
        decode_image(b"definitely not an image")
    truncated = encode(side_view_car())[:400]
    with pytest.raises(ImageDecodeError):
        decode_image(truncated)
    rgba = Image.new("RGBA", (50, 40), (0, 0, 0, 0))
    decoded = decode_image(encode(rgba, "PNG"))
    assert decoded.mode == "RGB"
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 255, 255)  # transparency becomes white


def test_draft_decoding_shrinks_big_jpegs():
    big = side_view_car(1600, 1200)
    decoded = decode_image(encode(big), draft_size=(256, 256))
    assert 256 <= min(decoded.size) < 1200


def noisy_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Detail at every scale, so that any difference in decoding shows in the pixels."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 271), (530, 259), (1600, 1200), (97, 61), (64, 700)])
def test_decode_draft_gives_pillows_draft_pixels(size: tuple[int, int]):
    """OpenCV's fast path and Pillow (taken for a JPEG with bytes after its end marker) decode
    the same draft as Pillow's ``draft``, at its scale; the box is the photo inside it."""
    data = encode(noisy_photo(*size), quality=90)
    fast = decode_draft(data, 64)
    slow = decode_draft(data + b"\x00trailer", 64)
    assert (fast.width, fast.height) == size
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    pillow, *_ = decode_with_size(data, draft_size=(64, 64))
    np.testing.assert_array_equal(fast.pixels, np.asarray(pillow))
    scale = -(-size[0] // pillow.width)
    assert fast.box == (0.0, 0.0, size[0] / scale, size[1] / scale)
    if min(size) >= 128:  # a smaller scale would still have kept both sides >= 64
        assert min(fast.pixels.shape[:2]) >= 64 and scale > 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_draft_applies_exif_orientation_like_pillow(orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    # 530 x 259 at 1/4 is 132.5 x 64.75 px in a 133 x 65 draft: padding right and below.
    data = encode(noisy_photo(530, 259, seed=orientation), exif=exif.tobytes())
    draft = decode_draft(data, 64)
    upright = Image.open(io.BytesIO(data))
    upright.draft("RGB", (64, 64))
    upright = ImageOps.exif_transpose(upright)
    np.testing.assert_array_equal(draft.pixels, np.asarray(upright))
    assert (draft.width, draft.height) == ((259, 530) if orientation >= 5 else (530, 259))
    # The box follows the photo: where the padding ends up depends on the orientation.
    stored = np.zeros((65, 133), dtype=bool)
    stored[:64, :132] = True  # whole photo pixels; the 65th row / 133rd column are partial
    turned = Image.fromarray(stored)
    if orientation > 1:
        turned = turned.transpose(
            {
                2: Image.Transpose.FLIP_LEFT_RIGHT,
                3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90,
            }[orientation]
        )
    rows, columns = np.nonzero(np.asarray(turned))
    left, top, right, bottom = draft.box
    # The first whole pixel of the photo is the first one the box covers entirely.
    assert (math.ceil(left), math.ceil(top)) == (columns.min(), rows.min())
    assert right - left == pytest.approx(64.75 if orientation >= 5 else 132.5)
    assert bottom - top == pytest.approx(132.5 if orientation >= 5 else 64.75)


def test_plain_jpeg_size_reads_only_what_pillow_would_add_nothing_to():
    photo = noisy_photo(530, 259)
    assert _plain_jpeg_size(encode(photo)) == (530, 259)
    assert _plain_jpeg_size(encode(photo, progressive=True)) == (530, 259)
    assert _plain_jpeg_size(encode(photo, comment=b"listing 12")) == (530, 259)
    exif = Image.Exif()
    exif[0x0112] = 6
    for other in (
        encode(photo, exif=exif.tobytes()),  # an orientation to apply: Pillow reads it
        encode(photo, xmp=b"<x:xmpmeta/>"),  # XMP can carry an orientation too
        encode(photo.convert("L")),  # one component
        encode(photo.convert("CMYK")),  # four, and Adobe's colour transform
        encode(photo, "PNG"),
        encode(photo)[:150],  # the header ends before the scan starts
        *(encode(photo)[:cut] for cut in range(150, 170)),  # ... or inside the frame header
        b"\xff\xd8\xff",
    ):
        assert _plain_jpeg_size(other) is None


def assert_same_draft(draft: Draft, other: Draft) -> None:
    np.testing.assert_array_equal(draft.pixels, other.pixels)
    assert (draft.box, draft.width, draft.height) == (other.box, other.width, other.height)


@pytest.mark.parametrize(
    "size", [(640, 271), (1600, 1200), (150, 140), (97, 61), (64, 700), (700, 64)]
)
@pytest.mark.parametrize("progressive", [False, True])
def test_decode_draft_skipping_pillow_gives_the_same_draft(
    size: tuple[int, int], progressive: bool, monkeypatch
):
    data = encode(noisy_photo(*size), quality=90, progressive=progressive)
    plain = decode_draft(data, 64)
    monkeypatch.setattr(imaging, "_plain_jpeg_size", lambda data: None)
    through_pillow = decode_draft(data, 64)
    assert_same_draft(plain, through_pillow)


@pytest.mark.skipif(not SAMPLE_IMAGES.is_dir(), reason="needs ../shared/data/cars-sample")
def test_decode_draft_skipping_pillow_on_real_photos(monkeypatch):
    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:150]
    blobs = [path.read_bytes() for path in paths]
    assert all(_plain_jpeg_size(blob) is not None for blob in blobs)  # listing-style JPEGs
    plain = [decode_draft(blob, 64) for blob in blobs]
    monkeypatch.setattr(imaging, "_plain_jpeg_size", lambda data: None)
    for blob, draft in zip(blobs, plain, strict=True):
        assert_same_draft(draft, decode_draft(blob, 64))


def test_decode_draft_rejects_broken_bytes_and_reads_other_formats():
    whole = encode(noisy_photo(300, 200))
    for broken in (whole[: len(whole) // 2], b"not an image", whole[:400] + b"\xff\xd9"):
        with pytest.raises(ImageDecodeError):
            decode_draft(broken, 64)
    rgba = Image.new("RGBA", (50, 40), (0, 0, 0, 0))
    draft = decode_draft(encode(rgba, "PNG"), 64)
    assert draft.pixels.shape == (40, 50, 3) and (draft.width, draft.height) == (50, 40)
    assert draft.box == (0.0, 0.0, 50.0, 40.0)
    assert tuple(draft.pixels[0, 0]) == (255, 255, 255)  # transparency becomes white
    grey = decode_draft(encode(noisy_photo(300, 200).convert("L")), 64).pixels
    assert grey.shape == (200 // 2, 300 // 2, 3)  # greyscale JPEGs take Pillow's path, as RGB


@pytest.mark.parametrize("framing", ["letterbox", "crop"])
@pytest.mark.parametrize("size", [(300, 150), (120, 260), (64, 64)])
def test_to_square_shapes(framing: str, size: tuple[int, int]):
    arr = to_square(Image.new("RGB", size, (10, 200, 30)), 128, framing)
    assert arr.shape == (128, 128, 3) and arr.dtype == np.uint8


def test_letterbox_pads_with_edge_colour_and_keeps_whole_photo():
    img = Image.new("RGB", (256, 128), (0, 0, 255))
    ImageDraw.Draw(img).rectangle([0, 0, 255, 3], fill=(255, 0, 0))  # red top edge
    arr = to_square(img, 128, "letterbox")
    # Bars continue their edge (up to LANCZOS ringing at the 2px red line).
    np.testing.assert_allclose(arr[0, 64], (255, 0, 0), atol=12)  # top bar
    np.testing.assert_allclose(arr[-1, 64], (0, 0, 255), atol=12)  # bottom bar
    cropped = to_square(img, 128, "crop")
    np.testing.assert_allclose(cropped[-1, 64], (0, 0, 255), atol=12)
    assert not np.array_equal(arr, cropped)


def test_silhouette_facing_of_synthetic_side_and_front_views():
    side = np.asarray(side_view_car())
    facing, confidence = estimate_facing(side, "silhouette")
    assert facing == "left" and confidence > 0.3
    assert estimate_facing(side[:, ::-1], "silhouette") == ("right", confidence)
    assert estimate_facing(np.asarray(front_view_car()), "silhouette")[0] == "front_or_rear"


def _antisymmetry_inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8) for _ in range(5)]
    arrays += [np.asarray(side_view_car(w, h)) for w, h in ((240, 140), (180, 90), (128, 128))]
    # Cars drawn facing right too: without ../shared's photos, both directions still occur.
    arrays += [
        np.asarray(side_view_car(w, h).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        for w, h in ((200, 110), (160, 96))
    ]
    arrays.append(np.asarray(front_view_car()))
    if SAMPLE_IMAGES.is_dir():
        for path in sorted(SAMPLE_IMAGES.glob("*.jpg"))[:40]:
            arrays.append(to_square(decode_image(path.read_bytes()), 128, "crop"))
    return arrays


@pytest.mark.parametrize("method", ["model", "silhouette"])
def test_facing_is_exactly_antisymmetric(method: str):
    facings = set()
    for arr in _antisymmetry_inputs():
        facing, confidence = estimate_facing(arr, method)
        assert 0.0 <= confidence <= 1.0
        mirrored = estimate_facing(np.ascontiguousarray(arr[:, ::-1]), method)
        assert mirrored == (OPPOSITE[facing], confidence)
        facings.add(facing)
    assert {"left", "right"} <= facings


def test_normalise_reject_reasons():
    config = ImagingConfig()
    assert normalise(b"\x00garbage", config).reason == "corrupt"
    assert normalise(encode(side_view_car(60, 40)), config).reason == "too_small"
    assert normalise(encode(side_view_car(800, 100)), config).reason == "bad_aspect"
    front = normalise(
        encode(front_view_car()), ImagingConfig(drop_front_rear=True, facing_method="silhouette")
    )
    assert isinstance(front, Rejection) and front.reason == "front_or_rear"
    assert isinstance(normalise(encode(front_view_car()), config), NormalisedImage)


def test_normalise_turns_cars_to_the_configured_side():
    facing_right = encode(side_view_car().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    result = normalise(facing_right, ImagingConfig(face="left", facing_method="silhouette"))
    assert isinstance(result, NormalisedImage)
    assert (result.facing, result.mirrored) == ("left", True)
    assert result.pixels.shape == (128, 128, 3)
    assert (result.source_width, result.source_height) == (240, 140)

    kept = normalise(facing_right, ImagingConfig(face="none", facing_method="silhouette"))
    assert (kept.facing, kept.mirrored) == ("right", False)
    np.testing.assert_array_equal(kept.pixels[:, ::-1], result.pixels)

    # A site mirrored as a whole: the photo is flipped first, then already faces left.
    mirrored_site = normalise(
        facing_right, ImagingConfig(face="left", facing_method="silhouette"), mirror_source=True
    )
    assert (mirrored_site.facing, mirrored_site.mirrored) == ("left", True)


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="framing"):
        ImagingConfig(framing="stretch")
    with pytest.raises(ValueError, match="face"):
        ImagingConfig(face="up")
    with pytest.raises(ValueError, match="facing_method"):
        ImagingConfig(facing_method="guess")
