"""Linear probing as in the MAE paper (He et al. 2021, appendix A.2).

The encoder is frozen; a BatchNorm without affine parameters (it only whitens the features, which
MAE features need because their scales differ widely) feeds a linear classifier. Only the linear
layer learns. Features are computed once and cached, so each epoch is a pass over a (N, D) tensor.
The paper trains with LARS at batch 16384; at the small batches used here plain SGD with momentum
0.9 does the same job (LARS only matters for very large batches).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import EvalConfig
from pipeline.eval.features import Features


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False) -> Linear; the linear weight starts at N(0, 0.01) as in MAE."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class LinearProbe(nn.Module):
    """A frozen encoder under a probe head: only `head` has trainable parameters."""

    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.encoder, self.pool = encoder.requires_grad_(False).eval(), pool
        self.head = probe_head(encoder.embed_dim, num_classes)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: drop path off in every mode
        return self

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(imgs, self.pool)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs))


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def train_head(head: nn.Module, train: Features, cfg: EvalConfig, seed: int = 0) -> nn.Module:
    """Train the probe head on cached features: SGD momentum 0.9, wd 0, warmup 10% then cosine."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in head.parameters() if p.requires_grad]
    lr = cfg.linear_lr * cfg.linear_batch / 256
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / cfg.linear_batch)
    total = cfg.linear_epochs * per_epoch
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    step = 0
    for _ in range(cfg.linear_epochs):
        order = torch.randperm(len(train), generator=gen)
        for start in range(0, len(order), cfg.linear_batch):
            idx = order[start:start + cfg.linear_batch]
            if len(idx) < 2:  # BatchNorm needs two samples to have a batch variance
                continue
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr, warmup=total // 10)
            loss = loss_fn(head(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def head_accuracy(head: nn.Module, test: Features, chunk: int = 4096) -> float:
    head.eval()
    pred = torch.cat([head(test.x[i:i + chunk]).argmax(1) for i in range(0, len(test), chunk)])
    return (pred == test.y).float().mean().item()


def linear_probe_accuracy(train: Features, test: Features, num_classes: int, cfg: EvalConfig, seed: int = 0) -> float:
    head = train_head(probe_head(train.x.shape[1], num_classes), train, cfg, seed)
    return head_accuracy(head, test)
