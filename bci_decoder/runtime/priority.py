"""Scheduling priorities of the daemon's threads and of the calibration process (Linux).

``realtime(p)``: the calling thread gets SCHED_FIFO at priority ``p`` (1-99), so a
normal process that wakes on the same core cannot delay it. Needs root, CAP_SYS_NICE or
an ``rtprio`` limit (``/etc/security/limits.conf``: ``@bci - rtprio 60``); without one the
thread stays as it was and the reason is returned for /status. The kernel keeps 5% of
each second for other threads (``sched_rt_runtime_us``), so a stuck loop cannot freeze
the machine. ``realtime_process(p)`` does the same for every normal thread of the
process (the serve command gives its other threads a priority below the hot ones).

``idle()``: the calling process runs only on CPU time nothing else wants (SCHED_IDLE,
plus ``nice``), or with ``nice`` alone; always allowed.
"""

from __future__ import annotations

import os

_RESET = getattr(os, "SCHED_RESET_ON_FORK", 0)


def _fifo(tid: int, priority: int) -> str | None:
    """SCHED_FIFO ``priority`` for thread ``tid`` (0: the caller), RESET_ON_FORK: the
    threads and processes it starts come up normal. None on success, else why not."""
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO | _RESET, os.sched_param(priority))
    except ProcessLookupError:
        return None  # the thread ended meanwhile: nothing to set
    except PermissionError:
        return (
            "not permitted: run as a user with an rtprio limit >= "
            f"{priority} (limits.conf) or CAP_SYS_NICE"
        )
    except OSError as e:
        return f"SCHED_FIFO {priority} refused: {e}"
    return None


def realtime(priority: int) -> str | None:
    """SCHED_FIFO for the calling thread. Returns None on success, else why not."""
    if not hasattr(os, "sched_setscheduler"):
        return "real-time scheduling needs Linux"
    return _fifo(0, priority)


def support_priority(priority: int, offset: int = 10) -> int:
    """SCHED_FIFO priority of a process's other threads: ``offset`` below its hot ones."""
    return max(1, priority - offset)


def realtime_process(priority: int) -> str | None:
    """SCHED_FIFO ``priority`` for every thread of this process that runs at normal
    priority now; threads already real-time keep theirs. Threads and processes started
    later come up normal (RESET_ON_FORK: a calibration fit or an upload parse must never
    run real-time), so the daemon calls this again every second. Returns None on
    success, else why not (the first refusal).

    Why: a normal thread of the daemon (the REST server, another inlet, the recorder,
    liblsl's own I/O threads) can hold the GIL or a lock the decode loop needs; when
    another process preempts it there, the SCHED_FIFO loop waits as long as it is off
    the CPU (priority inversion)."""
    if not hasattr(os, "sched_setscheduler"):
        return "real-time scheduling needs Linux"
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError as e:
        return f"cannot list this process's threads: {e}"
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) & ~_RESET != os.SCHED_OTHER:
                continue
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as e:
            return f"cannot read thread {tid}'s policy: {e}"
        err = _fifo(tid, priority)
        if err is not None:
            return err
    return None


def policy_of(tid: int | None) -> str:
    """The scheduling policy a thread (native id) has now: 'SCHED_FIFO 50', 'normal', ..."""
    if tid is None or not hasattr(os, "sched_getscheduler"):
        return "unknown"
    try:
        policy = os.sched_getscheduler(tid) & ~_RESET
        prio = os.sched_getparam(tid).sched_priority
    except OSError:
        return "unknown"
    names = {os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR", os.SCHED_OTHER: "normal"}
    names[getattr(os, "SCHED_IDLE", -1)] = "idle"
    name = names.get(policy, f"policy {policy}")
    return f"{name} {prio}" if prio else name


def idle(nice: int = 10, sched_idle: bool = True) -> None:
    """Lowest priority for the calling process (threads it starts later inherit it);
    ``sched_idle=False``: only ``nice``, so it still gets a share of a busy machine."""
    try:
        os.nice(nice)
    except OSError:
        pass
    if sched_idle and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
