"""A local HTTP server for tests: files with ETag / Last-Modified / Range support, and misbehaving
routes (fails N times, with a status and Retry-After of choice, cuts the connection mid-file, 404, slow)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    fail_first: int = 0  # answer fail_status to this many requests first
    fail_status: int = 503
    retry_after: str | None = None  # the Retry-After header sent with those failures
    cut_first: int = 0  # send half the body, then drop the connection, this many times
    ranges: bool = True
    delay_s: float = 0.0
    status: int = 200
    last_modified: str = "Wed, 01 Jan 2025 00:00:00 GMT"

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'


@dataclass
class LocalServer:
    routes: dict[str, Route] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_server() -> tuple[LocalServer, ThreadingHTTPServer]:
    state = LocalServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):  # noqa: N802 - http.server's naming
            state.hits[self.path] += 1
            state.requests.append((self.path, dict(self.headers)))
            route = state.routes.get(self.path)
            if route is None or route.status == 404:
                return self._send(404, b"not found", "text/plain")
            if route.delay_s:
                time.sleep(route.delay_s)
            if state.hits[self.path] <= route.fail_first:
                extra = {"Retry-After": route.retry_after} if route.retry_after else {}
                return self._send(route.fail_status, b"try later", "text/plain", extra)
            if self.headers.get("If-None-Match") == route.etag:
                self.send_response(304)
                self.send_header("ETag", route.etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            body, start = route.body, 0
            rng = self.headers.get("Range")
            if rng and route.ranges and self.headers.get("If-Range") in (None, route.etag, route.last_modified):
                start = int(rng.split("=")[1].split("-")[0])
            status = 206 if start else route.status
            self.send_response(status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", route.etag)
            self.send_header("Last-Modified", route.last_modified)
            if route.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            payload = body[start:]
            cuts_done = state.hits[self.path] - route.fail_first
            if cuts_done <= route.cut_first:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            self.wfile.write(payload)
            return None

        def _send(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None):
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state, server
