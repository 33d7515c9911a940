"""Calibration jobs: POST /calibrations, GET/DELETE /calibrations/{id}, POST .../apply."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from pathlib import Path

from fastapi import APIRouter, Request, status
from starlette.concurrency import run_in_threadpool

from bci_decoder.api.deps import Authorized, DaemonDep
from bci_decoder.api.errors import error_responses
from bci_decoder.api.schemas import CalibrationPublic
from bci_decoder.api.uploads import parse_upload, summarize
from bci_decoder.runtime.calibration_jobs import CalibrationManager, JobSpec
from bci_decoder.runtime.daemon import CALIBRATIONS, Daemon, DaemonError

router = APIRouter(prefix="/calibrations", tags=["calibration"])


def _manager(request: Request) -> CalibrationManager:
    return request.app.state.calibrations


def _default_name(hint: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", hint or "session")[:60].lstrip("-_.") or "session"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


# a body this small (a buffer request) parses in microseconds, so it never waits for the
# worker (whose spawn can take tens of seconds on a loaded machine)
SMALL_BODY = 64 * 1024

# the body is parsed in the upload worker (api/uploads.py), not by FastAPI, so the route
# declares its schema itself (app.py adds CalibrationCreate to the components)
CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/CalibrationCreate"}}
        },
    }
}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=CalibrationPublic,
             dependencies=[Authorized], openapi_extra=CREATE_BODY,
             responses=error_responses(401, 403, 409, 413, 422, 503))  # fmt: skip
async def create(request: Request, daemon: DaemonDep) -> dict:
    """Start a calibration job (202 + its id) from a ``CalibrationCreate`` body. Poll
    ``GET /calibrations/{id}``.

    The body is streamed to a file and parsed in a worker process (JSON, base64, NWB),
    so a large upload never holds the GIL the decode loop needs."""
    folder = Path(daemon.cfg.state_dir) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    fd, body_path = tempfile.mkstemp(dir=folder, suffix=".json")
    session_path = body_path[: -len(".json")] + ".session.pkl"
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():  # BodyLimit counts these
                f.write(chunk)
    except BaseException:
        Path(body_path).unlink(missing_ok=True)
        raise
    if os.path.getsize(body_path) <= SMALL_BODY:  # microseconds to parse: no worker trip
        reply = await run_in_threadpool(parse_upload, body_path, session_path)
    else:
        reply = await asyncio.wrap_future(request.app.state.uploads.submit(body_path, session_path))
    if "status" in reply:
        Path(session_path).unlink(missing_ok=True)
        raise DaemonError(reply["detail"], reply["status"], errors=reply.get("errors"))
    try:
        return await run_in_threadpool(_start_job, daemon, _manager(request), reply, session_path)
    except BaseException:
        Path(session_path).unlink(missing_ok=True)
        raise


def _start_job(daemon: Daemon, manager: CalibrationManager, reply: dict, path: str) -> dict:
    """The checks that need the daemon (model outputs, names), then the job."""
    body, summary = reply["body"], reply["summary"]
    model_outputs = daemon.package.output_names
    if body["output"] is not None and body["output"] not in model_outputs:
        raise DaemonError(
            f"output {body['output']!r} is not one the model decodes: {model_outputs}", 422
        )
    mode = body.get("mode", "supervised")
    labels = mode == "supervised"
    if not labels and not daemon.base_package().spec["config"].get("mtm_head"):
        raise DaemonError(
            f"model {daemon.model_name} has no masked readout (MtM head), which label-free "
            "calibration needs: train it with mtm.enabled, or give it one with "
            "`bci-decoder mtm-head`; or calibrate with labels (mode 'supervised')",
            422,
        )
    session = None
    if body["source"] == "buffer":
        session, output, hint = daemon.calibration_block(body["seconds"], body["output"], labels)
        summary = summarize(session) | {"output": output, "hint": hint}
        path = None
    output, hint = summary["output"], summary["hint"]
    if not labels and output is None:  # an upload without behaviour: the model's first
        output = summary["output"] = model_outputs[0]
    if labels and output not in summary["behavior"]:
        raise DaemonError(
            f"the upload has no behaviour {output!r}: {list(summary['behavior'])}", 422
        )
    if output not in model_outputs:
        raise DaemonError(f"output {output!r} is not one the model decodes: {model_outputs}", 422)
    if labels:
        dim, got = daemon.package.output_dims[output], summary["behavior"][output]["dim"]
        if got != dim:
            raise DaemonError(
                f"behaviour {output!r} has {got} channels; the model's head has {dim}", 422
            )
    name = body["name"] or _default_name(hint)
    summary["session_id"] = body["session"] or name
    if session is not None:
        session.session_id = summary["session_id"]
    base = daemon.model_dir
    out_dir = base / CALIBRATIONS / name
    if out_dir.exists():
        raise DaemonError(
            f"model {base.name} already has a calibration {name!r}; pick another name", 409
        )
    if summary["session_id"] in daemon.base_package().sessions:
        raise DaemonError(
            f"session {summary['session_id']!r} is already known to {base.name}; name the new "
            "session differently ('session')",
            409,
        )
    lo, hi = summary["domain"]
    if labels:
        samples = summary["behavior"][output]["samples"]
        if hi - lo < 5.0 or samples < 20:
            raise DaemonError(
                f"calibration data spans {hi - lo:.1f} s with {samples} behaviour samples: need "
                ">= 5 s and 20",
                422,
            )
    elif hi - lo < 5.0 or summary["spikes"] == 0:
        raise DaemonError(
            f"calibration data spans {hi - lo:.1f} s with {summary['spikes']} spikes: label-free "
            "calibration needs >= 5 s of spiking",
            422,
        )
    spec = JobSpec(
        session=session, output=output, base_model=str(base), out_dir=str(out_dir), name=name,
        steps=body["steps"], holdout=body["holdout"], refit=body["refit"], session_path=path,
        summary=summary, mode=mode, adapt=body.get("adapt", "auto"),
        sched_idle=daemon.cfg.calibration_priority == "idle",
    )  # fmt: skip
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    return manager.submit(spec, body["source"], body["auto_apply"]).public()


@router.get("", response_model=list[CalibrationPublic])
def list_jobs(request: Request) -> list[dict]:
    return [j.public() for j in _manager(request).jobs.values()]


@router.get("/{job_id}", response_model=CalibrationPublic, responses=error_responses(404, 422))
def get(job_id: str, request: Request) -> dict:
    """State, progress, loss, held-out R² on the last 20% next to a Wiener filter, and
    which stage was stored (unit identification or the second stage) with the slice R²
    of each."""
    return _manager(request).get(job_id).public()


@router.delete("/{job_id}", response_model=CalibrationPublic, dependencies=[Authorized],
               responses=error_responses(401, 403, 404, 422))  # fmt: skip
def cancel(job_id: str, request: Request) -> dict:
    """Cancel a running job (the running decoder is untouched)."""
    return _manager(request).cancel(job_id).public()


@router.post("/{job_id}/apply", response_model=CalibrationPublic, dependencies=[Authorized],
             responses=error_responses(401, 403, 404, 409, 422, 503))  # fmt: skip
def apply(job_id: str, request: Request) -> dict:
    """Serve the calibration from the next step on: its unit and session embeddings
    swapped into the running engine, or, for a kept second stage (``stage``
    "second-stage", graphs of its own), a new engine built and primed beside the running
    one and handed over between two steps."""
    return _manager(request).apply(job_id).public()


def make_manager(daemon: Daemon) -> CalibrationManager:
    return CalibrationManager(
        lambda job: daemon.load_model(daemon.model_name, job.name), events=daemon.record_event
    )
