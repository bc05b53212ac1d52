"""Reading and appending the files of a run folder (local or any fsspec URL)."""

from __future__ import annotations

import json
import time

from data_shards import storage

EVALS = "evals.jsonl"


def run_of(checkpoint_url: str) -> str:
    """RUN for RUN/checkpoints/step-N (or RUN/checkpoints); a run folder is its own run."""
    url = checkpoint_url.rstrip("/")
    if "/checkpoints/" in url + "/":
        return url[: (url + "/").rindex("/checkpoints/")]
    return url


def read_jsonl(url: str) -> list[dict]:
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


def read_json(url: str) -> dict | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def append_jsonl(url: str, rows: list[dict]) -> None:
    """Whole-object rewrite (object stores have no append); readers never see a half line."""
    old = storage.read_bytes(url).decode() if storage.exists(url) else ""
    if old and not old.endswith("\n"):
        old += "\n"
    storage.write_atomic(url, (old + "".join(json.dumps(r) + "\n" for r in rows)).encode())


def tag_rows(rows: list[dict], checkpoint: str, step: int, data: str) -> list[dict]:
    """Mark evaluation rows with what they measured, as every writer of evals.jsonl does."""
    now = time.time()
    for r in rows:
        r.update(checkpoint=checkpoint, step=step, data=data, time=now)
    return rows
