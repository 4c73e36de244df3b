"""Real object servers on 127.0.0.1 for the remote-storage tests, started and stopped by them.

* :func:`http_server`: a threaded HTTP server over a folder that answers ``HEAD`` and range
  ``GET`` requests (``Accept-Ranges``, ``206 Partial Content``, an ``ETag``), as object stores
  and static file servers do; the standard library's handler ignores ``Range``.
* :func:`s3_server`: moto's S3 API in server mode (``ThreadedMotoServer``), a real HTTP S3
  endpoint that ``s3fs`` talks to through ``AWS_ENDPOINT_URL`` with dummy credentials.
"""
from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import threading
import urllib.request
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with byte ranges (one range per request, as fsspec asks)."""

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def send_head(self):  # type: ignore[override]
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "not found")
            return None
        data = path.read_bytes()
        start, stop = 0, len(data)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match:
            lo, hi = match.groups()
            start = int(lo) if lo else max(0, len(data) - int(hi))
            stop = min(len(data), int(hi) + 1) if lo and hi else len(data)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
        self.end_headers()
        return _Body(data[start:stop])


class _Body:
    """The bytes a response sends (``copyfile`` reads them like a file)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else self.pos + n
        out, self.pos = self.data[self.pos:end], min(end, len(self.data))
        return out

    def close(self) -> None:
        pass


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port); yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}


@contextmanager
def s3_server() -> Iterator[str]:
    """An S3 API on 127.0.0.1 (moto, a free port), with ``AWS_ENDPOINT_URL`` and dummy
    credentials set in this process's environment while it runs; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets in this process across servers: start from none
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    _clear_fsspec_instances()
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_fsspec_instances()
        server.stop()


def _clear_fsspec_instances() -> None:
    """Forget cached s3fs clients: one made for another endpoint must not be reused."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
