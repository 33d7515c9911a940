"""Calibration uploads are parsed in a worker process, never in the daemon's.

A JSON body of a few million numbers takes ``json``/pydantic hundreds of ms to parse,
and base64 plus an NWB reader as long again: each is one C call that holds the GIL the
decode loop needs every 10 ms. So the route only streams the body to a file (chunk by
chunk, the GIL free between them) and this process's single worker does the rest: JSON,
schema, base64, NWB, array checks (in float32, the dtype the fit uses), and writes the
resulting ``Session`` to a pickle the calibration child loads. The daemon gets back a
few numbers (a summary) and either that file or a 4xx with what to fix.

The worker is spawned from a long-lived thread with ``die_with_parent`` (prctl
PR_SET_PDEATHSIG), so it never outlives the daemon.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
import tempfile
import threading
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from bci_decoder.api.errors import validation_items
from bci_decoder.api.schemas import CalibrationCreate, CalibrationData
from bci_decoder.data.session import Behavior, Session
from bci_decoder.runtime.guards import GuardError, check_float32
from bci_decoder.runtime.parent_watch import die_with_parent

INT64_MAX = 2**63 - 1


class UploadRefused(Exception):
    """An upload that cannot be used: a 4xx with what to fix (the worker's own error:
    it must not import the daemon, which imports torch)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def session_from_arrays(d: CalibrationData, session_id: str, output: str) -> Session:
    """Validate uploaded arrays (422 with what to fix) and build a Session."""
    t = np.asarray(d.spike_times, np.float64)
    big = [x for x in d.spike_units if not (-INT64_MAX <= x <= INT64_MAX)]
    if big:
        raise UploadRefused(f"spike_units must index unit_ids; got {str(big[0])[:40]}", 422)
    u = np.asarray(d.spike_units, np.int64)
    if len(t) != len(u):
        raise UploadRefused(f"spike_times has {len(t)} entries but spike_units {len(u)}", 422)
    if len(t) == 0:
        raise UploadRefused("no spikes in the upload", 422)
    if not np.isfinite(t).all():
        raise UploadRefused(f"spike_times has {int((~np.isfinite(t)).sum())} NaN/inf values", 422)
    if u.min() < 0 or u.max() >= len(d.unit_ids):
        raise UploadRefused(
            f"spike_units must index unit_ids (0..{len(d.unit_ids) - 1}); got {u.min()}..{u.max()}",
            422,
        )
    if len(set(d.unit_ids)) != len(d.unit_ids):
        raise UploadRefused("unit_ids has duplicates", 422)
    bt = np.asarray(d.behavior_times, np.float64)
    try:
        bx = np.asarray(d.behavior, np.float64)
    except ValueError:
        raise UploadRefused("behavior rows must all have the same length", 422) from None
    if bx.ndim != 2 or len(bx) != len(bt):
        raise UploadRefused(
            f"behavior must be (T, D) with T = len(behavior_times) = {len(bt)}; got {bx.shape}",
            422,
        )
    if not (np.isfinite(bt).all() and np.isfinite(bx).all()):
        raise UploadRefused("behavior_times/behavior contain NaN or inf", 422)
    try:
        bx32 = check_float32("behavior", bx)  # 1e308 is finite as float64, inf as float32
    except GuardError as e:
        raise UploadRefused(str(e), 422) from None
    if np.any(np.diff(bt) <= 0):
        raise UploadRefused("behavior_times must increase strictly", 422)
    order = np.argsort(t, kind="stable")
    lo, hi = min(t.min(), bt[0]), max(t.max(), bt[-1])
    return Session(
        session_id=session_id, subject="upload", spike_times=t[order],
        spike_units=u[order].astype(np.int32), unit_ids=list(d.unit_ids),
        brain_areas=["unknown"] * len(d.unit_ids),
        behavior={output: Behavior(output, bt, bx32)},
        domain=(float(lo), float(hi) + 1e-6),
    )  # fmt: skip


def session_from_nwb(b64: str, seconds: float, session_id: str | None) -> Session:
    from bci_decoder.data.nwb import read_nwb

    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise UploadRefused("nwb_base64 is not valid base64", 422) from None
    with tempfile.NamedTemporaryFile(suffix=".nwb") as f:
        f.write(raw)
        f.flush()
        try:
            s = read_nwb(f.name)
        except Exception as e:  # noqa: BLE001 - any reader failure is the upload's fault
            raise UploadRefused(
                f"the uploaded file is not a readable NWB session: {e}", 422
            ) from None
    lo = s.domain[0]
    s = s.slice(lo, min(s.domain[1], lo + seconds))
    for name, beh in s.behavior.items():
        try:
            check_float32(f"behaviour {name!r}", beh.data)
        except GuardError as e:
            raise UploadRefused(str(e), 422) from None
    if session_id:
        s.session_id = session_id
    return s


def parse_upload(body_path: str, session_path: str) -> dict:
    """Worker process: the request in ``body_path`` -> a reply for the route.

    ``{"status": 4xx, "detail": ..., "errors": [...]}`` on bad input, else
    ``{"body": <request without its data>, "summary": {...} | None}`` with the Session
    pickled to ``session_path`` for an upload."""
    try:
        raw = Path(body_path).read_bytes()
        try:
            body = CalibrationCreate.model_validate_json(raw)
        except ValidationError as e:
            items = validation_items(e.errors(include_url=False))
            for i in items:
                i["loc"] = ["body", *i["loc"]]
            text = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in items[:10])
            return {"status": 422, "detail": f"invalid request: {text}"[:2000], "errors": items}
        meta = body.model_dump(exclude={"data", "nwb_base64"})
        if body.source == "buffer":
            if body.data is not None or body.nwb_base64 is not None:
                raise UploadRefused(
                    "source 'buffer' takes no data; use source 'upload' to send data", 422
                )
            return {"body": meta, "summary": None}
        if (body.data is None) == (body.nwb_base64 is None):
            raise UploadRefused("source 'upload' needs exactly one of 'data' or 'nwb_base64'", 422)
        if body.data is not None:
            output = body.output or "hand_vel"
            session = session_from_arrays(body.data, body.session or "pending", output)
            hint = body.session or "upload"
        else:
            session = session_from_nwb(body.nwb_base64, body.seconds, body.session)
            output = body.output or (session.default_output() if session.behavior else None)
            hint = session.session_id
        with open(session_path, "wb") as f:
            pickle.dump(session, f, protocol=pickle.HIGHEST_PROTOCOL)
        return {"body": meta, "summary": summarize(session) | {"output": output, "hint": hint}}
    except UploadRefused as e:
        return {"status": e.status, "detail": str(e), "errors": []}
    except Exception as e:  # noqa: BLE001 - whatever the body holds, a 4xx, not a 500
        return {"status": 422, "detail": f"cannot read the upload: {type(e).__name__}: {e}"}
    finally:
        try:
            os.unlink(body_path)
        except OSError:
            pass


def summarize(session: Session) -> dict:
    """What the daemon checks and reports about a calibration block."""
    return {
        "session_id": session.session_id,
        "units": session.num_units,
        "spikes": int(len(session.spike_times)),
        "domain": [float(session.domain[0]), float(session.domain[1])],
        "behavior": {
            k: {"dim": int(b.dim), "samples": int(len(b.timestamps))}
            for k, b in session.behavior.items()
        },
    }


def _worker_init(parent_pid: int) -> None:
    die_with_parent(parent_pid)
    os.nice(10)  # parsing yields the CPU to the daemon's threads on a busy machine


class UploadParser:
    """One worker process, spawned from a thread that lives as long as the parser (a
    death signal fires when the *thread* that forked the child ends)."""

    def __init__(self) -> None:
        self._launcher = cf.ThreadPoolExecutor(1, thread_name_prefix="upload-launcher")
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _start(self) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(
            1, mp_context=mp.get_context("spawn"), initializer=_worker_init,
            initargs=(os.getpid(),),
        )  # fmt: skip
        pool.submit(int).result()  # the worker exists now, spawned from this thread
        return pool

    def _ensure(self) -> cf.ProcessPoolExecutor:  # on the launcher thread only
        with self._lock:
            if self._pool is None:
                self._pool = self._start()
            return self._pool

    def pool(self) -> cf.ProcessPoolExecutor:
        return self._launcher.submit(self._ensure).result()

    def warm_up(self) -> None:
        self._launcher.submit(self._ensure)

    def submit(self, body_path: str, session_path: str) -> cf.Future:
        try:
            return self.pool().submit(parse_upload, body_path, session_path)
        except cf.process.BrokenProcessPool:
            with self._lock:
                self._pool = None  # the worker died (killed?): start another
            return self.pool().submit(parse_upload, body_path, session_path)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        self._launcher.shutdown(wait=False)
