"""MAE augmentation: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, bicubic) + flip + normalize.

Randomness comes from a numpy Generator the caller seeds per sample (from seed, epoch and the
sample's position in the epoch), so a resumed run draws the very same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class CropSpec:
    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    @property
    def min_decode_side(self) -> int:
        """Shorter side a JPEG may be reduced to at decode time and still give crops >= size px."""
        return math.ceil(self.size / math.sqrt(self.scale[0]))


def crop_box(height: int, width: int, rng: np.random.Generator, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in `scale` and aspect ratio in `ratio`.

    Ten tries at the random shape; if none fits, the largest center crop within the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_tensor(arr: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32, (x/255 - mean) / std.

    In numpy on contiguous HWC, then one transpose copy: torch ops on the permuted (strided) view
    took ~10 ms per 224 px image here, more than decode and crop together.
    """
    x = (arr.astype(np.float32) / np.float32(255) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _pil(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr


def random_resized_crop(arr: np.ndarray, spec: CropSpec, rng: np.random.Generator) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) uint8: one random crop, resized bicubic, maybe flipped."""
    top, left, h, w = crop_box(arr.shape[0], arr.shape[1], rng, spec.scale, spec.ratio)
    img = _pil(arr).resize((spec.size, spec.size), Image.BICUBIC, box=(left, top, left + w, top + h))
    out = _array(img)
    if spec.hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def center_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Evaluation view: shorter side to `size` (bicubic), then the central size x size square."""
    h, w = arr.shape[:2]
    short = min(h, w)
    top, left = (h - short) // 2, (w - short) // 2
    if short == size and h == w:
        return arr
    img = _pil(arr).resize((size, size), Image.BICUBIC, box=(left, top, left + short, top + short))
    return _array(img)
