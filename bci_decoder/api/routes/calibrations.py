"""Calibration jobs: POST /calibrations, GET/DELETE /calibrations/{id}, POST .../apply."""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request, status

from bci_decoder.api.deps import Authorized, DaemonDep
from bci_decoder.api.schemas import CalibrationCreate, CalibrationData, CalibrationPublic
from bci_decoder.data.session import Behavior, Session
from bci_decoder.runtime.calibration_jobs import CalibrationManager, JobSpec
from bci_decoder.runtime.daemon import CALIBRATIONS, Daemon, DaemonError

router = APIRouter(prefix="/calibrations", tags=["calibration"])


def _manager(request: Request) -> CalibrationManager:
    return request.app.state.calibrations


def session_from_arrays(d: CalibrationData, session_id: str, output: str) -> Session:
    """Validate uploaded arrays (422 with what to fix) and build a Session."""
    t = np.asarray(d.spike_times, np.float64)
    u = np.asarray(d.spike_units, np.int64)
    if len(t) != len(u):
        raise DaemonError(f"spike_times has {len(t)} entries but spike_units {len(u)}", 422)
    if len(t) == 0:
        raise DaemonError("no spikes in the upload", 422)
    if not np.isfinite(t).all():
        raise DaemonError(f"spike_times has {int((~np.isfinite(t)).sum())} NaN/inf values", 422)
    if u.min() < 0 or u.max() >= len(d.unit_ids):
        raise DaemonError(
            f"spike_units must index unit_ids (0..{len(d.unit_ids) - 1}); got {u.min()}..{u.max()}",
            422,
        )
    if len(set(d.unit_ids)) != len(d.unit_ids):
        raise DaemonError("unit_ids has duplicates", 422)
    bt = np.asarray(d.behavior_times, np.float64)
    try:
        bx = np.asarray(d.behavior, np.float64)
    except ValueError:
        raise DaemonError("behavior rows must all have the same length", 422) from None
    if bx.ndim != 2 or len(bx) != len(bt):
        raise DaemonError(
            f"behavior must be (T, D) with T = len(behavior_times) = {len(bt)}; got {bx.shape}",
            422,
        )
    if not (np.isfinite(bt).all() and np.isfinite(bx).all()):
        raise DaemonError("behavior_times/behavior contain NaN or inf", 422)
    if np.any(np.diff(bt) <= 0):
        raise DaemonError("behavior_times must increase strictly", 422)
    order = np.argsort(t, kind="stable")
    lo, hi = min(t.min(), bt[0]), max(t.max(), bt[-1])
    return Session(
        session_id=session_id, subject="upload", spike_times=t[order],
        spike_units=u[order].astype(np.int32), unit_ids=list(d.unit_ids),
        brain_areas=["unknown"] * len(d.unit_ids),
        behavior={output: Behavior(output, bt, bx.astype(np.float32))},
        domain=(float(lo), float(hi) + 1e-6),
    )  # fmt: skip


def session_from_nwb(b64: str, seconds: float, session_id: str | None) -> Session:
    from bci_decoder.data.nwb import read_nwb

    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise DaemonError("nwb_base64 is not valid base64", 422) from None
    with tempfile.NamedTemporaryFile(suffix=".nwb") as f:
        f.write(raw)
        f.flush()
        try:
            s = read_nwb(f.name)
        except Exception as e:  # noqa: BLE001 - any reader failure is the upload's fault
            raise DaemonError(
                f"the uploaded file is not a readable NWB session: {e}", 422
            ) from None
    lo = s.domain[0]
    s = s.slice(lo, min(s.domain[1], lo + seconds))
    if session_id:
        s.session_id = session_id
    return s


def _default_name(hint: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", hint or "session")[:60]
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=CalibrationPublic,
             dependencies=[Authorized])  # fmt: skip
def create(body: CalibrationCreate, daemon: DaemonDep, request: Request) -> dict:
    """Start a calibration job (202 + its id). Poll ``GET /calibrations/{id}``."""
    manager = _manager(request)
    model_outputs = daemon.decoder.model.output_names
    if body.output is not None and body.output not in model_outputs:
        raise DaemonError(
            f"output {body.output!r} is not one the model decodes: {model_outputs}", 422
        )
    if body.source == "buffer":
        if body.data is not None or body.nwb_base64 is not None:
            raise DaemonError(
                "source 'buffer' takes no data; use source 'upload' to send data", 422
            )
        session, output, hint = daemon.calibration_block(body.seconds, body.output)
    else:
        if (body.data is None) == (body.nwb_base64 is None):
            raise DaemonError("source 'upload' needs exactly one of 'data' or 'nwb_base64'", 422)
        hint = body.session or "upload"
        if body.data is not None:
            output = body.output or "hand_vel"
            session = session_from_arrays(body.data, body.session or "pending", output)
        else:
            session = session_from_nwb(body.nwb_base64, body.seconds, body.session)
            output = body.output or session.default_output()
            hint = session.session_id
        if output not in session.behavior:
            raise DaemonError(
                f"the upload has no behaviour {output!r}: {list(session.behavior)}", 422
            )
    if output not in model_outputs:
        raise DaemonError(f"output {output!r} is not one the model decodes: {model_outputs}", 422)
    dim = daemon.decoder.model.output_dims[output]
    if session.behavior[output].dim != dim:
        raise DaemonError(
            f"behaviour {output!r} has {session.behavior[output].dim} channels; the model's "
            f"head has {dim}",
            422,
        )
    name = body.name or _default_name(hint)
    session.session_id = body.session or name
    base = daemon.model_dir
    out_dir = base / CALIBRATIONS / name
    if out_dir.exists():
        raise DaemonError(
            f"model {base.name} already has a calibration {name!r}; pick another name", 409
        )
    if session.session_id in daemon.base_decoder().sessions:
        raise DaemonError(
            f"session {session.session_id!r} is already known to {base.name}; name the new "
            "session differently ('session')",
            409,
        )
    lo, hi = session.domain
    if hi - lo < 5.0 or len(session.behavior[output].timestamps) < 20:
        raise DaemonError(
            f"calibration data spans {hi - lo:.1f} s with "
            f"{len(session.behavior[output].timestamps)} behaviour samples: need >= 5 s and 20",
            422,
        )
    spec = JobSpec(
        session=session, output=output, base_model=str(base), out_dir=str(out_dir), name=name,
        steps=body.steps, holdout=body.holdout, refit=body.refit,
    )  # fmt: skip
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    return manager.submit(spec, body.source, body.auto_apply).public()


@router.get("", response_model=list[CalibrationPublic])
def list_jobs(request: Request) -> list[dict]:
    return [j.public() for j in _manager(request).jobs.values()]


@router.get("/{job_id}", response_model=CalibrationPublic)
def get(job_id: str, request: Request) -> dict:
    """State, progress, loss, held-out R² on the last 20% next to a Wiener filter."""
    return _manager(request).get(job_id).public()


@router.delete("/{job_id}", response_model=CalibrationPublic, dependencies=[Authorized])
def cancel(job_id: str, request: Request) -> dict:
    """Cancel a running job (the running decoder is untouched)."""
    return _manager(request).cancel(job_id).public()


@router.post("/{job_id}/apply", response_model=CalibrationPublic, dependencies=[Authorized])
def apply(job_id: str, request: Request) -> dict:
    """Swap the calibration's unit and session embeddings into the running decoder
    between two steps."""
    return _manager(request).apply(job_id).public()


def make_manager(daemon: Daemon) -> CalibrationManager:
    return CalibrationManager(lambda job: daemon.load_model(daemon.model_name, job.name))
