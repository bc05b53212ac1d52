"""Checkpoints: RUN/checkpoints/step-NNNNNNNN/ with DeepSpeed's state and client_state.json.

A checkpoint counts only once complete: every rank writes its DeepSpeed files, all ranks meet at a
barrier, then rank 0 writes client_state.json (the completion mark) and atomically points
RUN/checkpoints/latest at it. `--resume auto` only ever picks folders that hold client_state.json,
so a job killed while writing leaves a folder that is ignored (and later swept by retention).

The object-store copy (checkpoint.upload_url) follows the same rule: files first, client_state.json
last, then `latest`; it runs in a background thread on rank 0 so training does not wait for it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import queue
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
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
    if not storage.retry(lambda: fs.exists(path), f"stat {ckpt_dir}"):
        return []
    fs.invalidate_cache(path)
    tags = []
    for entry in storage.retry(lambda: fs.ls(path, detail=False), f"list {ckpt_dir}"):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if TAG_RE.match(name) and fs.exists(f"{entry.rstrip('/')}/{CLIENT_STATE}"):
            tags.append(name)
    return sorted(tags)


# ---- RNG state: DeepSpeed saves none; a resumed step must draw the same numbers (e.g. drop_path)

def rng_state() -> str:
    """This process's python, numpy, torch (and CUDA) generator states, pickled as base64 text."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return base64.b64encode(pickle.dumps(state)).decode()


def set_rng_state(text: str) -> None:
    state = pickle.loads(base64.b64decode(text))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, client_state: dict, is_main: bool) -> tuple[str, float]:
    """Collective: every rank must call it at the same step. -> (tag, seconds)."""
    tag = tag_for(step)
    ckpt_dir = run_dir / "checkpoints"
    started = time.perf_counter()
    rngs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rngs, rng_state())  # sync: every rank's RNG, indexed by rank
    # the marker DeepSpeed's universal conversion requires (another world size can then load it)
    from deepspeed.checkpoint import constants

    info = {constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                           client_state={constants.UNIVERSAL_CHECKPOINT_INFO: info})
    torch.distributed.barrier()  # sync: every rank's shard files are on disk
    if is_main:
        state = client_state | {"rng": rngs}
        storage.write_atomic(str(ckpt_dir / tag / CLIENT_STATE), json.dumps(state, indent=1).encode())
        storage.write_atomic(str(ckpt_dir / "latest"), tag.encode())
    torch.distributed.barrier()  # sync: nobody races ahead of the completion mark
    seconds = time.perf_counter() - started
    log.info("saved checkpoint %s in %.2fs", tag, seconds)
    return tag, seconds


def retained(tags: list[str], keep_last: int, keep_every: int) -> set[str]:
    """The tags a retention policy keeps: the newest keep_last, and every multiple of keep_every."""
    keep = set(tags[-keep_last:])
    if keep_every:
        keep |= {t for t in tags if int(TAG_RE.match(t).group(1)) % keep_every == 0}
    return keep


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete complete checkpoints beyond the newest keep_last, sparing multiples of keep_every and
    `protect` (still uploading). Incomplete folders older than the newest complete one are debris
    of a crash: removed too. A newer incomplete folder may be one being written now: left alone."""
    tags = complete_tags(str(ckpt_dir))
    keep = retained(tags, keep_last, keep_every) | set(protect)
    removed = []
    newest = tags[-1] if tags else None
    for entry in sorted(ckpt_dir.iterdir()) if ckpt_dir.exists() else []:
        if not TAG_RE.match(entry.name) or entry.name in keep:
            continue
        if entry.name in tags or (newest and entry.name < newest):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


class Uploader:
    """Rank 0's background copy of complete checkpoints to `url`/checkpoints, with remote retention.

    submit(tag) returns at once; a daemon thread uploads (each file with retries), writes
    client_state.json last and then `latest`, and deletes remote tags the policy no longer keeps.
    close() waits for the queue to drain (called before the process exits)."""

    def __init__(self, local_dir: Path, url: str, keep_last: int, keep_every: int):
        self.local_dir, self.remote = local_dir, storage.join(url, "checkpoints")
        self.keep_last, self.keep_every = keep_last, keep_every
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.pending: set[str] = set()
        self.error: BaseException | None = None
        self.seconds: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self.thread.start()

    def submit(self, tag: str) -> None:
        self.pending.add(tag)
        self.queue.put(tag)

    def _run(self) -> None:
        while (tag := self.queue.get()) is not None:
            try:
                started = time.perf_counter()
                upload(self.local_dir / tag, storage.join(self.remote, tag))
                storage.write_atomic(storage.join(self.remote, "latest"), tag.encode())
                self.seconds[tag] = time.perf_counter() - started
                log.info("uploaded checkpoint %s to %s in %.2fs", tag, self.remote, self.seconds[tag])
                self._retention()
            except Exception as err:  # noqa: BLE001 - reported, training goes on with the local copy
                self.error = err
                log.error("upload of checkpoint %s to %s failed: %s", tag, self.remote, err)
            finally:
                self.pending.discard(tag)

    def _retention(self) -> None:
        prune(self.remote, self.keep_last, self.keep_every)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


def prune(ckpt_url: str, keep_last: int, keep_every: int) -> list[str]:
    """Retention on a checkpoints folder in object storage: delete the complete checkpoints the policy
    does not keep (incomplete ones are never touched). Two pruners may meet (training's uploader and
    the checkpoint manager): a tag the other one deleted first is not an error. -> deleted tags."""
    tags = complete_tags(ckpt_url)
    fs, _ = storage.filesystem(ckpt_url)
    deleted = []
    for tag in sorted(set(tags) - retained(tags, keep_last, keep_every)):
        _, path = storage.filesystem(storage.join(ckpt_url, tag))
        try:
            # the completion mark goes first: a half-deleted folder is never taken for complete
            storage.retry(lambda: fs.rm(f"{path}/{CLIENT_STATE}"), f"delete {tag} mark")
            storage.retry(lambda: fs.rm(path, recursive=True), f"delete {tag}")
        except FileNotFoundError:
            continue
        deleted.append(tag)
    return deleted


def upload(local: Path, url: str) -> None:
    """Copy a checkpoint folder file by file, the completion mark last."""
    fs, base = storage.filesystem(url)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != CLIENT_STATE)
    for p in files + [local / CLIENT_STATE]:
        rel = p.relative_to(local).as_posix()
        storage.retry(lambda: fs.put_file(str(p), f"{base}/{rel}"), f"upload {rel}")


def resolve_resume(resume: str, run_dir: Path, upload_url: str = "") -> str | None:
    """'' -> None; 'auto' -> newest complete checkpoint, local or in upload_url (the newer step wins),
    else None; a path/URL of a checkpoint folder or of a run folder -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = []
        for base in (str(run_dir / "checkpoints"), storage.join(upload_url, "checkpoints") if upload_url else ""):
            if base and (tags := complete_tags(base)):
                remote = "://" in base
                found.append((tags[-1], not remote, storage.join(base, tags[-1]) if remote else os.path.join(base, tags[-1])))
        return max(found)[2] if found else None  # same step in both: the local copy
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


def cache_root() -> Path:
    return Path(os.environ.get("MAEPIPE_CACHE", Path.home() / ".cache" / "maepipe"))


def local_copy(ckpt: str, root: Path | None = None) -> Path:
    """A remote checkpoint is downloaded once into a cache folder; a local one is used in place."""
    if not storage.is_remote(ckpt):
        return Path(ckpt.removeprefix("file://"))
    target = (root or cache_root()) / "checkpoints" / ckpt.split("://", 1)[1].replace("/", "__")
    if not (target / CLIENT_STATE).exists():
        fs, path = storage.filesystem(ckpt)
        tmp = target.with_name(f"{target.name}.part-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        storage.retry(lambda: fs.get(path.rstrip("/") + "/", str(tmp), recursive=True), f"download {ckpt}")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    return target


def universal_copy(local: Path) -> Path:
    """DeepSpeed's universal form of a checkpoint (loadable on any world size), converted once and cached
    beside it as CKPT/universal/TAG. Conversion runs in a child process (it forks worker pools)."""
    out = local / "universal" / local.name
    if (out / "zero").exists():
        return out
    tmp = local / "universal" / f".{local.name}.part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(local),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"converting {local} to a universal checkpoint failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if out.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    log.info("converted %s to a universal checkpoint in %.1fs", local, time.perf_counter() - started)
    return out


def load_pretrained(url: str):
    """-> (MAE with consolidated fp32 weights, RunConfig) from any checkpoint or run folder, local or remote.

    Works for every ZeRO stage and world size on one process (DeepSpeed's zero_to_fp32)."""
    from pipeline.model import build_mae

    ckpt = local_copy(find_checkpoint(url))
    state = json.loads((ckpt / CLIENT_STATE).read_text())
    cfg = config_from_dict(state["config"])
    model = build_mae(cfg.model)
    missing, unexpected = model.load_state_dict(fp32_weights(ckpt, cfg.train.zero_stage), strict=False)
    real_missing = [k for k in missing if not k.endswith("pos_embed")]  # buffers are rebuilt, not stored
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {url} does not match the model: missing {real_missing}, unexpected {unexpected}")
    return model.eval(), cfg


def fp32_weights(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 model weights of a local checkpoint folder (any ZeRO stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if zero_stage == 0:  # no ZeRO partitions: the module's weights are whole in the model file
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
