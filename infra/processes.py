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


def exit_text(returncode: int) -> str:
    """How a process ended, from its return code (minus the signal's number when a signal ended it).
    The kernel's out-of-memory killer ends a process with SIGKILL, and so does little else here."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = " (killed by the system: out of memory?)" if -returncode == signal.SIGKILL else ""
    return f"was killed by {name}{hint}"


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
            returncode = self.process.poll()
            if returncode is not None:
                raise ServiceError(self.with_log(f"{exit_text(returncode)} before it was ready"))
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise ServiceError(self.with_log(f"was not ready after {self.ready_timeout:.0f} s"))

    def ended(self, within: float = 0.0) -> str | None:
        """How the process ended, with the last lines of its log; None while it runs (after waiting
        up to `within` seconds for it to end), or when this object has no process (not started,
        reused, or stopped on purpose)."""
        if self.process is None:
            return None
        try:
            returncode = self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            return None
        return self.with_log(exit_text(returncode))

    def with_log(self, what: str) -> str:
        """`what` happened to this process, and the last lines of its log."""
        return f"{self.name} {what}; the last lines of its log ({self.log_path}):\n{self.log_tail()}"

    def log_tail(self, lines: int = 12) -> str:
        """The log's last `lines` meaningful lines, indented: blank lines and progress bars (lines
        redrawn in place with carriage returns) say nothing about how a process ended."""
        try:
            text = self.log_path.read_bytes().decode(errors="replace")  # carriage returns kept
        except OSError:
            return "  (no log)"
        meaningful = [line.rstrip() for line in text.split("\n") if line.strip() and "\r" not in line.rstrip()]
        return "\n".join(f"  {line}" for line in meaningful[-lines:]) or "  (the log is empty)"

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
