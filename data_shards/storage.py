"""Storage by URL: fsspec filesystems chosen by scheme, retries with backoff, atomic writes.

Clients are created lazily inside the process that uses them (s3fs is not fork-safe); endpoint
and credentials come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
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


def read_bytes(url: str, start: int | None = None, end: int | None = None, attempts: int = 8,
               on_retry: Callable[[BaseException], None] | None = None) -> bytes:
    """The object's bytes, or the byte range [start, end), with retries on transient errors."""
    fs, path = filesystem(url)

    def read() -> bytes:
        if start is None:
            return fs.cat_file(path)
        data = fs.cat_file(path, start=start, end=end)
        if len(data) != end - start:  # a short read is a broken connection, not the data
            raise ConnectionResetError(f"short read of {url} [{start}, {end}): {len(data)} bytes")
        return data

    return retry(read, f"read {url}", attempts=attempts, on_retry=on_retry)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), f"stat {url}")
