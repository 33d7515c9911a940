"""Child processes that die with the daemon, however the daemon ends (SIGKILL included).

``die_with_parent(pid)`` is the first thing a child runs: it asks the kernel to send it
SIGKILL when its parent goes (Linux ``prctl(PR_SET_PDEATHSIG)``, through ctypes), checks
the parent did not already go before that call, and starts a thread that polls
``getppid()`` (the fallback where prctl is missing; it also covers the one case prctl
does not: the signal fires when the parent *thread* that started the child ends, so the
daemon starts its children from threads that live as long as it does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def set_death_signal(sig: int = signal.SIGKILL) -> bool:
    """True when the kernel will signal us at our parent's death (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    set_death_signal()
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while True:
            threading.Event().wait(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
