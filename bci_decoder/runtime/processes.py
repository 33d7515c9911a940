"""Child processes for the demo and the benchmarks: started in their own process groups,
logged to files, and always stopped (SIGTERM, then SIGKILL) so nothing is left behind."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ProcessGroup:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        atexit.register(self.stop_all)

    def python(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """Run ``python args...`` with this interpreter; output to <log_dir>/<name>.log."""
        log = (self.log_dir / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            start_new_session=True,  # its own group: we can stop it and its children
        )
        self.procs[name] = proc
        return proc

    def check(self, name: str) -> None:
        """Raise with the log's tail if ``name`` exited with an error."""
        proc = self.procs[name]
        code = proc.poll()
        if code not in (None, 0):
            tail = (self.log_dir / f"{name}.log").read_text()[-2000:]
            raise RuntimeError(f"{name} exited with code {code}:\n{tail}")

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout)

    def stop(self, name: str, grace: float = 5.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def free_port() -> int:
    """A TCP port free on loopback now (for a server started right after)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc_check=None) -> None:
    """Poll ``url`` until it answers 200 (raising if ``proc_check`` raises)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_check is not None:
            proc_check()
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class PortBusy(OSError):
    """The REST port cannot be listened on; the message says what to do."""


def bind_port(host: str, port: int):
    """The REST socket, bound and listening now: a busy port is an error at once (before
    the model and the ONNX export load), with what to do about it."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortBusy(
                f"port {port} on {host} is in use (another bci-decoder serve?); stop it or "
                "pass --port",
            ) from None
        raise PortBusy(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
