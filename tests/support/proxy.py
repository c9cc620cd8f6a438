"""A TCP proxy in front of a real server that makes it slow: each request chunk waits before it is sent on."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time

from tests.support.s3 import free_port


class _Proxy:
    """A threaded TCP proxy on a free loopback port; subclasses decide what each connection gets."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy.serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> _Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def forward(self, client: socket.socket, delay_s: float = 0.0) -> None:
        """Pass the connection through to the target, delaying each client→server chunk by delay_s."""
        upstream = socket.create_connection(self.target, timeout=30)
        back = threading.Thread(target=_pump, args=(upstream, client, 0.0, None), daemon=True)
        back.start()
        _pump(client, upstream, delay_s, self if delay_s else None)
        back.join(timeout=30)
        upstream.close()


class SlowProxy(_Proxy):
    """127.0.0.1:port → target, delaying every client→server chunk by delay_s (a slow store or network)."""

    def __init__(self, target_host: str, target_port: int, *, delay_s: float) -> None:
        super().__init__(target_host, target_port)
        self.delay_s = delay_s
        self.requests = 0

    def serve(self, client: socket.socket) -> None:
        self.forward(client, self.delay_s)


class FaultProxy(_Proxy):
    """127.0.0.1:port → target, but the first `faults` connections fail: even ones get an HTTP 503 (SlowDown),
    odd ones are dropped without a reply. Later connections pass through untouched."""

    def __init__(self, target_host: str, target_port: int, *, faults: int) -> None:
        super().__init__(target_host, target_port)
        self.faults = faults
        self.injected = 0
        self._lock = threading.Lock()

    def serve(self, client: socket.socket) -> None:
        with self._lock:
            fault = self.injected if self.injected < self.faults else None
            if fault is not None:
                self.injected += 1
        if fault is None:
            self.forward(client)
            return
        with contextlib.suppress(OSError):
            client.recv(65536)  # read the request, then fail it
            if fault % 2 == 0:
                body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
                )


def _pump(source: socket.socket, sink: socket.socket, delay_s: float, counter: SlowProxy | None) -> None:
    try:
        while chunk := source.recv(65536):
            if delay_s:
                time.sleep(delay_s)
            if counter is not None:
                counter.requests += 1
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
