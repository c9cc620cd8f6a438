"""Running the real `farm` command and `farm worker` processes from tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def farm_env(**values: str) -> dict[str, str]:
    """The current environment without FARM_* variables, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(values)
    return env


def run_farm(
    args: list[str], env: Mapping[str, str], cwd: Path | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `farm ARGS` as a separate process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "farm", *args],
        env=dict(env),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


class Worker:
    """A `farm worker` subprocess with its log in a file."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, cwd: Path | None = None, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "farm", "worker", "--loglevel", "INFO", *extra_args],
            env=env,
            cwd=cwd or REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM (a warm shutdown), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, what: str, worker: Worker | None = None, poll_s: float = 0.5
) -> None:
    """Poll until condition() holds; on timeout fail with the worker's log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker exited ({worker.proc.returncode}) before {what}:\n{worker.log()[-4000:]}")
        time.sleep(poll_s)
    tail = worker.log()[-4000:] if worker else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")
