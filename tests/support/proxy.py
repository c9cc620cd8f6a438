"""A TCP proxy in front of a real server that makes it slow: each request chunk waits before it is sent on."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time

from tests.support.s3 import free_port


class SlowProxy:
    """127.0.0.1:port → target, delaying every client→server chunk by delay_s (a slow store or network)."""

    def __init__(self, target_host: str, target_port: int, *, delay_s: float) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.port = free_port()
        self.requests = 0
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(proxy.target, timeout=30)
                back = threading.Thread(target=_pump, args=(upstream, self.request, 0.0, None), daemon=True)
                back.start()
                _pump(self.request, upstream, proxy.delay_s, proxy)
                back.join(timeout=30)
                upstream.close()

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SlowProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


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


class FaultProxy:
    """127.0.0.1:port → target, but the first `faults` connections fail: even ones get an HTTP 503 (SlowDown),
    odd ones are dropped without a reply. Later connections pass through untouched."""

    def __init__(self, target_host: str, target_port: int, *, faults: int) -> None:
        self.target = (target_host, target_port)
        self.faults = faults
        self.port = free_port()
        self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with proxy._lock:
                    fault = proxy.injected if proxy.injected < proxy.faults else None
                    if fault is not None:
                        proxy.injected += 1
                if fault is not None:
                    with contextlib.suppress(OSError):
                        self.request.recv(65536)  # read the request, then fail it
                        if fault % 2 == 0:
                            body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                            self.request.sendall(
                                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
                            )
                    return
                upstream = socket.create_connection(proxy.target, timeout=30)
                back = threading.Thread(target=_pump, args=(upstream, self.request, 0.0, None), daemon=True)
                back.start()
                _pump(self.request, upstream, 0.0, None)
                back.join(timeout=30)
                upstream.close()

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
