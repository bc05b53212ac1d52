"""Image bytes -> uint8 arrays (H, W, C): simplejpeg for JPEG, PIL for everything else.

Large JPEGs are decoded at a reduced scale (PIL draft mode / simplejpeg min_height) when the
target is much smaller, which is most of the decode cost saved for ImageNet-sized photos.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


class DecodeError(ValueError):
    """A sample whose image cannot be decoded (corrupt bytes or an unsupported format)."""


def image_key(sample: dict) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise DecodeError(f"sample {sample.get('__key__')!r} has no image (looked for {', '.join(IMAGE_EXTS)})")


def decode_image(data: bytes, channels: int, min_side: int = 0) -> np.ndarray:
    """-> (H, W, channels) uint8. min_side > 0 lets a big JPEG decode at 1/2, 1/4 or 1/8 scale
    as long as its shorter side stays >= min_side."""
    colorspace = "GRAY" if channels == 1 else "RGB"
    try:
        if simplejpeg.is_jpeg(data):
            try:
                if min_side:
                    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
                    short = min(h, w)
                    # simplejpeg picks the smallest DCT scale that keeps at least this size
                    return simplejpeg.decode_jpeg(data, colorspace=colorspace,
                                                  min_height=h * min_side // short, min_width=w * min_side // short)
                return simplejpeg.decode_jpeg(data, colorspace=colorspace)
            except ValueError:
                pass  # e.g. CMYK JPEGs: PIL below handles them
        with Image.open(io.BytesIO(data)) as img:
            if min_side and img.format == "JPEG":
                img.draft("L" if channels == 1 else "RGB", (min_side, min_side))
            arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DecodeError(f"cannot decode image: {err}") from err
    return arr[..., None] if arr.ndim == 2 else arr

