"""Pieces for chaos tests: a Redis that forgets, a proxy that fails on demand, a fleet of stateless workers, and
the per-step event lines workers log, so a test can say exactly which job each killed process was in the middle of."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.proxy import _Proxy, _pump
from tests.support.s3 import free_port

LOCALHOST = "127.0.0.1"

# ---------------------------------------------------------------------------------------------------------- Redis


class RedisServer:
    """A private redis-server on a free loopback port, run as production runs it: nothing persists, so a restart
    loses every queued message (the broker failure a chaos test must survive)."""

    def __init__(self, workdir: Path, port: int | None = None, *, executable: str = "redis-server") -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.executable = executable
        self.log_path = workdir / "redis.log"
        self._stderr_path = workdir / "redis.stderr"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL of this server (database 0)."""
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The running server's pid; None while stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def command(self) -> list[str]:
        """The argv: persistence off exactly as docker/compose.yaml runs Redis (`--save "" --appendonly no`)."""
        return [
            self.executable,
            "--bind",
            LOCALHOST,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
        ]

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server and return once it answers PING, so callers never race its startup."""
        if self.pid is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self._stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited ({self._proc.returncode}) on port {self.port}:\n{self._tail()}"
                )
            if self.ping():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"redis-server did not answer PING on port {self.port} within {timeout_s} s:\n{self._tail()}"
        )

    def ping(self) -> bool:
        """True when something on this server's port answers PING."""
        # No retries: redis-py's default retry policy backs off for seconds before a refused PING returns.
        client = redis.Redis(
            host=LOCALHOST,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crashed or OOM-killed broker dies: no shutdown work at all."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def restart(self, timeout_s: float = 10.0) -> RedisServer:
        """Kill the server abruptly and start a fresh one on the same port: everything queued is gone."""
        self.kill()
        return self.start(timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within 10 s."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def _tail(self) -> str:
        text = ""
        for path in (self._stderr_path, self.log_path):
            if path.is_file():
                text += path.read_text(errors="replace")[-2000:]
        return text

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------- proxy

_SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>chaos-proxy</RequestId></Error>"
)
_SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
    + str(len(_SLOW_DOWN_BODY)).encode()
    + b"\r\nConnection: close\r\n\r\n"
    + _SLOW_DOWN_BODY
)
_MAX_REQUEST = 64 * 2**20  # read at most this much of a request before answering 503


class _Link:
    """One forwarded connection; both sockets are kept so another thread can cut it."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.cut = False

    def sever(self) -> None:
        """Shut both sockets down: the peers see EOF at once, the pumps wake, and the owning thread closes them."""
        self.cut = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class ToggleProxy(_Proxy):
    """127.0.0.1:port → target, switchable at runtime between passing traffic, looking unreachable (go_down) and
    answering every request with S3's 503 SlowDown (answer_503): outages of the database or store on demand."""

    PASS = "pass"
    DOWN = "down"
    SLOW_DOWN = "503"

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self._lock = threading.Lock()
        self._mode = self.PASS
        self._links: set[_Link] = set()
        self._started = False
        self._stopped = False
        self.connections = 0  # every connection accepted, whatever the mode
        self.refused = 0  # connections dropped because the proxy was down
        self.injected_503 = 0  # 503 responses sent

    @property
    def mode(self) -> str:
        """The current mode: PASS, DOWN or SLOW_DOWN."""
        with self._lock:
            return self._mode

    @property
    def open_connections(self) -> int:
        """Forwarded connections open right now."""
        with self._lock:
            return len(self._links)

    def pass_through(self) -> None:
        """Forward new connections to the target again (the default)."""
        self._switch(self.PASS, cut=False)

    def go_down(self) -> None:
        """Look unreachable: cut every open connection and drop new ones as soon as they are accepted."""
        self._switch(self.DOWN, cut=True)

    def answer_503(self) -> None:
        """Answer every new request 503 SlowDown; open keep-alive connections are cut so the next request of a
        pooled client (boto3) reconnects and meets the 503 instead of slipping through an old connection."""
        self._switch(self.SLOW_DOWN, cut=True)

    def _switch(self, mode: str, *, cut: bool) -> None:
        # Under the lock, so no connection can register between the mode change and the cut and slip through.
        with self._lock:
            self._mode = mode
            if cut:
                for link in self._links:
                    link.sever()

    def start(self) -> ToggleProxy:
        """Start serving; returns self."""
        super().start()
        self._started = True
        return self

    def stop(self) -> None:
        """Cut every connection and stop listening."""
        if self._stopped:
            return
        self._stopped = True
        self._switch(self.DOWN, cut=True)
        if self._started:
            self._server.shutdown()  # only when serve_forever runs: otherwise shutdown() waits forever
        self._server.server_close()

    def serve(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            mode = self._mode
            link = _Link(client) if mode == self.PASS else None
            if link is not None:
                self._links.add(link)
            elif mode == self.DOWN:
                self.refused += 1
        if link is not None:
            self._forward(link)
        elif mode == self.SLOW_DOWN:
            self._slow_down(client)
        # DOWN: return at once; socketserver closes the client socket.

    def _forward(self, link: _Link) -> None:
        try:
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                return  # the target itself is down: the client sees its connection closed
            upstream.settimeout(None)  # idle pooled connections must stay open as long as the client keeps them
            with self._lock:
                link.upstream = upstream
                if link.cut:  # cut while we were connecting
                    link.sever()
            back = threading.Thread(target=_pump, args=(upstream, link.client, 0.0, None), daemon=True)
            back.start()
            _pump(link.client, upstream, 0.0, None)
            back.join(timeout=5)
            if back.is_alive():  # the client is gone but the server still holds its half open: end it
                link.sever()
                back.join(timeout=5)
            upstream.close()
        finally:
            with self._lock:
                self._links.discard(link)

    def _slow_down(self, client: socket.socket) -> None:
        """Read the request (headers, and a body unless the client waits for 100-continue), then answer 503."""
        deadline = time.monotonic() + 5
        client.settimeout(1)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data and len(data) < _MAX_REQUEST and time.monotonic() < deadline:
                chunk = client.recv(65536)
                if not chunk:
                    return  # the client left without a request: nothing to answer
                data += chunk
            if b"\r\n\r\n" not in data:
                return
            head, _, body = data.partition(b"\r\n\r\n")
            headers = _headers(head)
            if headers.get("expect", "").lower() != "100-continue":
                # Read the body the client is sending, so closing does not reset the connection before it reads 503.
                length = int(headers.get("content-length", "0") or 0)
                chunked = "chunked" in headers.get("transfer-encoding", "").lower()
                while time.monotonic() < deadline and len(body) < _MAX_REQUEST:
                    if chunked and body.endswith(b"0\r\n\r\n"):
                        break
                    if not chunked and len(body) >= length:
                        break
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    body += chunk
            with self._lock:  # counted before sending, so a client that has its 503 always sees it counted
                self.injected_503 += 1
            client.sendall(_SLOW_DOWN)

    def __enter__(self) -> ToggleProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _headers(head: bytes) -> dict[str, str]:
    """The header fields of an HTTP request head, names lower-cased."""
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


# ---------------------------------------------------------------------------------------------------------- fleet


class FleetWorker:
    """One `farm worker` process of a Fleet, with its own log file, and the signals a chaos test sends it."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.args = args
        self.frozen = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited (a frozen process is alive)."""
        return self.proc.poll() is None

    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> int:
        """SIGKILL and reap: a machine losing power, with no chance to release anything."""
        self.proc.kill()
        self.frozen = False
        return self.proc.wait(timeout=30)

    def freeze(self) -> None:
        """SIGSTOP: the process holds its leases and connections but does nothing (a hung or paused machine)."""
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT: a frozen process resumes where it stopped, possibly after its leases expired."""
        self.proc.send_signal(signal.SIGCONT)
        self.frozen = False

    def terminate(self) -> None:
        """SIGTERM without waiting (a frozen process acts on it only once thawed)."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int | None:
        """The exit status, or None if the process is still running after timeout_s."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def __repr__(self) -> str:
        state = "frozen" if self.frozen and self.alive else "alive" if self.alive else f"exit {self.proc.returncode}"
        return f"FleetWorker({self.name!r}, pid={self.pid}, {state}, log={self.log_path.name})"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]*")


class Fleet:
    """`farm worker` processes started the way a fresh machine runs them: nothing but the given environment, no
    FARM_HOME, no farm.toml in the working directory, so any state they need must come from the shared services."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = dict(env)
        self.workdir = workdir
        if not self.env.get("FARM_HOME"):  # an empty FARM_HOME means ./.farm to farm: make it explicit
            self.env["FARM_HOME"] = str(workdir / "no-such-home")
        home = Path(self.env["FARM_HOME"])
        if not home.is_absolute():
            raise ValueError(f"FARM_HOME={home} must be absolute: each worker runs in a different folder")
        if home.exists():
            raise ValueError(f"FARM_HOME={home} exists: fleet workers must start with no local state")
        self.env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they are written
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._workers: list[FleetWorker] = []
        self._starts: dict[str, int] = {}

    def command(self, name: str, extra_args: Sequence[str]) -> list[str]:
        """The argv of one worker."""
        return [sys.executable, "-m", "farm", "worker", "--name", name, "--loglevel", "INFO", *extra_args]

    def start(self, name: str, *extra_args: str) -> FleetWorker:
        """Start a worker NAME in a fresh empty folder; its output goes to logs/NAME-N.log, N counting its starts."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"worker name {name!r}: use letters, digits and _.@:- only")
        n = self._starts.get(name, 0) + 1
        self._starts[name] = n
        cwd = self.workdir / "cwd" / f"{name}-{n}"
        cwd.mkdir(parents=True)  # must be new and empty: nothing may be picked up from the working directory
        log_path = self.logs / f"{name}-{n}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor; ours is not needed
            proc = subprocess.Popen(
                self.command(name, extra_args),
                env=self.env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the test's terminal does not reach the workers directly
            )
        worker = FleetWorker(name, proc, log_path, tuple(extra_args))
        self._workers.append(worker)
        return worker

    def restart(self, name: str) -> FleetWorker:
        """Start NAME again with the same arguments, in a new process with a new log; the last one must be gone."""
        previous = [w for w in self._workers if w.name == name]
        if not previous:
            raise KeyError(f"no worker named {name!r} was started")
        if previous[-1].alive:
            raise RuntimeError(f"{previous[-1]} is still running: kill or stop it before restarting {name!r}")
        return self.start(name, *previous[-1].args)

    def workers(self) -> list[FleetWorker]:
        """Every worker ever started, in start order."""
        return list(self._workers)

    def alive(self) -> list[FleetWorker]:
        """The workers whose process is still running (frozen ones included)."""
        return [w for w in self._workers if w.alive]

    def logs_of(self) -> list[Path]:
        """The log of every worker ever started, in start order."""
        return [w.log_path for w in self._workers]

    def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGCONT (frozen ones could not act on SIGTERM) and SIGTERM to every live worker; SIGKILL what is left
        after timeout_s."""
        running = self.alive()
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.thaw()
                worker.terminate()
        deadline = time.monotonic() + timeout_s
        for worker in running:
            if worker.wait(max(0.0, deadline - time.monotonic())) is None:
                worker.kill()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


# ---------------------------------------------------------------------------------------------------------- events

EVENT_NAMES = frozenset(
    {"claimed", "render_start", "render_end", "upload_start", "upload_end", "recorded", "released", "lost", "canceled"}
)
_FINAL = frozenset({"recorded", "released", "lost", "canceled"})
_EVENT = re.compile(r"(?<!\S)event=(\w+) job=([0-9a-fA-F]{32}) seq=(\d+) worker=(\S+)(?!\S)")


@dataclass(frozen=True)
class Event:
    """One job step a worker logged: `event=NAME job=JOBID seq=N worker=INCARNATION`."""

    name: str
    job: str
    seq: int
    worker: str
    line_no: int  # 1-based line in log
    log: Path


def read_events(paths: Iterable[Path]) -> list[Event]:
    """The events of each log, logs in the given order and lines in file order. A last line without its newline is
    still being written and is left out; an unknown event name raises, so worker and harness cannot drift apart."""
    events: list[Event] = []
    for path in paths:
        text = path.read_text(errors="replace") if path.is_file() else ""
        lines = text.split("\n")[:-1]  # the part after the last newline is incomplete (or empty)
        for line_no, line in enumerate(lines, start=1):
            match = _EVENT.search(line)
            if match is None:
                continue
            name, job, seq, worker = match.groups()
            if name not in EVENT_NAMES:
                raise ValueError(f"{path}:{line_no}: unknown event {name!r} in {line!r}")
            events.append(Event(name, job.lower(), int(seq), worker, line_no, path))
    return events


def in_flight(events: Sequence[Event], phase: str) -> set[tuple[str, int]]:
    """The (job, seq) pairs whose `PHASE_start` has no later `PHASE_end` (nor recorded, released, lost or canceled)
    in the same log: what each process was in the middle of when its log stopped, or is now."""
    if phase not in ("render", "upload"):
        raise ValueError(f"phase must be 'render' or 'upload', not {phase!r}")
    open_steps: set[tuple[Path, str, int]] = set()
    for event in events:
        key = (event.log, event.job, event.seq)
        if event.name == f"{phase}_start":
            open_steps.add(key)
        elif event.name == f"{phase}_end" or event.name in _FINAL:
            open_steps.discard(key)
    return {(job, seq) for _, job, seq in open_steps}


def wait_for_event(worker: FleetWorker, predicate: Callable[[Event], bool], timeout_s: float) -> Event:
    """The first event in the worker's log that satisfies predicate, polling every 0.1 s; fails with the log's
    tail on timeout, or as soon as the process has exited without logging one."""
    deadline = time.monotonic() + timeout_s
    while True:
        exited = not worker.alive  # checked before reading, so the final read sees everything it wrote
        for event in read_events([worker.log_path]):
            if predicate(event):
                return event
        if exited:
            raise AssertionError(f"{worker} exited without the awaited event:\n{worker.log()[-4000:]}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for an event of {worker}:\n{worker.log()[-4000:]}"
            )
        time.sleep(0.1)


__all__ = [
    "EVENT_NAMES",
    "Event",
    "Fleet",
    "FleetWorker",
    "RedisServer",
    "ToggleProxy",
    "in_flight",
    "read_events",
    "wait_for_event",
]
