"""Which frozen features of a checkpoint carry the labels: kNN on each block, each pooling, raw pixels.

    python benchmarks/knn_probe.py runs/fmnist_60min [--data runs/fmnist-shards] [--train-samples 20000] [--test-samples 0]

One pass of the train split (capped) and the test split through the encoder keeps every block's
tokens; then the same weighted kNN as `maepipe eval` (cosine, k and T from the run's [eval]) runs on:
raw pixels, the final output mean-pooled / [cls] / both concatenated / all patch tokens flattened,
and each block's mean-pooled tokens. Each row also gives the kNN on features centred and scaled by
the train split's per-dimension statistics. Diagnostic only: the table of record is `maepipe eval`.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from pipeline.config import apply_overrides
from pipeline.eval.features import split_loader
from pipeline.eval.knn import knn_accuracy
from pipeline.train.checkpoint import find_checkpoint, load_pretrained


@torch.no_grad()
def features(encoder, loader) -> dict[str, torch.Tensor]:
    """name -> (N, D) for one split; encoder.forward unrolled to keep each block's tokens."""
    out: dict[str, list[torch.Tensor]] = {}
    for batch in loader.epoch_batches():
        imgs = batch["image"]
        x = encoder.patch_embed(imgs) + encoder.pos_embed[:, 1:, :]
        cls = (encoder.cls_token + encoder.pos_embed[:, :1, :]).expand(len(x), -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L, D)
        named = {"raw pixels": imgs.flatten(1)}
        for i, block in enumerate(encoder.blocks):
            x = block(x)
            named[f"block {i + 1} mean"] = F.layer_norm(x[:, 1:], x.shape[-1:]).mean(dim=1)
        final = encoder.norm(x)
        named |= {"output mean": final[:, 1:].mean(dim=1), "output cls": final[:, 0],
                  "output cls+mean": torch.cat([F.normalize(final[:, 0], dim=1),
                                                F.normalize(final[:, 1:].mean(dim=1), dim=1)], dim=1),
                  "output tokens (no pool)": final[:, 1:].flatten(1)}
        for name, value in named.items():
            out.setdefault(name, []).append(value.float())
        out.setdefault("label", []).append(batch["label"])
    return {name: torch.cat(values) for name, values in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="RUN or RUN/checkpoints/step-N, local or s3://")
    p.add_argument("--data", default="", help="labelled shard set (default: the run's data.manifest)")
    p.add_argument("--train-samples", type=int, default=20000, help="train split cap (0: all)")
    p.add_argument("--test-samples", type=int, default=0, help="test split cap (0: all)")
    args = p.parse_args()
    model, cfg = load_pretrained(find_checkpoint(args.checkpoint))
    cfg = apply_overrides(cfg, [f"data.manifest={args.data!r}"] if args.data else [])
    ev = cfg.eval
    train = features(model.encoder.eval(), split_loader(cfg, ev.split_train, args.train_samples))
    test = features(model.encoder, split_loader(cfg, ev.split_test, args.test_samples))
    classes = int(train["label"].max()) + 1
    print(f"kNN k={ev.knn_k} T={ev.knn_temperature}: train {len(train['label'])}, test {len(test['label'])}\n")
    print("| features | dim | kNN top-1 % | standardized |\n|---|---|---|---|")
    for name in (n for n in train if n != "label"):
        mean, std = train[name].mean(dim=0), train[name].std(dim=0) + 1e-6
        plain = knn_accuracy(train[name], train["label"], test[name], test["label"], classes, ev.knn_k, ev.knn_temperature)
        scaled = knn_accuracy((train[name] - mean) / std, train["label"], (test[name] - mean) / std, test["label"],
                              classes, ev.knn_k, ev.knn_temperature)
        print(f"| {name} | {train[name].shape[1]} | {100 * plain:.2f} | {100 * scaled:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
