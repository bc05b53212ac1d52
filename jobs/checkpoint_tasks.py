"""The work the checkpoint manager hands to Ray, one plain function per kind of task.

They live here, not in jobs/checkpoint_manager.py, because Ray ships functions by module name and
the manager runs as `__main__`. Each one works on URLs (local paths or s3://...), so it may run on
any node of the cluster; each reuses the pipeline's own code (export, evaluate, upload, report).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from data_shards import storage

log = logging.getLogger(__name__)


def _logging() -> None:
    """Ray workers start without a logging config: INFO lines of the pipeline reach the job's log."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def consolidate(ckpt: str, out: str) -> dict:
    """fp32 encoder weights of one checkpoint (any ZeRO stage) as safetensors at `out`, through
    `maepipe export --format native`. The file appears whole or not at all."""
    from pipeline.train.export import export

    _logging()
    started = time.perf_counter()
    if storage.is_remote(out):  # object stores make a PUT visible only once complete
        with tempfile.TemporaryDirectory(prefix="consolidate-") as tmp:
            local = Path(tmp) / out.rsplit("/", 1)[-1]
            export(ckpt, local, "native")
            fs, path = storage.filesystem(out)
            storage.retry(lambda: fs.put_file(str(local), path), f"upload {out}")
    else:
        target = Path(out.removeprefix("file://"))
        part = target.with_name(f".{target.name}.part-{os.getpid()}")
        export(ckpt, part, "native")
        part.replace(target)
    seconds = time.perf_counter() - started
    log.info("consolidated %s -> %s in %.1fs", ckpt, out, seconds)
    return {"out": out, "seconds": round(seconds, 2)}


def evaluate_checkpoint(ckpt: str, which: list[str], overrides: list[str], baselines: bool) -> list[dict]:
    """The rows `maepipe eval CKPT` would append (pipeline.eval.evaluate.evaluate_checkpoint)."""
    from pipeline.eval.evaluate import evaluate_checkpoint as evaluate

    _logging()
    return evaluate(ckpt, tuple(which), overrides, baselines)


def upload_checkpoint(local: str, remote_dir: str) -> dict:
    """Copy a complete local checkpoint folder into remote_dir (files first, the completion mark
    last, then `latest`): what training's background uploader does, for runs that had it off."""
    from pipeline.train.checkpoint import upload

    _logging()
    started = time.perf_counter()
    tag = Path(local).name
    upload(Path(local), storage.join(remote_dir, tag))
    storage.write_atomic(storage.join(remote_dir, "latest"), tag.encode())
    return {"out": storage.join(remote_dir, tag), "seconds": round(time.perf_counter() - started, 2)}


def report(run: str, data: str) -> str:
    """RUN/report.md and report.html (curves, the evals table, reconstructions)."""
    from pipeline.eval.report import write_report

    _logging()
    return write_report(run, data)
