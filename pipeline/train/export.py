"""`maepipe export CHECKPOINT OUT --format native|timm`: consolidated fp32 encoder weights as safetensors.

Both formats hold the encoder only (the decoder serves pretraining alone), gathered from any ZeRO
stage and world size. Our encoder's parameter names are timm's VisionTransformer names, so:
- native: the encoder's state dict, plus the run config in the metadata (rebuild with build_mae);
- timm: the same tensors (pos_embed as a plain tensor: timm holds it as a parameter), metadata
  naming the timm model and the create_model arguments under which strict loading succeeds:
  timm.create_model(NAME, num_classes=0, img_size=..., patch_size=..., in_chans=...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError

FORMATS = ("native", "timm")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write consolidated fp32 encoder weights (safetensors)",
                       description="Export the encoder of a checkpoint (any ZeRO stage, local or remote) as safetensors.")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest complete checkpoint); path or URL")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--format", choices=FORMATS, default="native",
                   help="native: our encoder + config; timm: keys for timm's vit_* (num_classes=0) with strict=True")
    p.set_defaults(func=run)


def timm_kwargs(cfg) -> dict:
    """create_model arguments under which the exported weights load strictly into timm."""
    from pipeline.model import resolve_preset

    preset = resolve_preset(cfg.model.preset)
    return {"num_classes": 0, "img_size": cfg.model.img_size,
            "patch_size": cfg.model.patch_size or preset.patch_size, "in_chans": cfg.model.in_chans}


def export(checkpoint: str, out: str | Path, fmt: str = "native") -> dict:
    """Write the safetensors file; returns its metadata."""
    from safetensors.torch import save_file

    from pipeline.model import resolve_preset
    from pipeline.train.checkpoint import load_pretrained

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: accepted values are {', '.join(FORMATS)}")
    model, cfg = load_pretrained(checkpoint)
    tensors = {k: v.detach().float().contiguous() for k, v in model.encoder.state_dict().items()}
    metadata = {"format": fmt, "source": str(checkpoint), "config": json.dumps(cfg.to_dict())}
    if fmt == "timm":
        metadata |= {"timm_model": resolve_preset(cfg.model.preset).timm_name,
                     "timm_kwargs": json.dumps(timm_kwargs(cfg))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return metadata


def run(args: argparse.Namespace) -> int:
    meta = export(args.checkpoint, args.out, args.format)
    print(f"wrote {args.out} ({meta['format']}" + (f": timm.create_model({meta['timm_model']!r}, "
                                                    f"**{meta['timm_kwargs']}))" if "timm_model" in meta else ")"))
    return 0


if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main(["export", *sys.argv[1:]]))
