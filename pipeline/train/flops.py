"""Model FLOPs per image for MAE training, and MFU against an accelerator's peak.

Counted from the config (not measured): a matmul of (n x k) by (k x m) costs 2nkm FLOPs; a training
step costs 3x the forward (backward = 2x forward). The encoder runs on the visible tokens only
(1 + L_keep), the decoder on all of them (1 + L); the patch embedding sees every patch (it runs
before the masking). Norms, softmax and the loss are left out (a few percent at most), as in
the usual 6N-style counts.
"""

from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.model.mae import num_kept
from pipeline.presets import resolve_preset

# Dense peak TFLOP/s per device (no sparsity) by precision; fp32 means TF32 tensor cores on NVIDIA.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},  # SXM; PCIe is lower: give train.peak_tflops
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one transformer block on `tokens` tokens: qkv + proj + MLP matmuls + attention."""
    linear = 2 * tokens * dim * dim * (3 + 1 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v
    return linear + attention


def mae_flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward) for one image under this model config."""
    p = resolve_preset(cfg.preset)
    patch = cfg.patch_size or p.patch_size
    L = (cfg.img_size // patch) ** 2
    keep = num_kept(L, cfg.mask_ratio)
    patch_dim = patch * patch * cfg.in_chans
    forward = (
        2 * L * patch_dim * p.embed_dim                                 # patch embedding, every patch
        + p.depth * block_flops(1 + keep, p.embed_dim)                  # encoder on visible tokens
        + 2 * (1 + keep) * p.embed_dim * p.decoder_embed_dim            # decoder_embed
        + p.decoder_depth * block_flops(1 + L, p.decoder_embed_dim)     # decoder on all tokens
        + 2 * (1 + L) * p.decoder_embed_dim * patch_dim                 # pixel prediction
    )
    return 3.0 * forward


def peak_tflops(flag: float, precision: str) -> float:
    """The peak given by train.peak_tflops, else the table's entry for this GPU; 0 when unknown (CPU)."""
    import torch

    if flag > 0:
        return flag
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return 0.0


def mfu(flops_per_image: float, images_per_s: float, world: int, peak: float) -> float | None:
    """Achieved model FLOP/s over the peak of all `world` devices; None without a known peak."""
    return flops_per_image * images_per_s / (peak * 1e12 * world) if peak > 0 else None
