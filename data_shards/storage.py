"""Storage by URL: fsspec filesystems chosen by scheme, retries with backoff, atomic writes.

Clients are created lazily inside the process that uses them (s3fs is not fork-safe); endpoint
and credentials come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors worth another attempt: connection resets, timeouts, throttling and 5xx answers.
# botocore/aiohttp errors are matched by name so that local-only users need not import them.
TRANSIENT_NAMES = {
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "TimeoutError",
    "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ClientConnectorError",
    "ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "IncompleteRead",
    "ResponseStreamingError", "ProtocolError", "ServerTimeoutError",
}
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def is_transient(err: BaseException) -> bool:
    for e in _chain(err):
        if type(e).__name__ in TRANSIENT_NAMES:
            return True
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""
        if code in TRANSIENT_CODES:
            return True
        text = str(e)
        if any(f"({c})" in text or f"An error occurred ({c})" in text for c in TRANSIENT_CODES):
            return True
    return False


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def retry(fn: Callable[[], T], what: str, attempts: int = 8, base_delay: float = 0.2, max_delay: float = 10.0,
          on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Call fn until it succeeds; transient errors wait base*2^k (capped) with full jitter."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified just below
            if not is_transient(err) or attempt == attempts - 1:
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2**attempt))
            log.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(err).__name__, err,
                        attempt + 1, attempts - 1, delay)
            if on_retry is not None:
                on_retry(err)
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, path) for a URL; s3 reads its endpoint from AWS_ENDPOINT_URL(_S3) when set."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = {}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def write_atomic(url: str, data: bytes) -> None:
    """Write a whole object so that readers see the old one or the new one, never a part.

    Local files go through a temp file and rename; object stores make a PUT visible only once whole.
    """
    fs, path = filesystem(url)
    if is_remote(url):
        retry(lambda: fs.pipe_file(path, data), f"write {url}")
        return
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Retries inside the S3 client never reach `retry` above: botocore re-sends throttled, 5xx and dropped
# requests itself (its retry handler; the attempt number is in the call's context), and s3fs re-issues
# a call whose body broke off (the same operation with the same parameters again). Both are counted
# from the client's events into the ClientRetries of the read in progress. That read runs on fsspec's
# event-loop thread, but asyncio schedules it in a copy of the caller's context: a ContextVar reaches it.
@dataclass
class ClientRetries:
    count: int = 0
    calls: set = field(default_factory=set)  # (operation, parameters) issued in this attempt of the read


_CLIENT_RETRIES: contextvars.ContextVar[ClientRetries | None] = contextvars.ContextVar("client_retries", default=None)


def _on_call(model, params, **_) -> None:
    retries = _CLIENT_RETRIES.get()
    if retries is not None:
        call = (model.name, repr(sorted(params.items())))
        retries.count += call in retries.calls
        retries.calls.add(call)


def _on_call_done(context, **_) -> None:
    retries = _CLIENT_RETRIES.get()
    if retries is not None:
        retries.count += context.get("retries", {}).get("attempt", 1) - 1


def _watch_client(fs: fsspec.AbstractFileSystem) -> None:
    """Hook the counters above into this process' client of an s3fs filesystem (idempotent).

    Checked before every counted read, so a client that s3fs remakes (it does when its connection pool
    was closed) is hooked from the next read on.
    """
    events = fs.s3.meta.events  # s3fs makes the client on first use, in the process that uses it
    events.register("before-parameter-build.s3", _on_call, unique_id="maepipe-client-calls")
    events.register("after-call.s3", _on_call_done, unique_id="maepipe-client-attempts")
    events.register("after-call-error.s3", _on_call_done, unique_id="maepipe-client-attempts-error")


def read_bytes(url: str, start: int | None = None, end: int | None = None, attempts: int = 8,
               on_retry: Callable[[BaseException], None] | None = None,
               on_client_retries: Callable[[int], None] | None = None) -> bytes:
    """The object's bytes, or the byte range [start, end), with retries on transient errors.

    on_retry is called for each of our own retries; on_client_retries, once, with the number of
    requests the S3 client (botocore, s3fs) re-sent by itself meanwhile.
    """
    fs, path = filesystem(url)
    counted = on_client_retries is not None and url.split("://", 1)[0] in ("s3", "s3a")
    client = ClientRetries()

    def read() -> bytes:
        client.calls.clear()  # our own retry re-issues the same call: that one is counted by on_retry
        if start is None:
            return fs.cat_file(path)
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:  # a short read is a broken connection, not the data
            raise ConnectionResetError(f"short read of {url} [{start}, {end}): {len(data)} bytes")
        return data

    if not counted:
        return retry(read, f"read {url}", attempts=attempts, on_retry=on_retry)
    _watch_client(fs)
    token = _CLIENT_RETRIES.set(client)
    try:
        return retry(read, f"read {url}", attempts=attempts, on_retry=on_retry)
    finally:
        _CLIENT_RETRIES.reset(token)
        on_client_retries(client.count)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), f"stat {url}")
