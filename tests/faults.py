"""A fault-injecting HTTP/1.1 proxy in front of a real S3 server (SeaweedFS), like toxiproxy.

Real clients (s3fs/aiobotocore) talk to the real server through it; per request, `plan` picks what
the network does: pass it, cut the response half way through its body, or answer 503 SlowDown.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable
from urllib.parse import urlparse

SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
            b"<Message>Please reduce your request rate.</Message></Error>")


def _read_head(sock: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head + b"\r\n\r\n"


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if ":" in line)}


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed mid-message")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_body(sock: socket.socket, buf: bytearray, headers: dict[str, str], no_body: bool) -> bytes:
    if no_body:
        return b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            line, _, rest = bytes(buf).partition(b"\r\n")
            buf[:] = rest
            size = int(line.split(b";")[0], 16)
            out += line + b"\r\n" + _read_exact(sock, buf, size + 2)
            if size == 0:
                return bytes(out)
    return _read_exact(sock, buf, int(headers.get("content-length", 0)))


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): what a dropped connection looks like to the client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FaultProxy:
    def __init__(self, upstream: str, plan: Callable[[str, str, dict], str]):
        url = urlparse(upstream)
        self.upstream = (url.hostname, url.port)
        self.plan = plan
        self.log: list[tuple[str, str, str]] = []  # (method, path, action) of every request seen
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        cbuf, ubuf = bytearray(), bytearray()
        try:
            while True:
                head = _read_head(client, cbuf)
                if head is None:
                    return
                method, path = head.split(b" ", 2)[:2]
                method, path = method.decode(), path.decode()
                headers = _headers(head)
                body = _read_body(client, cbuf, headers, no_body=False)
                with self._lock:
                    action = self.plan(method, path, headers)
                    self.log.append((method, path, action))
                if action == "slowdown":
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(SLOWDOWN) + SLOWDOWN)
                    return
                upstream.sendall(head + body)
                rhead = _read_head(upstream, ubuf)
                if rhead is None:
                    return
                status = int(rhead.split(b" ", 2)[1])
                rbody = _read_body(upstream, ubuf, _headers(rhead), method == "HEAD" or status in (204, 304))
                if action == "cut":  # headers promise the whole body; half of it arrives, then a reset
                    client.sendall(rhead + rbody[: len(rbody) // 2])
                    _reset(client)
                    return
                client.sendall(rhead + rbody)
        except (ConnectionError, OSError):
            return
        finally:
            upstream.close()
            try:
                client.close()
            except OSError:
                pass
