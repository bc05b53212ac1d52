"""One evaluation table: the MAE encoder and its baselines under the same splits and protocols.

Rows are plain dicts (one per encoder x protocol) so they go straight into RUN/evals.jsonl:
    {"encoder": "mae", "protocol": "knn k=20 T=0.07 pool=mean", "top1": 0.853,
     "train_split": "train", "train_samples": 60000, "test_split": "val", "test_samples": 10000,
     "wall_s": 41.2, "checkpoint": "...", "step": 1200}
Baselines: raw pixels (the normalized image as a vector) and a randomly initialized encoder of the
same shape for kNN / linear; for fine-tuning, the same ViT trained from scratch for the same steps.
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline.config import RunConfig, apply_overrides
from pipeline.eval.features import FeatureCache, check_labelled, raw_pixels, split_loader
from pipeline.eval.finetune import finetune
from pipeline.eval.knn import knn_accuracy
from pipeline.eval.linear import LinearProbe, head_accuracy, probe_head, train_head
from pipeline.model import MAE, build_mae

log = logging.getLogger(__name__)
PROTOCOLS = ("knn", "linear", "finetune")


def random_encoder(cfg: RunConfig, seed: int = 0) -> torch.nn.Module:
    """An encoder of the run's shape with the MAE initialization and no training."""
    torch.manual_seed(seed)
    return build_mae(cfg.model).encoder


def _frozen(cfg: RunConfig, model: MAE | None, baselines: bool) -> dict[str, torch.nn.Module | None]:
    """name -> frozen encoder (None: raw pixels)."""
    out: dict[str, torch.nn.Module | None] = {}
    if model is not None:
        out["mae"] = model.encoder
    if baselines:
        out["raw_pixels"] = None
        out["random_init"] = random_encoder(cfg)
    return out


def evaluate(model: MAE | None, cfg: RunConfig, which: tuple[str, ...] = ("knn", "linear"),
             baselines: bool = True, seed: int = 0) -> list[dict]:
    """Run the protocols in `which` on the MAE encoder (if given) and, with `baselines`, on raw
    pixels and a random-init encoder (kNN, linear) or a from-scratch ViT (fine-tuning).

    The model comes back as it came (probing freezes it; fine-tuning works on a copy), so a
    training loop may call this between steps."""
    if model is None:
        return _evaluate(None, cfg, which, baselines, seed)
    grads, mode = [p.requires_grad for p in model.parameters()], model.training
    try:
        return _evaluate(model, cfg, which, baselines, seed)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(mode)


def _evaluate(model: MAE | None, cfg: RunConfig, which: tuple[str, ...], baselines: bool, seed: int) -> list[dict]:
    unknown = set(which) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; accepted: {', '.join(PROTOCOLS)}")
    ev = cfg.eval
    num_classes = check_labelled(split_loader(cfg, ev.split_test))
    cache = FeatureCache(cfg)
    rows = []

    def row(encoder: str, protocol: str, top1: float, n_train: int, n_test: int, wall: float, **extra) -> dict:
        r = {"encoder": encoder, "protocol": protocol, "top1": round(top1, 5), "train_split": ev.split_train,
             "train_samples": n_train, "test_split": ev.split_test, "test_samples": n_test,
             "wall_s": round(wall, 2), **extra}
        log.info("eval %-12s %-40s top1 %.4f (train %d, test %d, %.1fs)", encoder, protocol, top1, n_train, n_test, wall)
        rows.append(r)
        return r

    if {"knn", "linear"} & set(which):
        for name, encoder in _frozen(cfg, model, baselines).items():
            probe = LinearProbe(encoder, num_classes, ev.pool) if encoder is not None else None
            fn = probe.features if probe is not None else raw_pixels
            pool = f" pool={ev.pool}" if probe is not None else ""
            train = cache.get(name, fn, ev.split_train, ev.max_train_samples)
            test = cache.get(name, fn, ev.split_test)
            feature_s = train.seconds + test.seconds
            if "knn" in which:
                t0 = time.perf_counter()
                acc = knn_accuracy(train.x, train.y, test.x, test.y, num_classes, ev.knn_k, ev.knn_temperature)
                row(name, f"knn k={ev.knn_k} T={ev.knn_temperature}{pool}", acc, len(train), len(test),
                    time.perf_counter() - t0, feature_s=round(feature_s, 2))
            if "linear" in which:
                t0 = time.perf_counter()
                head = probe.head if probe is not None else probe_head(train.x.shape[1], num_classes)
                acc = head_accuracy(train_head(head, train, ev, seed), test)
                row(name, f"linear bn+fc {ev.linear_epochs}ep lr={ev.linear_lr}{pool}", acc, len(train), len(test),
                    time.perf_counter() - t0, feature_s=round(feature_s, 2))

    if "finetune" in which:
        runs = [("mae", model.encoder, None)] if model is not None else []
        if baselines:  # from scratch: layer decay only makes sense for a pretrained stack
            runs.append(("scratch", random_encoder(cfg), 1.0))
        for name, encoder, decay in runs:
            out = finetune(encoder, cfg, num_classes, layer_decay=decay, seed=seed)
            what = "full" if out["blocks"] == 0 else f"last{out['blocks']}"
            row(name, f"finetune {what} {out['steps']}steps ld={out['layer_decay']} dp={ev.finetune_drop_path} "
                f"pool={ev.pool}", out["top1"], out["train_samples"], out["test_samples"], out["wall_s"],
                steps=out["steps"], images_per_s=round(out["images_per_s"], 1))
    return rows


def evaluate_checkpoint(ckpt: str, which: tuple[str, ...], overrides: list[str] | tuple[str, ...] = (),
                        baselines: bool = False) -> list[dict]:
    """The rows `maepipe eval CKPT` appends: `evaluate` on a checkpoint folder (local or remote) with
    its saved config plus `overrides`, each row tagged with the checkpoint, its step and the data."""
    from pipeline.eval.runs import tag_rows
    from pipeline.train.checkpoint import load_pretrained, read_client_state

    model, cfg = load_pretrained(ckpt)
    cfg = apply_overrides(cfg, overrides)
    step = read_client_state(ckpt)["step"]
    log.info("evaluating %s (step %d) on %s: %s%s", ckpt, step, cfg.data.manifest, ", ".join(which),
             " + baselines" if baselines else "")
    return tag_rows(evaluate(model, cfg, tuple(which), baselines=baselines), ckpt, step, cfg.data.manifest)
