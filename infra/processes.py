"""Lifecycle of the local infrastructure processes (Ganache, the IPFS daemon, the apps).

Each service is started in its own process group so that stopping it also stops any
children it spawned; a service already answering at its URL is reused and left alone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import psutil
import requests


class ServiceError(RuntimeError):
    """A service could not be started or did not become ready."""


def machine_busy_seconds() -> float:
    """CPU-seconds all of this machine's cores have spent busy (any process) since it booted."""
    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))


def port_listens(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """True when something accepts TCP connections at host:port (no request is made)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_answers(url: str, method: str = "GET", timeout: float = 1.0) -> bool:
    """True when something answers HTTP at `url` (any status code)."""
    try:
        requests.request(method, url, timeout=timeout)
        return True
    except requests.RequestException:
        return False


class ManagedProcess:
    """A child process in a new process group, ready once `is_ready()` returns True.

    `start()` reuses a service that is already ready and then `stop()` leaves it running.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        is_ready: Callable[[], bool],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.is_ready = is_ready
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen | None = None
        self.reused = False

    def start(self) -> "ManagedProcess":
        if self.is_ready():
            self.reused = True
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            cwd=self.cwd,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {self.process.returncode} before it was ready; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServiceError(
            f"{self.name} was not ready after {self.ready_timeout:.0f} s; see {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited within `timeout`."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children may outlive the leader; make sure the whole group is gone.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    def kill(self) -> None:
        """SIGKILL the process group at once (fault-injection tests)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
