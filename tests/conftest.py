"""Shared fixtures: real servers (started once per session), run-dir helpers, subprocess env."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: this checkout first on PYTHONPATH, the venv first on PATH, quiet Ray."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # the venv's bin first: `ray`, `python` (a Ray job's entrypoint), `weed` resolve to this venv's even
    # when pytest runs by the venv python's full path without activation
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]).rstrip(os.pathsep)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole test session; AWS_* set in os.environ."""
    from tests.servers import seaweedfs_env, start_seaweedfs

    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    with seaweedfs_env(server):
        yield server
    server.stop()


@pytest.fixture
def s3_bucket(seaweedfs):
    """A fresh bucket URL (s3://name) on the session's SeaweedFS server."""
    return seaweedfs.make_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def ray_head():
    """A real `ray start --head` cluster on 127.0.0.1 (free ports, own temp dir) for job submission."""
    from tests.servers import start_ray_head

    head = start_ray_head(subprocess_env())
    yield head
    head.stop()


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
