"""Streaming from s3:// on a real SeaweedFS server: worker processes, network faults, a server outage."""

import os
import threading

import pytest

from tests.faults import FaultProxy
from tests.helpers import write_small_dataset
from tests.loader_tools import SHARDS, flat, loaders, same_batches, take_batches

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return write_small_dataset(str(tmp_path_factory.mktemp("local")), {"train": SHARDS})


def test_s3_stream_with_worker_processes_matches_local_bitwise(s3_bucket, local):
    remote = write_small_dataset(f"{s3_bucket}/ds", {"train": SHARDS})
    for rank in range(2):  # s3fs clients are made inside each forked DataLoader worker
        got = take_batches(loaders(remote, 2, 2)[rank], 20)
        assert same_batches(got, take_batches(loaders(local, 2, 2)[rank], 20))
    resumed = loaders(remote, 2, 2)[1]
    take_batches(resumed, 6)
    state = resumed.state_dict()
    again = loaders(remote, 2, 2)[1]
    again.load_state_dict(state)
    assert same_batches(take_batches(again, 14), take_batches(loaders(local, 2, 2)[1], 20)[6:])


class Faults:
    """Cut the 2nd distinct shard range half way, 6 times running (more than s3fs' own 5 attempts, so
    our retry re-issues it); answer the 4th with 503 SlowDown twice; every 7th range is cut once."""

    def __init__(self):
        self.keys, self.hits = [], {}

    def __call__(self, method, path, headers):
        if method != "GET" or ".tar" not in path or ".idx" in path or "range" not in headers:
            return "pass"
        key = (path, headers["range"])
        if key not in self.hits:
            self.keys.append(key)
        self.hits[key] = n = self.hits.get(key, 0) + 1
        i = self.keys.index(key) + 1
        if i == 2 and n <= 6 or i % 7 == 0 and n == 1:
            return "cut"
        if i == 4 and n <= 2:
            return "slowdown"
        return "pass"


def test_cut_reads_and_slowdowns_are_retried_without_repeating_or_skipping(s3_bucket, local, monkeypatch):
    remote = write_small_dataset(f"{s3_bucket}/faulty", {"train": SHARDS})
    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"], Faults())
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the loader (and its forked workers) go through it
    try:
        loader = loaders(remote, 1, 2)[0]
        got = list(loader.epoch_batches())
        metrics = loader.take_metrics()
    finally:
        proxy.close()
    actions = [a for _, _, a in proxy.log]
    assert actions.count("cut") >= 7 and actions.count("slowdown") == 2
    # every failed request was re-sent once, by botocore, s3fs or our whole-range re-read (after s3fs gave
    # up on the range cut 6 times), and each of those re-sends is in the metric
    assert metrics["retries"] == actions.count("cut") + actions.count("slowdown")
    expect = list(loaders(local, 1, 2)[0].epoch_batches())
    assert same_batches(got, expect)  # every batch bitwise as without faults: no repeat, no gap


class ClientFaults:
    """First request of every 3rd distinct shard range: 503 SlowDown (botocore's retry handler re-sends it);
    of every 5th (not 15th): cut half way through the body (s3fs re-issues the GetObject). Nothing reaches
    our own retry wrapper."""

    def __init__(self):
        self.seen = []

    def __call__(self, method, path, headers):
        if method != "GET" or ".tar" not in path or ".idx" in path or "range" not in headers:
            return "pass"
        key = (path, headers["range"])
        if key in self.seen:
            return "pass"
        self.seen.append(key)
        i = len(self.seen)
        return "slowdown" if i % 3 == 0 else "cut" if i % 5 == 0 else "pass"


@pytest.mark.parametrize("workers", [0, 2])
def test_retries_inside_the_s3_client_are_counted(s3_bucket, local, monkeypatch, workers):
    remote = write_small_dataset(f"{s3_bucket}/client", {"train": SHARDS})
    proxy = FaultProxy(os.environ["AWS_ENDPOINT_URL"], ClientFaults())
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        loader = loaders(remote, 1, workers, window=8)[0]
        got = list(loader.epoch_batches())
        metrics = loader.take_metrics()
    finally:
        proxy.close()
    actions = [a for _, _, a in proxy.log]
    assert actions.count("slowdown") >= 3 and actions.count("cut") >= 1
    assert metrics["retries"] == actions.count("slowdown") + actions.count("cut")
    assert same_batches(got, list(loaders(local, 1, workers, window=8)[0].epoch_batches()))


def test_server_restart_mid_epoch_delivers_every_sample_once(tmp_path):
    """A dedicated server (the session one stays up) is stopped and restarted while the epoch streams."""
    from tests.servers import seaweedfs_env, start_seaweedfs

    sizes = [61, 53, 70, 47, 59, 66, 44]  # 400 samples: 100 batches of 4, none dropped
    server = start_seaweedfs(tmp_path / "weed")
    try:
        with seaweedfs_env(server):
            remote = write_small_dataset(f"{server.make_bucket('restart')}/ds", {"train": sizes})
            loader = loaders(remote, 1, 2, window=8)[0]
            batches, outage = [], None
            for batch in loader.epoch_batches():
                batches.append(batch)
                if len(batches) == 10:
                    # the server is down before the next batch is asked for; the workers are at most
                    # 8 batches + one window ahead, so the reads for batches 24..99 meet the outage
                    server.stop()
                    outage = threading.Thread(target=server.restart, kwargs={"down_seconds": 2.0})
                    outage.start()
            outage.join()
            ids = flat(batches)
            assert len(batches) == 100 and sorted(ids) == list(range(400))
            assert loader.take_metrics()["retries"] >= 1  # the outage's re-sent requests, whichever layer sent them
            assert "weed" in server.log_path.read_text() and server.process.poll() is None
    finally:
        server.stop()
