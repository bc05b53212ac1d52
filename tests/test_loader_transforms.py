"""Decode and MAE augmentation: formats, grayscale, reduced-scale decode, crop ranges, seeding."""

import io
import math

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pipeline.data.decode import DecodeError, decode_image
from pipeline.data.loader import channel_stats
from pipeline.data.transforms import CropSpec, crop_box, random_resized_crop, to_tensor


def photo(h=300, w=400, mode="RGB"):
    """A smooth real-looking gradient image (JPEG-friendly), in the given PIL mode."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def encode(img, fmt="JPEG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("L", "PNG")])
@pytest.mark.parametrize("channels", [1, 3])
def test_decode_any_mode_to_the_asked_channels(mode, fmt, channels):
    data = encode(photo(mode=mode), fmt)
    arr = decode_image(data, channels)
    assert arr.shape == (300, 400, channels) and arr.dtype == np.uint8
    ref = np.asarray(photo(mode=mode).convert("L" if channels == 1 else "RGB"), np.int16).reshape(arr.shape)
    assert np.abs(arr.astype(np.int16) - ref).mean() < 12  # same picture (JPEG/CMYK/palette losses aside)


def test_simplejpeg_and_pil_agree_on_jpeg():
    data = encode(photo(), quality=95)
    assert simplejpeg.is_jpeg(data)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert np.abs(decode_image(data, 3).astype(np.int16) - pil).mean() < 2


def test_large_jpeg_decodes_at_reduced_scale_but_never_below_min_side():
    data = encode(photo(1200, 1600))
    arr = decode_image(data, 3, min_side=280)
    assert 280 <= min(arr.shape[:2]) < 1200  # 1/2 scale (600) or 1/4 (300): cheaper, still big enough
    assert decode_image(encode(photo(200, 260)), 3, min_side=280).shape[:2] == (200, 260)
    assert CropSpec(224).min_decode_side == math.ceil(224 / math.sqrt(0.2))


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated" + bytes(20)])
def test_garbage_raises_decode_error(data):
    with pytest.raises(DecodeError):
        decode_image(data, 3)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = int(rng.integers(20, 600)), int(rng.integers(20, 600))
        top, left, ch, cw = crop_box(h, w, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        if (ch, cw) != (h, w) and (top, left) != ((h - ch) // 2, (w - cw) // 2):  # not the fallback
            assert 0.2 * 0.9 <= ch * cw / (h * w) <= 1.0 + 1e-9
            assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1


def test_augmentation_is_a_function_of_the_seed():
    arr = np.asarray(photo())
    spec = CropSpec(32)
    a = random_resized_crop(arr, spec, np.random.default_rng([1, 2, 3]))
    b = random_resized_crop(arr, spec, np.random.default_rng([1, 2, 3]))
    c = random_resized_crop(arr, spec, np.random.default_rng([1, 2, 4]))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    flips = [random_resized_crop(arr, CropSpec(8, (1.0, 1.0), (4 / 3, 4 / 3)), np.random.default_rng(i))
             for i in range(40)]  # whole image: a crop is either it or its mirror
    assert len({f.tobytes() for f in flips}) == 2


def test_normalize_and_channel_stats():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    mean, std = np.array([0.1, 0.2, 0.3], np.float32), np.array([0.5, 0.25, 2.0], np.float32)
    x = to_tensor(arr, mean, std)
    assert x.shape == (3, 2, 4) and x.is_contiguous()
    assert np.allclose(x.numpy(), ((arr / 255 - mean) / std).transpose(2, 0, 1), atol=1e-6)
    assert channel_stats([0.3, 0.4, 0.5], 1, "mean") == pytest.approx((0.4,))
    with pytest.raises(ValueError, match="data.std has 2 values"):
        channel_stats([1, 2], 3, "std")
