"""A local S3-compatible server for tests and benchmarks: moto's server mode on 127.0.0.1 (a free
port), behind a tiny TCP proxy that can drop one connection mid-response.

    with s3_server() as s3:            # usable outside pytest too
        s3.url("run1")                 # "s3://lip-test/run1"
        s3.drop_after(20_000)          # the next response stream is cut after 20,000 bytes, once

While the context is open the standard AWS variables point at it (AWS_ENDPOINT_URL, keys,
region), so s3fs, boto3 and the loader find it with no arguments. `proxy=False` talks to moto
directly (benchmarks: the proxy's Python pumping costs throughput). As a fixture: `from s3_server
import s3` in a test module gives a module-scoped server.

`python tests/s3_server.py` serves until interrupted and prints the variables to export.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

if __name__ == "__main__":  # run as a script: the repository root holds tools/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.bench.bench_peers import LOOPBACK_ENV, loopback_s3



_REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/[^ ]*) HTTP/1\.1\r\n")


class DropProxy:
    """Forward TCP connections to `upstream`; once armed, cut the first connection whose response
    stream (server → client) passes `n` bytes since arming, at exactly that byte."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request passed on
        self._armed: int | None = None
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()

    def drop_after(self, n: int) -> None:
        with self._lock:
            self._armed = n

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            counter = {"armed_at": None, "sent": 0}
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, counter), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: dict | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if counter is None:  # client → server: note each request line
                    with self._lock:
                        self.requests += [(m.group(1).decode(), m.group(2).decode())
                                          for m in _REQUEST.finditer(data)]
                else:
                    with self._lock:
                        limit = self._armed
                        if limit is not None and counter["sent"] + len(data) > limit:
                            self._armed = None
                            self.dropped += 1
                            dst.sendall(data[: limit - counter["sent"]])
                            break
                        if limit is not None:
                            counter["sent"] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@dataclass
class S3Server:
    endpoint: str  # what AWS_ENDPOINT_URL is set to (the proxy unless proxy=False)
    direct: str  # moto itself
    bucket: str
    proxy: DropProxy | None = field(default=None, repr=False)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def drop_after(self, n: int) -> None:
        if self.proxy is None:
            raise RuntimeError("this server runs without its proxy (proxy=False)")
        self.proxy.drop_after(n)

    @property
    def dropped(self) -> int:
        return self.proxy.dropped if self.proxy else 0

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request through the proxy so far (all processes)."""
        return list(self.proxy.requests) if self.proxy else []


def upload_folder(folder: Path, url: str) -> int:
    """Upload every file under `folder` (what make-shards --out s3:// does); returns the count."""
    from pipelines.storage import remote as storage

    files = [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)]
    for p in files:
        storage.upload_file(str(p), storage.join(url, *p.relative_to(folder).parts))
    return len(files)


@contextlib.contextmanager
def s3_server(bucket: str = "lip-test", proxy: bool = True) -> Iterator[S3Server]:
    """Start moto on 127.0.0.1, create `bucket`, point the AWS variables at it (at the proxy in
    front of it with `proxy=True`); undo all on exit."""
    with loopback_s3(bucket) as direct:
        host, port = direct.rsplit("//", 1)[1].split(":")
        drop = DropProxy((host, int(port))) if proxy else None
        server = S3Server(f"http://127.0.0.1:{drop.port}" if drop else direct, direct, bucket, drop)
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint  # loopback_s3 restores it on exit
        try:
            yield server
        finally:
            if drop:
                drop.close()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


if __name__ == "__main__":
    import time

    with s3_server(proxy=False) as s:
        print(f"export AWS_ENDPOINT_URL={s.endpoint} " + " ".join(f"{k}={v}" for k, v in LOOPBACK_ENV.items()))
        print(f"bucket: s3://{s.bucket}  (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
