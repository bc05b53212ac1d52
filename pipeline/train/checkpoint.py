"""Checkpoints: RUN/checkpoints/step-NNNNNNNN/ with DeepSpeed's state and client_state.json.

A checkpoint counts only once complete: every rank writes its DeepSpeed files, all ranks meet at a
barrier, then rank 0 writes client_state.json (the completion mark) and atomically points
RUN/checkpoints/latest at it. `--resume auto` only ever picks folders that hold client_state.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from data_shards import storage
from pipeline.config import config_from_dict

log = logging.getLogger(__name__)
CLIENT_STATE = "client_state.json"
TAG_RE = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tags of complete checkpoints under ckpt_dir (local or remote), oldest first."""
    fs, path = storage.filesystem(ckpt_dir)
    if not fs.exists(path):
        return []
    tags = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if TAG_RE.match(name) and fs.exists(f"{entry.rstrip('/')}/{CLIENT_STATE}"):
            tags.append(name)
    return sorted(tags)


def save(engine, run_dir: Path, step: int, client_state: dict, is_main: bool) -> str:
    """Collective: every rank must call it at the same step."""
    tag = tag_for(step)
    ckpt_dir = run_dir / "checkpoints"
    started = time.perf_counter()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.distributed.barrier()  # sync: every rank's shard files are on disk
    if is_main:
        storage.write_atomic(str(ckpt_dir / tag / CLIENT_STATE), json.dumps(client_state, indent=1).encode())
        storage.write_atomic(str(ckpt_dir / "latest"), tag.encode())
    torch.distributed.barrier()  # sync: nobody races ahead of the completion mark
    log.info("saved checkpoint %s in %.1fs", tag, time.perf_counter() - started)
    return tag


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete complete checkpoints beyond the newest keep_last, sparing multiples of keep_every.
    Incomplete folders older than the newest complete one are debris of a crash: removed too."""
    tags = complete_tags(str(ckpt_dir))
    keep = set(tags[-keep_last:])
    if keep_every:
        keep |= {t for t in tags if int(TAG_RE.match(t).group(1)) % keep_every == 0}
    removed = []
    newest = tags[-1] if tags else None
    for entry in sorted(ckpt_dir.iterdir()) if ckpt_dir.exists() else []:
        if not TAG_RE.match(entry.name) or entry.name in keep:
            continue
        if entry.name in tags or (newest and entry.name < newest):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def resolve_resume(resume: str, run_dir: Path, upload_url: str = "") -> str | None:
    """'' -> None; 'auto' -> newest complete local checkpoint, else newest in upload_url, else None;
    a path/URL of a checkpoint folder or of a run folder -> that checkpoint (the newest in the run)."""
    if not resume:
        return None
    if resume == "auto":
        for base in (str(run_dir / "checkpoints"), storage.join(upload_url, "checkpoints") if upload_url else ""):
            if base and (tags := complete_tags(base)):
                return storage.join(base, tags[-1]) if "://" in base else os.path.join(base, tags[-1])
        return None
    return find_checkpoint(resume)


def find_checkpoint(url: str) -> str:
    """A checkpoint folder, or a run folder / its checkpoints folder (-> the newest complete one)."""
    url = url.rstrip("/")
    fs, path = storage.filesystem(url)
    if fs.exists(f"{path}/{CLIENT_STATE}"):
        return url
    for base in (storage.join(url, "checkpoints"), url):
        if tags := complete_tags(base):
            return storage.join(base, tags[-1])
    raise FileNotFoundError(f"no complete checkpoint at {url} (a complete one holds {CLIENT_STATE}; "
                            "give RUN, RUN/checkpoints or RUN/checkpoints/step-NNNNNNNN)")


def read_client_state(ckpt: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(ckpt, CLIENT_STATE)))


def local_copy(ckpt: str, cache_root: Path | None = None) -> Path:
    """A remote checkpoint is downloaded once into a cache folder; a local one is used in place."""
    if not storage.is_remote(ckpt):
        return Path(ckpt.removeprefix("file://"))
    cache_root = cache_root or Path(os.environ.get("MAEPIPE_CACHE", Path.home() / ".cache" / "maepipe"))
    target = cache_root / "checkpoints" / ckpt.split("://", 1)[1].replace("/", "__")
    if not (target / CLIENT_STATE).exists():
        fs, path = storage.filesystem(ckpt)
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        storage.retry(lambda: fs.get(path, str(tmp), recursive=True), f"download {ckpt}")
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target


def load_pretrained(url: str):
    """-> (MAE with consolidated fp32 weights, RunConfig) from any checkpoint or run folder, local or remote.

    Works for every ZeRO stage and world size on one process (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.model import build_mae

    ckpt = local_copy(find_checkpoint(url))
    state = json.loads((ckpt / CLIENT_STATE).read_text())
    cfg = config_from_dict(state["config"])
    model = build_mae(cfg.model)
    if cfg.train.zero_stage == 0:  # no ZeRO partitions: the module's weights are whole in the model file
        weights = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    real_missing = [k for k in missing if not k.endswith("pos_embed")]  # buffers are rebuilt, not stored
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {url} does not match the model: missing {real_missing}, unexpected {unexpected}")
    return model.eval(), cfg

