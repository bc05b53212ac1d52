"""One optimizer step: grad_accum micro-batches through the engine, with reproducible mask noise."""

from __future__ import annotations

import hashlib
import math

import torch

from pipeline.train.distributed import DistInfo, any_true


class NonFiniteLoss(RuntimeError):
    pass


def mask_noise(seed: int, step: int, micro: int, rank: int, batch: int, num_patches: int) -> torch.Tensor:
    """(batch, num_patches) uniform noise from (seed, step, micro, rank): a resumed step masks the same patches."""
    key = hashlib.blake2b(f"{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
    return torch.rand(batch, num_patches, generator=gen)


def train_step(engine, batches, step: int, grad_accum: int, seed: int, dist: DistInfo,
               dtype: torch.dtype) -> tuple[float, float]:
    """-> (mean loss over the micro-batches on this rank, global grad norm)."""
    losses = []
    num_patches = engine.module.num_patches
    for micro in range(grad_accum):
        batch = next(batches)
        imgs = batch["image"].to(dist.device, dtype=dtype, non_blocking=True)
        noise = mask_noise(seed, step, micro, dist.rank, imgs.shape[0], num_patches).to(dist.device)
        loss, _, _ = engine(imgs, noise=noise)
        # sync point: every rank learns whether any rank's loss blew up, so all stop before the optimizer
        if any_true(not math.isfinite(loss.item()), dist.device):
            raise NonFiniteLoss(f"non-finite loss at step {step} (micro-batch {micro}): lower optim.base_lr, "
                                "enable optim.grad_clip, or use train.precision=bf16 instead of fp16")
        engine.backward(loss)
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            # without ZeRO, DeepSpeed keeps no norm for fp32; grads are already all-reduced here
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            plain_norm = torch.nn.utils.get_total_norm(grads).item()
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        losses.append(loss.item())
    norm = engine.get_global_grad_norm()
    if norm is None and engine.zero_optimization_stage() == 0:
        norm = plain_norm
    return sum(losses) / len(losses), float(norm) if norm is not None else float("nan")
