"""JPEG details the photo decoders use: marker parsing, DCT draft scales, OpenCV decoding.

:func:`carmodels.imaging.decode_draft` decodes listing photos small and fast with these:
``plain_jpeg_size`` reads a plain JPEG's size from its markers (skipping Pillow's header
parse), ``pillow_draft_scale`` and ``draft_scale`` give the DCT scale a draft decodes at, and
``decode_jpeg_opencv`` decodes at that scale in one GIL-releasing call.
"""

from __future__ import annotations

import numpy as np

#: JPEG end-of-image marker. libjpeg pads a truncated file with grey and only warns; a JPEG
#: that does not end with this marker (truncated, or with bytes after the image) is decoded by
#: Pillow, which reports truncation as an error.
JPEG_END = b"\xff\xd9"
#: DCT scales (1/s) libjpeg can decode at.
JPEG_SCALES = (1, 2, 4, 8)

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


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
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


def pillow_draft_scale(size: tuple[int, int], requested: tuple[int, int]) -> int:
    """The s at which Pillow's ``JpegImageFile.draft`` decodes a JPEG of ``size`` asked for
    ``requested``: the largest DCT scale that fits in both sides' ratios."""
    ratio = min(size[0] // requested[0], size[1] // requested[1])
    return max((scale for scale in JPEG_SCALES if scale <= ratio), default=1)


def draft_scale(draft_size: tuple[int, int], full_size: tuple[int, int]) -> int:
    """The s of a JPEG draft decoded at 1/s: the draft has ceil(W / s) x ceil(H / s) pixels."""
    (width, height), (full_width, full_height) = draft_size, full_size
    for scale in JPEG_SCALES:
        if -(-full_width // scale) == width and -(-full_height // scale) == height:
            return scale
    return 1


def decode_jpeg_opencv(data: bytes, scale: int, shape: tuple[int, int]) -> np.ndarray | None:
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


__all__ = [
    "JPEG_END",
    "JPEG_SCALES",
    "decode_jpeg_opencv",
    "draft_scale",
    "pillow_draft_scale",
    "plain_jpeg_size",
]
