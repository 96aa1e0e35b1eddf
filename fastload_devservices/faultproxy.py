"""A fault-injecting HTTP proxy in front of moto's S3 server, for real-HTTP fault tests.

boto3 talks to the proxy (AWS_ENDPOINT_URL_S3 points at it); the proxy forwards to moto and, for ranged
GETs, applies the next queued fault: an S3 error status, a dropped connection before any response, a
connection reset or a short body part-way through, or a corrupted byte. It also counts the body bytes of
ranged GETs (object bytes, not listings): "bytes the origin served" for the single-flight tests, and the
requests by method ("how often was the origin asked", for the tests that a miss resolves once).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[str] = []
        self.before_ranged_get: Callable[[int], None] | None = None
        self.delay = 0.0  # seconds to sleep before answering each ranged GET (to make downloads slow)
        self.ranged_gets = 0
        self.get_body_bytes = 0
        self.connections = 0  # TCP connections accepted: clients that reuse theirs keep this low
        self.requests: dict[str, int] = {}  # by method: HEAD, GET, ...
        self.applied: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def setup(self) -> None:  # once per TCP connection, however many requests it carries
                with proxy._lock:
                    proxy.connections += 1
                super().setup()

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset_counters(self) -> None:
        with self._lock:
            self.ranged_gets = 0
            self.get_body_bytes = 0
            self.connections = 0
            self.requests.clear()
            self.applied.clear()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        fault = None
        hook = None
        count = 0
        with self._lock:
            self.requests[handler.command] = self.requests.get(handler.command, 0) + 1
        if handler.command == "GET" and "Range" in handler.headers:
            with self._lock:
                self.ranged_gets += 1
                count = self.ranged_gets
                if self.faults:
                    fault = self.faults.pop(0)
                    self.applied.append(fault)
                hook = self.before_ranged_get
            if hook is not None:
                hook(count)
            if self.delay:
                time.sleep(self.delay)
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>{message}</Message></Error>").encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        if fault == "drop":
            self._reset(handler)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
        try:  # an upstream killed mid-request (a peer node in the serve tests) must not leak the socket
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in _HOP:
                handler.send_header(key, value)
        if handler.command == "HEAD":  # a HEAD's Content-Length describes the object, not this empty body
            handler.send_header("Content-Length", response.getheader("Content-Length") or "0")
            handler.end_headers()
            return
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if fault == "corrupt" and data:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        if fault in ("short", "reset"):
            cut = data[: len(data) // 3]
            self._send(handler, cut)
            handler.wfile.flush()
            if fault == "reset":
                self._reset(handler)
            else:
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(handler, data)

    def _send(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        """Count the bytes before writing them: a client that has read them all may look at the count at once,
        before this thread runs again (a count taken after the write lagged under load and failed a test).
        A write the client cut short takes its count back."""
        self._count(handler, len(data))
        try:
            handler.wfile.write(data)
        except OSError:
            self._count(handler, -len(data))
            raise

    def _count(self, handler: BaseHTTPRequestHandler, nbytes: int) -> None:
        if handler.command == "GET" and "Range" in handler.headers:  # object bytes, not listings
            with self._lock:
                self.get_body_bytes += nbytes

    @staticmethod
    def _reset(handler: BaseHTTPRequestHandler) -> None:
        """Close with SO_LINGER 0: the client sees a TCP RST, as from a dropped load balancer."""
        handler.close_connection = True
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
