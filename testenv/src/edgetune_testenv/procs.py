"""Start, watch and stop the server processes of the test environment.

Every process runs in its own process group, logs to a file, and is asked by the
kernel to die with its parent (``PR_SET_PDEATHSIG``), so a crashed or interrupted
test run cannot leave servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self, TypeVar

from edgetune_testenv.errors import ComponentCrashedError, EnvironmentSetupError

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the kernel kills the child when the thread that started it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class ManagedProcess:
    """One server process with its log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        ports: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.ports = tuple(ports)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        busy = [p for p in self.ports if port_in_use(p)]
        if busy:
            raise EnvironmentSetupError(f"{self.name}: port(s) {busy} on 127.0.0.1 are already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl
            )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_tail()
            hint = " (address already in use)" if "address already in use" in tail.lower() else ""
            raise ComponentCrashedError(
                f"{self.name} exited with status {self.proc.returncode}{hint}; log {self.log_path}:\n{tail}"
            )

    def wait_until(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``probe`` until it returns True; fail early and clearly if the process dies."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError):
                pass
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        self.check_alive()
        raise EnvironmentSetupError(
            f"{self.name} did not become {what} within {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Children that ignored SIGTERM but share the group (e.g. a server's workers).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float, *, every: float = 0.5,
    tolerate: tuple[type[BaseException], ...] = (),
) -> T:  # fmt: skip
    """Poll ``probe`` until it returns something truthy (returned); exceptions of the ``tolerate``
    kinds count as not yet. TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(*tolerate):
            value = probe()
            if value:
                return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from ``/proc/<pid>/status``: ``VmRSS`` now, ``VmHWM`` its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, context=context, timeout=timeout) as resp:  # noqa: S310
            return 200 <= int(resp.status) < 300
    except urllib.error.HTTPError:
        return False


class ProcessGroup:
    """Processes started together and stopped together (newest first), with their work folder.

    Subclasses implement ``start()``; as a context manager a failed start stops whatever did start.
    A work folder the group created itself is removed on ``stop()``; one it was given is kept.
    """

    def __init__(self, name: str, workdir: Path | None = None) -> None:
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"edgetune-{name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []

    def start(self) -> Self:
        raise NotImplementedError

    def launch(self, proc: ManagedProcess) -> ManagedProcess:
        proc.start()
        self.processes.append(proc)
        return proc

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def check_alive(self) -> None:
        for proc in self.processes:
            proc.check_alive()
