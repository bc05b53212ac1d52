"""Reconstruction pictures: original / masked input / reconstruction / reconstruction + visible.

With norm-pix targets the decoder predicts each patch normalized by that patch's own mean and
variance; to show pixels, each predicted patch is mapped back with the statistics of the same patch
of the original image (the inverse of MAE.target), then the data normalization is undone.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_shards import storage
from pipeline.model import MAE

COLUMNS = ("original", "masked", "reconstruction", "reconstruction + visible")
HEADER = ("original", "masked", "reconstruction", "rec. + visible")  # fits over a 96 px tile
LABEL_W, HEADER_H, MIN_SIDE = 70, 14, 96


def unnormalize_pred(model: MAE, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """pred (B, L, p*p*C) in target space -> patches in input space, using each patch's own stats."""
    if not model.norm_pix_loss:
        return pred
    patches = model.patchify(imgs)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6) ** 0.5 + mean


def mask_noise(batch: int, num_patches: int, seed: int) -> torch.Tensor:
    """Fixed masking noise, so every checkpoint of a series hides the same patches."""
    return torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruct(model: MAE, imgs: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """imgs (B, C, H, W) normalized -> the four views of COLUMNS, each (B, C, H, W) in input space."""
    model.eval()
    noise = mask_noise(imgs.shape[0], model.num_patches, seed)
    latent, mask, ids_restore = model.forward_encoder(imgs, model.mask_ratio, noise)
    pred = unnormalize_pred(model, imgs, model.forward_decoder(latent, ids_restore))
    rec = model.unpatchify(pred)
    hidden = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]))  # 1 where masked
    return {"original": imgs, "masked": imgs * (1 - hidden), "reconstruction": rec,
            "reconstruction + visible": imgs * (1 - hidden) + rec * hidden}


def to_uint8(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """(C, H, W) normalized -> (H, W, 3) uint8 (gray images repeated to RGB)."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    arr = ((x * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def _grid(rows: list[tuple[str, list[np.ndarray]]], header: list[str]) -> Image.Image:
    """Labelled rows of equal-size tiles; small images are enlarged (nearest) to >= MIN_SIDE px."""
    h, w = rows[0][1][0].shape[:2]
    scale = max(1, -(-MIN_SIDE // h))
    th, tw, pad = h * scale, w * scale, 4
    ncols = max(len(tiles) for _, tiles in rows)
    label_w = LABEL_W if any(label for label, _ in rows) else 0
    top = HEADER_H if header else 0
    canvas = Image.new("RGB", (label_w + ncols * (tw + pad) + pad, top + len(rows) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(header):
        draw.text((label_w + pad + c * (tw + pad), 1), text, fill="black")
    for r, (label, tiles) in enumerate(rows):
        y = top + pad + r * (th + pad)
        if label:
            draw.text((4, y + th // 2 - 5), label, fill="black")
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (label_w + pad + c * (tw + pad), y))
    return canvas


def _save(img: Image.Image, url: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_atomic(url, buf.getvalue())
    return url


def reconstruction_grid(model: MAE, images: torch.Tensor, path: str, mean: list[float], std: list[float],
                        seed: int = 0) -> str:
    """PNG at `path` (local or URL): one row per image, the four COLUMNS side by side."""
    views = reconstruct(model, images, seed)
    rows = [("", [to_uint8(views[col][i], mean, std) for col in COLUMNS]) for i in range(len(images))]
    return _save(_grid(rows, list(HEADER)), path)


def reconstruction_series(models: list[tuple[str, MAE]], images: torch.Tensor, path: str, mean: list[float],
                          std: list[float], seed: int = 0) -> str:
    """PNG at `path`: originals, the masked input, then one row of reconstructions per checkpoint
    (label, model), all with the same mask, so the rows show how reconstructions improve."""
    first = reconstruct(models[0][1], images, seed)
    rows = [("original", [to_uint8(x, mean, std) for x in first["original"]]),
            ("masked", [to_uint8(x, mean, std) for x in first["masked"]])]
    for label, model in models:
        rec = reconstruct(model, images, seed)["reconstruction"]
        rows.append((label, [to_uint8(x, mean, std) for x in rec]))
    return _save(_grid(rows, []), path)
