"""Source image -> the bytes stored in a shard: copy when already fine, else resize and re-encode.

A JPEG within the size bound is copied byte for byte once its header parses and it ends with the
EOI marker (so a truncated file is caught here rather than in training; --decode-check decodes it
fully as well). Anything else is decoded, shrunk so that the
chosen side is at most `max_side`, and encoded as JPEG at `quality` (simplejpeg), or PNG when
lossless output is asked.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # refuse decompression bombs beyond this (a reject, not a crash)


class Rejected(ValueError):
    """A source sample that cannot go into a shard; the message is the reason written to rejected.jsonl."""


@dataclass(frozen=True)
class ImageOptions:
    max_side: int = 0
    """0 = keep the size."""
    resize_side: str = "longer"
    """Which side max_side bounds: 'longer' or 'shorter'."""
    quality: int = 90
    lossless: bool = False
    decode_check: bool = False
    """Fully decode JPEGs that are copied as they are (catches corrupt scan data, not only truncation)."""


def target_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int]:
    """(w, h) after the bound; the input size when it already fits."""
    side = max(width, height) if opts.resize_side == "longer" else min(width, height)
    if not opts.max_side or side <= opts.max_side:
        return width, height
    scale = opts.max_side / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_pil(data: bytes, draft_for: ImageOptions | None = None) -> Image.Image:
    """Open and fully decode; a JPEG may decode at a reduced DCT scale still at least the size draft_for asks."""
    try:
        img = Image.open(io.BytesIO(data))
        if draft_for is not None and img.format == "JPEG":
            img.draft("L" if img.mode in ("L", "1") else "RGB", target_size(img.width, img.height, draft_for))
        img.load()
    except Image.DecompressionBombError as err:
        raise Rejected(f"image too large: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise Rejected("unsupported format: not an image PIL can read") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise Rejected(f"corrupt image: {err}") from err
    return img


def _normalize_mode(img: Image.Image, lossless: bool) -> Image.Image:
    """Gray stays gray (PNG keeps 16-bit and alpha when lossless); everything else becomes RGB."""
    if lossless and img.mode in ("L", "LA", "RGB", "RGBA", "I;16"):
        return img
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return img.convert("L")
    return img.convert("RGB")


def _encode(img: Image.Image, opts: ImageOptions) -> tuple[str, bytes]:
    if opts.lossless:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    arr = np.asarray(img)
    if arr.ndim == 2:
        return "jpg", simplejpeg.encode_jpeg(arr[..., None], quality=opts.quality, colorspace="GRAY")
    return "jpg", simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality=opts.quality, colorspace="RGB")


def _from_image(img: Image.Image, opts: ImageOptions) -> tuple[str, bytes]:
    size = target_size(img.width, img.height, opts)
    img = _normalize_mode(img, opts.lossless)
    if size != (img.width, img.height):
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return _encode(img, opts)


def encode_image(data: bytes, opts: ImageOptions) -> tuple[str, bytes]:
    """Encoded source bytes -> (extension, bytes to store). Raises Rejected with the reason."""
    if not data:
        raise Rejected("empty file")
    jpeg_error = None
    if not opts.lossless and simplejpeg.is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            if target_size(width, height, opts) == (width, height):
                # a whole JPEG ends with the EOI marker; a truncated one does not. Files without it
                # at the end (odd but maybe valid) and --decode-check get a full decode to decide.
                if opts.decode_check or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
                    simplejpeg.decode_jpeg(data, colorspace="RGB")
                return "jpg", data
        except ValueError as err:
            jpeg_error = err  # CMYK/unusual JPEGs, or corrupt ones: PIL below decides which
    try:
        img = _decode_pil(data, draft_for=None if opts.lossless else opts)
    except Rejected as err:
        raise Rejected(f"corrupt JPEG: {jpeg_error}") if jpeg_error else err
    if opts.lossless and img.format == "PNG" and target_size(img.width, img.height, opts) == img.size \
            and img.mode in ("L", "LA", "RGB", "RGBA", "I;16"):
        return "png", data
    return _from_image(img, opts)


def encode_array(arr: np.ndarray, opts: ImageOptions) -> tuple[str, bytes]:
    """A decoded (H, W) or (H, W, C) uint8 array (idx sources) -> (extension, bytes)."""
    return _from_image(Image.fromarray(arr), opts)


def check_decodes(data: bytes) -> None:
    """Raise Rejected unless the bytes decode fully as an image (what `verify --decode` checks)."""
    if simplejpeg.is_jpeg(data):
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB")
            return
        except ValueError:
            pass
    _decode_pil(data)
