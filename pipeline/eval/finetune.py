"""Fine-tuning: the encoder plus a linear head trained end to end (MAE paper, appendix A.1 recipe).

AdamW with layer-wise lr decay (block i of L gets lr x decay^(L + 1 - (i + 1)), the patch embedding
decay^(L + 1)), stochastic depth, label smoothing 0.1, warmup then cosine. With `blocks` = k > 0
only the last k blocks, the final norm and the head train (partial fine-tuning, MAE figure 9).
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.eval.features import split_loader
from pipeline.eval.linear import cosine_lr

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, pool: str = "mean"):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head keeps early gradients small
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(imgs, self.pool))


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last."""
    depth = len(encoder.blocks)
    for i, block in enumerate(encoder.blocks):
        block.drop_path = rate * i / max(1, depth - 1)


def layer_id(name: str, depth: int) -> int:
    """0 for the embedding (patch_embed, cls_token), i + 1 for blocks.i, depth + 1 for norm and head."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def freeze_for_partial(model: Classifier, blocks: int) -> None:
    """Keep only the last `blocks` blocks, the final norm and the head trainable (blocks=0: everything)."""
    if blocks <= 0:
        return
    depth = len(model.encoder.blocks)
    if blocks > depth:
        raise ValueError(f"eval.finetune_blocks={blocks} but the encoder has {depth} blocks: pick 0..{depth}")
    for name, p in model.named_parameters():
        p.requires_grad_(layer_id(name, depth) > depth - blocks)


def param_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """One group per (layer, decay or not); norms, biases and tokens get no weight decay."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        decay = p.ndim > 1 and not name.endswith(("cls_token", "pos_embed"))
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid), "names": []})
        group["params"].append(p)
        group["names"].append(name)
    for g in groups.values():
        g["lr"] = lr * g["lr_scale"]
    return list(groups.values())


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = seen = 0
    for batch in loader.epoch_batches():
        correct += (model(batch["image"]).argmax(1) == batch["label"]).sum().item()
        seen += len(batch["label"])
    return correct / max(1, seen)


def finetune(encoder: nn.Module, cfg: RunConfig, num_classes: int, blocks: int | None = None,
             layer_decay: float | None = None, seed: int = 0) -> dict:
    """Fine-tune a copy of `encoder` on cfg.eval.split_train; -> {'top1', 'steps', 'train_samples', ...}."""
    ev = cfg.eval
    blocks = ev.finetune_blocks if blocks is None else blocks
    layer_decay = ev.layer_decay if layer_decay is None else layer_decay
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(encoder).requires_grad_(True), num_classes, ev.pool)
    set_drop_path(model.encoder, ev.finetune_drop_path)
    freeze_for_partial(model, blocks)
    lr = ev.finetune_lr * ev.batch_size / 256
    opt = torch.optim.AdamW(param_groups(model, lr, ev.finetune_weight_decay, layer_decay), lr=lr, betas=(0.9, 0.999))
    train = split_loader(cfg, ev.split_train, ev.finetune_samples, augment=True, shuffle=True, seed=seed)
    steps = ev.finetune_epochs * train.batches_per_epoch()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start, model_time = time.perf_counter(), 0.0
    model.train()
    for step, batch in zip(range(steps), train):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=steps // 10) * g["lr_scale"]
        loss = loss_fn(model(batch["image"]), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model_time += time.perf_counter() - t0
        if step % 50 == 0 or step == steps - 1:
            log.info("finetune step %d/%d loss %.4f", step + 1, steps, loss.item())
    test = split_loader(cfg, ev.split_test, 0)
    top1 = accuracy(model, test)
    return {"top1": top1, "steps": steps, "train_samples": train.num_samples, "test_samples": test.num_samples,
            "blocks": blocks, "layer_decay": layer_decay, "wall_s": time.perf_counter() - start,
            "images_per_s": steps * ev.batch_size / max(model_time, 1e-9)}
