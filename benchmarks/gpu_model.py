"""MAE training-step speed on one GPU: our model beside a timm-built MAE reference, in the same run.

    python benchmarks/gpu_model.py [--presets base large] [--batch 256] [--steps 8] [--json out.json]
    python benchmarks/gpu_model.py --smoke          # CPU, tiny shapes, seconds (what the fast test runs)

For each preset (224 px, patch 16, mask 0.75, synthetic images) and each variant it builds a fresh
model + AdamW, runs a few warm-up steps, then times `--steps` full steps (forward, backward,
optimizer) and reports the median step, images/s, peak GPU memory, achieved TFLOP/s from
pipeline/train/flops.py's count and MFU against the device's dense bf16 peak. Variants: fp32
(TF32 off, torch's default), bf16 autocast, bf16 with each scaled-dot-product-attention backend
forced (flash, efficient, math) via sdpa_kernel, and torch.compile'd bf16.

The peer is the MAE reference architecture written here from timm's `Block` and `PatchEmbed`, as
the official MAE code builds it; same sizes, masking, loss and optimizer. Before timing, the peer is
loaded with our weights and both losses are compared on the same images and mask noise, so the
ratio compares two implementations of one function. Needs only torch (+ timm for the peer) and rich.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.model import build_mae  # noqa: E402
from pipeline.model.mae import num_kept  # noqa: E402
from pipeline.model.pos_embed import sincos_2d  # noqa: E402
from pipeline.presets import resolve_preset  # noqa: E402
from pipeline.train.flops import mae_flops_per_image, peak_tflops  # noqa: E402

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH}
# compiled last: its compilation is the costly row, so a time budget cuts it before the cheap ones
VARIANTS = ("fp32", "bf16", *(f"bf16_sdpa_{b}" for b in SDPA_BACKENDS), "bf16_compiled")


def import_timm_vit():
    """timm's Block and PatchEmbed. timm imports torchvision at top level; a torchvision built for
    another torch (this project's CPU venv) fails with `operator torchvision::nms does not exist`:
    declaring the two operators it registers fake kernels for lets the import through."""
    try:
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]  # the half-imported packages, so the retry imports them afresh
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block
    return Block, PatchEmbed


class TimmMAE(nn.Module):
    """The MAE reference architecture from timm parts: encoder on the visible patches, decoder with
    mask tokens on all of them, MSE on the masked patches of per-patch-normalized pixels. Parameter
    names are ours without the `encoder.` prefix, so our weights load into it."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 mask_ratio: float, mlp_ratio: float = 4.0):
        super().__init__()
        Block, PatchEmbed = import_timm_vit()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size, self.mask_ratio = patch_size, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid)[None])
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * 0.02)
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_embed_dim, grid)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """-> loss, pred (B, L, p*p*C), mask (B, L) with 1 = masked, as our MAE.forward."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, L, D)
        B, L, D = x.shape
        keep = num_kept(L, self.mask_ratio if mask_ratio is None else mask_ratio)
        if noise is None:
            noise = torch.rand(B, L, device=imgs.device)
        ids_shuffle = noise.argsort(dim=1)  # smallest noise kept
        ids_restore = ids_shuffle.argsort(dim=1)
        x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=imgs.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, ids_restore)

        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))  # (B, 1 + keep, Dd)
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(B, L - keep, -1)], dim=1)
        tokens = tokens.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]

        p, C = self.patch_size, imgs.shape[1]
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        target = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, L, p * p * C)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask


def build_peer(cfg: ModelConfig) -> TimmMAE:
    p = resolve_preset(cfg.preset)
    return TimmMAE(cfg.img_size, cfg.patch_size or p.patch_size, cfg.in_chans, p.embed_dim, p.depth, p.num_heads,
                   p.decoder_embed_dim, p.decoder_depth, p.decoder_num_heads, cfg.mask_ratio)


BUILDERS = {"ours": build_mae, "peer": build_peer}


def check_same_function(cfg: ModelConfig, device: torch.device) -> dict:
    """Our weights in the peer, same images and noise, fp32: the two losses should agree to rounding."""
    torch.manual_seed(0)
    ours, peer = build_mae(cfg).to(device), build_peer(cfg).to(device)
    peer.load_state_dict({k.removeprefix("encoder."): v for k, v in ours.state_dict().items()}, strict=True)
    imgs = torch.randn(4, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(4, ours.num_patches, device=device)
    with torch.no_grad():
        a, b = ours(imgs, noise=noise)[0].item(), peer(imgs, noise=noise)[0].item()
    return {"preset": cfg.preset, "loss_ours": a, "loss_peer": b, "abs_diff": abs(a - b)}


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """Seconds of each timed step (CUDA events on a GPU), and the wall time of the first step
    (includes torch.compile's compilation where there is one)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    sync()
    if device.type == "cuda":
        times = [s.elapsed_time(e) / 1e3 for s, e in times]
    return times, first


def measure(model_name: str, variant: str, cfg: ModelConfig, batch: int, warmup: int, steps: int,
            device: torch.device, compile_backend: str) -> dict:
    """One (model, variant): fresh model and optimizer, synthetic images, timed full training steps.
    Peak memory counts from before the model is built: weights, grads, AdamW state and activations."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = BUILDERS[model_name](cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda")
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    forward = torch.compile(model, backend=compile_backend) if variant == "bf16_compiled" else model
    amp = variant != "fp32"
    sdpa = SDPA_BACKENDS[variant.rsplit("_", 1)[1]] if variant.startswith("bf16_sdpa_") else None

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward(imgs)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if sdpa is not None:
        with sdpa_kernel([sdpa]):
            times, first = time_steps(step, warmup, steps, device)
    else:
        times, first = time_steps(step, warmup, steps, device)
    median = statistics.median(times)
    out = {"step_ms": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
           "images_per_s": batch / median, "first_step_s": first,
           "peak_mem_gb": (torch.cuda.max_memory_allocated() - base_mem) / 2**30 if device.type == "cuda" else None}
    if variant == "bf16_compiled":
        torch._dynamo.reset()  # its caches hold the compiled model (and so its weights) otherwise
    return out


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    """Measured bf16 matrix-product rate on random data (the practical ceiling beside the datasheet's)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times, _ = time_steps(lambda: a @ b, 3, reps, device)
    return 2 * n**3 / statistics.median(times) / 1e12


def device_info(device: torch.device, peak_flag: float) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "memory_gb": props.total_memory / 2**30, "sms": props.multi_processor_count,
                 "capability": f"{props.major}.{props.minor}"}
    else:
        info |= {"name": "cpu", "threads": torch.get_num_threads()}
    info["peak_tflops_bf16"] = peak_tflops(peak_flag, "bf16")
    return info


def ratios(results: list[dict]) -> dict:
    """ours / peer images/s per preset and variant; each backend over math per preset and model."""
    ok = {(r["preset"], r["model"], r["variant"]): r["images_per_s"] for r in results if r["status"] == "ok"}
    vs_peer = [{"preset": p, "variant": v, "ours_over_peer": ok[p, "ours", v] / ok[p, "peer", v]}
               for (p, m, v) in ok if m == "ours" and (p, "peer", v) in ok]
    vs_math = [{"preset": p, "model": m, "backend": v.rsplit("_", 1)[1],
                "over_math": ok[p, m, v] / ok[p, m, "bf16_sdpa_math"]}
               for (p, m, v) in ok
               if v.startswith("bf16_sdpa_") and v != "bf16_sdpa_math" and (p, m, "bf16_sdpa_math") in ok]
    return {"ours_over_peer": vs_peer, "sdpa_over_math": vs_math}


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)  # a pipe gets 80 columns otherwise, and the table wraps
    d = report["device"]
    title = f"MAE train step on {d['name']} (torch {d['torch']}, batch {report['settings']['batch']})"
    if report["settings"]["smoke"]:
        title += ": CPU SMOKE, tiny shapes, not GPU figures"
    table = Table(title=title)
    for col in ("preset", "variant", "model", "img/s", "step ms", "min-max ms", "peak GB", "TFLOP/s", "MFU",
                "1st step s", "ours/peer"):
        table.add_column(col, justify="left" if col in ("preset", "variant", "model") else "right")
    peer_ratio = {(r["preset"], r["variant"]): r["ours_over_peer"] for r in report["ratios"]["ours_over_peer"]}
    for r in report["results"]:
        if r["status"] != "ok":
            table.add_row(r["preset"], r["variant"], r["model"], r["status"].split(":")[0])
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        table.add_row(r["preset"], r["variant"], r["model"], f"{r['images_per_s']:.1f}", f"{r['step_ms']:.1f}",
                      f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}", fmt(r["peak_mem_gb"], ".2f"),
                      fmt(r["tflops"], ".3g"), fmt(r["mfu"], ".1%"), f"{r['first_step_s']:.1f}",
                      fmt(peer_ratio.get((r["preset"], r["variant"])) if r["model"] == "ours" else None, ".2f"))
    console.print(table)
    for r in report["results"]:
        if r["status"] != "ok":
            console.print(f"{r['preset']} {r['variant']} {r['model']}: {r['status']}")
    for r in report["ratios"]["sdpa_over_math"]:
        console.print(f"{r['preset']} {r['model']}: sdpa {r['backend']} / math = {r['over_math']:.2f}")
    for c in report["checks"]:
        console.print(f"{c['preset']}: fp32 loss ours {c['loss_ours']:.6f} peer {c['loss_peer']:.6f} "
                      f"(|diff| {c['abs_diff']:.2e}, our weights in the peer)")
    if d.get("matmul_tflops"):
        console.print(f"bf16 matmul {report['settings']['matmul_n']}^3: {d['matmul_tflops']:.3g} TFLOP/s measured; "
                      f"datasheet bf16 peak {d['peak_tflops_bf16'] or '-'}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (micro preset, 32 px, patch 4), seconds")
    ap.add_argument("--presets", nargs="+", default=["base", "large"], help="model presets, in order")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (the first includes compilation)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak of one device for MFU; 0 looks the GPU name up in flops.PEAK_TFLOPS")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no measurement after this many seconds (0: no limit); the rest is marked skipped")
    ap.add_argument("--json", type=Path, default=None, help="write the report here (rewritten after each measurement)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.presets, args.batch = ["micro"], min(args.batch, 4)
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    shape = dict(img_size=32, patch_size=4) if args.smoke else dict(img_size=224)
    # smoke compiles with dynamo's eager backend: the tracing path is exercised without inductor's minutes on CPU
    compile_backend = "eager" if args.smoke else "inductor"
    matmul_n = 256 if args.smoke else 8192
    report = {"device": device_info(device, args.peak_tflops),
              "settings": {"smoke": args.smoke, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                           "mask_ratio": 0.75, "compile_backend": compile_backend, "matmul_n": matmul_n, **shape},
              "checks": [], "results": [], "ratios": {}}
    report["device"]["matmul_tflops"] = matmul_tflops(device, matmul_n, 5 if args.smoke else 20)
    peak = report["device"]["peak_tflops_bf16"]

    def save():
        report["ratios"] = ratios(report["results"])
        report["elapsed_s"] = time.perf_counter() - t_start
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    for preset in args.presets:
        cfg = ModelConfig(preset=preset, mask_ratio=0.75, in_chans=3, **shape)
        cfg.check()
        flops = mae_flops_per_image(cfg)
        report["checks"].append(check_same_function(cfg, device))
        for variant in args.variants:
            for model_name in BUILDERS:
                row = {"preset": preset, "variant": variant, "model": model_name, "flops_per_image": flops}
                elapsed = time.perf_counter() - t_start
                if args.budget_s and elapsed > args.budget_s:
                    row["status"] = f"skipped: {elapsed:.0f} s past the {args.budget_s:.0f} s budget"
                else:
                    try:
                        row |= measure(model_name, variant, cfg, args.batch, args.warmup, args.steps, device,
                                       compile_backend)
                        row["tflops"] = flops * row["images_per_s"] / 1e12
                        row["mfu"] = row["tflops"] / peak if peak else None
                        row["status"] = "ok"
                    except Exception as e:  # a failed row (no kernel for a forced backend, OOM) must not end the lease
                        first_line = (str(e).splitlines() or [""])[0]
                        row["status"] = f"error: {type(e).__name__}: {first_line[:200]}"
                    gc.collect()  # the row's model, optimizer and (on an error) traceback frames
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                report["results"].append(row)
                print(f"[{time.perf_counter() - t_start:6.1f} s] {preset} {variant} {model_name}: "
                      + (f"{row['images_per_s']:.1f} img/s" if row["status"] == "ok" else row["status"]), flush=True)
                save()
    save()
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
