"""A fault-injecting HTTP reverse proxy for the tests: S3 clients talk to it instead of the moto
server, and it answers a seeded share of the requests (or every request during a burst) with the
errors a real object store gives under load: 503 SlowDown and 500 InternalError, with S3's XML
error bodies. The other requests are forwarded to the server and its answers passed back.
Requests for chosen objects can instead stall: the proxy holds them without answering, as a hung
server or a dead network path does, until the client gives up.

Faults are injected before forwarding, so a failed request never changed anything on the server
(what S3 promises for 503 SlowDown). Everything is counted (`requests`, `served`, `injected`
per code). The proxy runs in daemon threads on 127.0.0.1, answers at most `lifetime_s` seconds
and then shuts itself down, so a test that forgets it cannot leave it behind.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "content-length"}
UPSTREAM_TIMEOUT_S = 30.0


def error_body(code: str, message: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>").encode()


class FaultProxy:
    """`url` forwards to `upstream`; `share` of the requests (seeded) get one of `statuses`."""

    def __init__(self, upstream: str, share: float = 0.0, statuses: tuple[int, ...] = (503, 500), seed: int = 0,
                 lifetime_s: float = 900.0) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.share, self.statuses = share, statuses
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._burst_until = 0.0
        self.requests = 0
        self.served = 0
        self.injected: Counter[int] = Counter()
        self.stalled = 0
        self.stalled_clients: list[tuple[str, int]] = []  # (host, port) of each stalled request's client
        self._stall_paths: tuple[str, ...] = ()
        self._closed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime_s, self.close)
        self._timer.daemon = True
        self._timer.start()

    def burst(self, seconds: float) -> None:
        """Answer every request with a fault for the next `seconds` seconds."""
        with self._lock:
            self._burst_until = time.monotonic() + seconds

    def stall(self, *path_parts: str) -> None:
        """Hold every GET whose path contains one of `path_parts` unanswered until closed."""
        with self._lock:
            self._stall_paths = path_parts

    def _stalls(self, path: str, client: tuple[str, int]) -> bool:
        with self._lock:
            if any(part in path for part in self._stall_paths):
                self.stalled += 1
                self.stalled_clients.append(client)
                return True
            return False

    def in_burst(self) -> bool:
        return time.monotonic() < self._burst_until

    def set_share(self, share: float) -> None:
        with self._lock:
            self.share = share

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "served": self.served, "stalled": self.stalled,
                "injected": sum(self.injected.values()),
                    **{f"injected_{status}": n for status, n in sorted(self.injected.items())}}

    def _fault(self) -> int | None:
        """The status to inject for one request, or None to forward it."""
        with self._lock:
            self.requests += 1
            draw = self._random.random()
            status = self._random.choice(self.statuses)
            if time.monotonic() < self._burst_until or draw < self.share:
                self.injected[status] += 1
                return status
            return None

    def close(self) -> None:
        """Stop answering and free the port (idempotent)."""
        self._closed.set()
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
            timeout = UPSTREAM_TIMEOUT_S

            def log_message(self, *args: object) -> None:  # quiet: pytest captures stderr anyway
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, length: str | None = None) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                if self.command == "GET" and proxy._stalls(self.path, self.client_address[:2]):
                    proxy._closed.wait()
                    self.close_connection = True
                    return
                status = proxy._fault()
                if status is not None:
                    code, message = FAULTS[status]
                    payload = error_body(code, message)
                    self._answer(status, [("Content-Type", "application/xml"), ("x-amz-request-id", "fault-proxy")],
                                 payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
                    # HEAD answers carry the object's length but no body.
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    status = response.status
                finally:
                    connection.close()
                with proxy._lock:
                    proxy.served += 1
                self._answer(status, kept, data, length)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
