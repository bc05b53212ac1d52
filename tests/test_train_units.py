"""Training pieces on one process with a real DeepSpeed engine (gloo, world 1): non-finite policy,
checkpoint completeness and retention, FLOPs count, timm export, object-store copy on SeaweedFS."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.model import build_mae
from pipeline.train import checkpoint, distributed
from pipeline.train.engine import build_engine
from pipeline.train.flops import mae_flops_per_image
from pipeline.train.loop import check_resumable
from pipeline.train.step import NonFiniteLoss, train_step

OVERRIDES = ["data.manifest=unused", "model.img_size=16", "model.patch_size=4", "model.in_chans=1",
             "data.mean=[0.5]", "data.std=[0.5]", "data.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def dist():
    """A one-process gloo group, created in this process; the environment is restored afterwards."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    info = distributed.init(60)
    yield info
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def make_engine(stage: int, tmp_path=None):
    cfg = load_config(None, OVERRIDES + [f"train.zero_stage={stage}"] + ([f"out_dir={tmp_path}"] if tmp_path else []))
    torch.manual_seed(0)
    return build_engine(build_mae(cfg.model), cfg, 1), cfg


def batches(n: int, bad: set[int] = frozenset()):
    """Real-valued image batches; the ones at positions in `bad` hold a NaN pixel."""
    gen = torch.Generator().manual_seed(1)
    for i in range(n):
        img = torch.rand(4, 1, 16, 16, generator=gen)
        if i in bad:
            img[0, 0, 0, 0] = float("nan")
        yield {"image": img, "id": torch.arange(4) + 4 * i}


def weights(engine) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    # ZeRO keeps the fp32 master copy (sharded under stage 3); without ZeRO the module's own tensors are it
    full = [safe_get_full_fp32_param(p) if engine.zero_optimization_stage() else p.detach().clone()
            for p in engine.module.parameters()]
    return torch.cat([t.flatten() for t in full])


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_nonfinite_loss_skips_or_stops_before_the_optimizer(dist, stage):
    engine, _ = make_engine(stage)
    it = batches(3, bad={1})
    before = weights(engine)
    first = train_step(engine, it, 0, 1, 0, dist, torch.float32, lr=1e-3)
    assert not first.skipped and not torch.equal(weights(engine), before)  # a good step moves the weights
    after_good = weights(engine)
    skipped = train_step(engine, it, 1, 1, 0, dist, torch.float32, lr=1e-3, may_skip=True)
    assert skipped.skipped and torch.equal(weights(engine), after_good)
    with pytest.raises(NonFiniteLoss, match="train.nonfinite_skips"):
        train_step(engine, batches(1, bad={0}), 2, 1, 0, dist, torch.float32, lr=1e-3, skips=1)
    assert torch.equal(weights(engine), after_good)
    assert not train_step(engine, it, 3, 1, 0, dist, torch.float32, lr=1e-3).skipped  # training goes on
    assert torch.isfinite(weights(engine)).all()


@pytest.fixture(scope="module")
def saved_run(dist, tmp_path_factory):
    """A run folder with complete checkpoints at steps 1..4 written by a real engine (ZeRO 2)."""
    root = tmp_path_factory.mktemp("ckpt")
    engine, cfg = make_engine(2, root)
    it = batches(4)
    for step in range(1, 5):
        train_step(engine, it, step - 1, 1, 0, dist, torch.float32, lr=1e-3)
        client = {"step": step, "epoch": 0, "data": {}, "world": 1, "config": cfg.to_dict(),
                  "config_hash": cfg.hash(("model",))}
        checkpoint.save(engine, cfg.run_dir, step, client, True)
    return cfg, engine


def test_interrupted_checkpoint_is_never_resumed(saved_run, tmp_path):
    cfg, _ = saved_run
    run_dir = tmp_path / "run"
    shutil.copytree(cfg.run_dir / "checkpoints", run_dir / "checkpoints")
    ckpts = run_dir / "checkpoints"
    # a save killed before its completion mark: every shard file there, no client_state.json, even `latest` set
    shutil.copytree(ckpts / "step-00000004", ckpts / "step-00000005")
    (ckpts / "step-00000005" / checkpoint.CLIENT_STATE).unlink()
    (ckpts / "latest").write_text("step-00000005")
    assert checkpoint.resolve_resume("auto", run_dir) == str(ckpts / "step-00000004")
    assert checkpoint.find_checkpoint(str(run_dir)).endswith("step-00000004")
    # retention: keep the newest 2 and multiples of 3; debris older than the newest complete one goes
    (ckpts / "step-00000003" / checkpoint.CLIENT_STATE).unlink()  # an old incomplete one
    removed = checkpoint.apply_retention(ckpts, keep_last=1, keep_every=2)
    assert removed == ["step-00000001", "step-00000003"]
    assert sorted(p.name for p in ckpts.glob("step-????????")) == ["step-00000002", "step-00000004", "step-00000005"]


def test_changed_model_is_refused_and_other_changes_allowed(saved_run, caplog):
    cfg, _ = saved_run
    state = checkpoint.read_client_state(str(cfg.run_dir / "checkpoints" / "step-00000004"))
    with pytest.raises(ConfigError, match=r"model.mask_ratio: 0.75 -> 0.6"):
        check_resumable(state, load_config(None, OVERRIDES + ["model.mask_ratio=0.6"]), "ckpt")
    with caplog.at_level("INFO"):
        check_resumable(state, load_config(None, OVERRIDES + [f"out_dir={cfg.out_dir}", "train.steps=50"]), "ckpt")
    assert "train.steps: 1000 -> 50" in caplog.text


def test_checkpoint_from_before_a_new_model_field_resumes(saved_run, caplog):
    """A field added to ModelConfig after a checkpoint was written takes its default there, so the
    checkpoint stays resumable (its stored hash was computed without the field)."""
    cfg, _ = saved_run
    state = checkpoint.read_client_state(str(cfg.run_dir / "checkpoints" / "step-00000004"))
    for name in ("decoder_depth", "decoder_embed_dim"):  # added in session 3
        del state["config"]["model"][name]
    state["config_hash"] = "written-by-an-older-maepipe"
    with caplog.at_level("INFO"):
        check_resumable(state, load_config(None, OVERRIDES + [f"out_dir={cfg.out_dir}"]), "ckpt")
    assert "decoder" not in caplog.text
    with pytest.raises(ConfigError, match=r"model.decoder_depth: 0 -> 8"):
        check_resumable(state, load_config(None, OVERRIDES + ["model.decoder_depth=8"]), "ckpt")


def test_flops_formula_matches_torch_flop_counter():
    cfg = ModelConfig(preset="tiny", img_size=32, patch_size=4, in_chans=1)
    model = build_mae(cfg)
    imgs = torch.rand(2, 1, 32, 32)
    # the math attention kernel runs as bmm's, which the counter sees (fused CPU kernels it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(imgs)[0].backward()
    measured = counter.get_total_flops() / 2
    assert abs(mae_flops_per_image(cfg) - measured) / measured < 0.01


def test_timm_export_loads_strictly_and_gives_our_features(saved_run, tmp_path):
    for op in ("nms", "qnms"):  # the torchvision wheel reachable here lacks its C++ ops; timm imports it
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # defined already (by a real torchvision, or an earlier test)
            pass
    timm = pytest.importorskip("timm")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.train.export import export

    cfg, _ = saved_run
    out = tmp_path / "enc.safetensors"
    meta = export(str(cfg.run_dir), out, "timm")
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["timm_model"] == "vit_tiny_patch16_224"
    model = timm.create_model(meta["timm_model"], pretrained=False, **json.loads(meta["timm_kwargs"])).eval()
    model.load_state_dict(load_file(str(out)), strict=True)
    ours, _ = checkpoint.load_pretrained(str(cfg.run_dir))
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours.encoder(x), rtol=1e-5, atol=1e-5)
    native = tmp_path / "native.safetensors"
    export(str(cfg.run_dir), native, "native")
    assert load_file(str(native)).keys() == load_file(str(out)).keys()


@pytest.mark.integration
def test_upload_to_object_storage_with_retention_and_remote_resume(saved_run, s3_bucket, tmp_path):
    cfg, _ = saved_run
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copytree(cfg.run_dir / "checkpoints", ckpts)
    uploader = checkpoint.Uploader(ckpts, f"{s3_bucket}/run", keep_last=2, keep_every=2)
    for step in range(1, 5):
        uploader.submit(checkpoint.tag_for(step))
    uploader.close()
    assert uploader.error is None
    assert checkpoint.complete_tags(f"{s3_bucket}/run/checkpoints") == ["step-00000002", "step-00000003", "step-00000004"]
    # a fresh machine: nothing local, `auto` finds the newest copy in object storage
    empty = tmp_path / "elsewhere"
    found = checkpoint.resolve_resume("auto", empty, f"{s3_bucket}/run")
    assert found == f"{s3_bucket}/run/checkpoints/step-00000004"
    os.environ["MAEPIPE_CACHE"] = str(tmp_path / "cache")
    try:
        remote_model, _ = checkpoint.load_pretrained(found)
    finally:
        del os.environ["MAEPIPE_CACHE"]
    local_model, _ = checkpoint.load_pretrained(str(ckpts / "step-00000004"))
    for (name, a), b in zip(remote_model.state_dict().items(), local_model.state_dict().values()):
        assert torch.equal(a, b), name
