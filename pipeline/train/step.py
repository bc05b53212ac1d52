"""One optimizer step: grad_accum micro-batches through the engine, with reproducible mask noise.

Non-finite values. Every micro-batch's loss is checked on all ranks (one all-reduce) before its
backward. A bad loss either stops the run before any optimizer update (NonFiniteLoss), or, while
train.nonfinite_skips allows, skips the step: the bad micro-batch contributes a zero gradient
(a backward of 0 x the loss of a blank batch keeps DeepSpeed's accumulation and ZeRO hooks in
step) and the step runs at lr 0, so the weights do not move. A finite loss with a non-finite
gradient is caught before the optimizer by DeepSpeed itself under ZeRO 1/2 (overflow check: the
step is not applied) and by us under ZeRO 0; under ZeRO 3 in fp32 DeepSpeed has no such check, so
it is reported after the step.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from pipeline.train.distributed import DistInfo, any_true
from pipeline.train.optim import set_lr


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    """Mean loss over this rank's micro-batches (NaN when the step was skipped)."""
    grad_norm: float
    skipped: bool = False
    ids: list[list[int]] = field(default_factory=list)
    """Global sample ids of each micro-batch, in order."""


def mask_noise(seed: int, step: int, micro: int, rank: int, batch: int, num_patches: int) -> torch.Tensor:
    """(batch, num_patches) uniform noise from (seed, step, micro, rank): a resumed step masks the same patches."""
    key = hashlib.blake2b(f"{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
    return torch.rand(batch, num_patches, generator=gen)


def _nonfinite_message(step: int, micro: int, skips: int) -> str:
    return (f"non-finite loss at step {step} (micro-batch {micro}) after {skips} skipped step(s), the most "
            "train.nonfinite_skips allows: lower optim.base_lr, enable optim.grad_clip, use "
            "train.precision=bf16 instead of fp16, or raise train.nonfinite_skips")


def train_step(engine, batches, step: int, grad_accum: int, seed: int, dist: DistInfo, dtype: torch.dtype,
               lr: float, may_skip: bool = False, skips: int = 0) -> StepResult:
    """Run one optimizer step at learning rate `lr`. may_skip: a non-finite loss skips the step
    instead of raising (the caller counts skips against train.nonfinite_skips)."""
    losses, ids, bad = [], [], False
    num_patches = engine.module.num_patches
    set_lr(engine.optimizer, lr)
    for micro in range(grad_accum):
        batch = next(batches)
        ids.append([int(i) for i in batch["id"]])
        imgs = batch["image"].to(dist.device, dtype=dtype, non_blocking=True)
        noise = mask_noise(seed, step, micro, dist.rank, imgs.shape[0], num_patches).to(dist.device)
        loss, _, _ = engine(imgs, noise=noise)
        # sync point: every rank learns whether any rank's loss blew up, so all act alike before backward
        if any_true(not math.isfinite(loss.item()), dist.device):
            if not may_skip:
                raise NonFiniteLoss(_nonfinite_message(step, micro, skips))
            bad = True
            loss = engine(torch.zeros_like(imgs), noise=noise)[0] * 0.0  # zero gradient, same hooks
            set_lr(engine.optimizer, 0.0)
        engine.backward(loss)
        if micro == grad_accum - 1 and engine.zero_optimization_stage() == 0:
            # without ZeRO, DeepSpeed keeps no norm and no overflow check for fp32; grads are all-reduced here
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            plain_norm = torch.nn.utils.get_total_norm(grads).item()
            if not math.isfinite(plain_norm):
                for p in engine.module.parameters():
                    p.grad = None  # AdamW skips parameters without a gradient: no update, moments untouched
        engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
        losses.append(loss.item())
    norm = engine.get_global_grad_norm()
    if engine.zero_optimization_stage() == 0:
        norm = plain_norm
    norm = float(norm) if norm is not None else float("nan")
    grad_bad = not math.isfinite(norm) and not bad
    if grad_bad and engine.zero_optimization_stage() == 3:
        raise NonFiniteLoss(f"non-finite gradient norm at step {step}; ZeRO-3 in fp32 applies the step before "
                            "any check, so the weights are no longer usable: resume from the last checkpoint "
                            "with a lower optim.base_lr or with optim.grad_clip")
    if grad_bad and not may_skip:
        raise NonFiniteLoss(f"non-finite gradient at step {step} (the optimizer step was not applied) after "
                            f"{skips} skipped step(s): lower optim.base_lr, enable optim.grad_clip, or raise "
                            "train.nonfinite_skips")
    skipped = bad or grad_bad
    return StepResult(float("nan") if skipped else sum(losses) / len(losses), norm, skipped, ids)
