"""Build the DeepSpeed engine for an MAE from the run config (any ZeRO stage, fp32/bf16/fp16)."""

from __future__ import annotations

import torch

from pipeline.config import RunConfig
from pipeline.model import MAE
from pipeline.train.optim import build_optimizer


def deepspeed_config(cfg: RunConfig, world: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        # DeepSpeed computes the global grad norm (a logged metric) only while clipping is on:
        # with clipping off we ask for a bound no gradient reaches
        "gradient_clipping": cfg.optim.grad_clip or 1e30,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: MAE, cfg: RunConfig, world: int, extra: dict | None = None):
    """-> DeepSpeed engine; its .optimizer wraps our AdamW (ZeRO shards it across ranks)."""
    import deepspeed

    if cfg.train.activation_checkpointing:
        model.encoder.grad_checkpointing = True
    if cfg.train.compile:
        model = torch.compile(model)
    ds_config = deepspeed_config(cfg, world) | (extra or {})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                           config=ds_config)
    return engine
