"""Kill -9 in the middle of a run, then --resume: only missing shards are built and the result
is the very dataset an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from data_shards.manifest import read_manifest
from tests.conftest import subprocess_env
from tests.shard_data import image_folder

ARGS = ["--workers", "1", "--shard-samples", "2", "--max-side", "40", "--seed", "5", "--no-progress"]


def shard_cmd(src, dest, *extra):
    return [sys.executable, "-m", "pipeline.cli", "shard", str(src), str(dest), *ARGS, *extra]


def comparable(dest) -> dict:
    body = json.loads((dest / "manifest.json").read_text())
    body.pop("created")
    body["source"] = os.path.basename(body["source"])
    return body


def test_resume_after_kill_9(tmp_path):
    src = image_folder(tmp_path / "src", per_class=40, size=(280, 380))
    dest = tmp_path / "killed"
    proc = subprocess.Popen(shard_cmd(src, dest), env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = dest / "_progress"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.is_dir() and len(list(progress.glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(progress.glob("*.json")))
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (dest / "manifest.json").exists() and 3 <= done_before < 60
    before = {p.name: p.stat().st_mtime_ns for p in (dest / "train").glob("*.tar")}

    # without --resume the unfinished run is refused, untouched
    refused = subprocess.run(shard_cmd(src, dest), env=subprocess_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(shard_cmd(src, dest, "--resume"), env=subprocess_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done_before} of 60 shards already done" in resumed.stderr
    finished = {p.name: p.stat().st_mtime_ns for p in (dest / "train").glob("*.tar")}
    kept = [name for name in before if before[name] == finished.get(name)]
    assert len(kept) >= done_before  # finished shards were not rewritten
    assert not progress.exists() and not list(dest.rglob("*.tmp-*"))

    clean = tmp_path / "clean"
    subprocess.run(shard_cmd(src, clean), env=subprocess_env(), check=True, capture_output=True)
    assert comparable(dest) == comparable(clean)
    for shard in read_manifest(str(clean)).shards("train"):
        assert (dest / shard.path).read_bytes() == (clean / shard.path).read_bytes()
