"""The MAE optimizer recipe: AdamW(0.9, 0.95), wd 0.05 off norms/biases/tokens, lr scaled by batch, warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import OptimConfig

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: 1-D params (norms, biases) and tokens/position embeddings go without."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: OptimConfig, effective_batch: int) -> float:
    return cfg.lr if cfg.lr > 0 else cfg.base_lr * effective_batch / 256


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return max(cfg.warmup_steps, int(cfg.warmup_fraction * total_steps))


def lr_at(step: int, total_steps: int, peak: float, warmup: int, min_lr: float) -> float:
    """Linear warmup from 0 over `warmup` steps, then half-cosine from peak to min_lr at total_steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # plain torch AdamW: DeepSpeed's fused/CPU Adam would JIT-compile C++ for minutes on first use
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=tuple(cfg.betas))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
