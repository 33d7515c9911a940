"""Health, status, metrics, start/stop and model loading."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from bci_decoder.api.deps import Authorized, DaemonDep
from bci_decoder.api.errors import error_responses
from bci_decoder.api.metrics import prometheus_text
from bci_decoder.api.schemas import Health, ModelLoad, ModelPublic, StateReply

router = APIRouter()


@router.get("/health", response_model=Health, tags=["status"])
def health(daemon: DaemonDep) -> Health:
    """Liveness: the server answers and the daemon exists."""
    return Health(ok=True, state=daemon.state)


@router.get("/status", tags=["status"])
def get_status(daemon: DaemonDep) -> dict:
    """State machine (idle, waiting-for-stream, running, stalled), model, cadence,
    latency percentiles, buffer fill, dropped and late samples, unknown units."""
    return daemon.status()


@router.get("/metrics", response_class=PlainTextResponse, tags=["status"])
def metrics(daemon: DaemonDep) -> str:
    """Prometheus text exposition of the counters in /status."""
    return prometheus_text(daemon.status())


@router.post("/decoder/start", response_model=StateReply, dependencies=[Authorized],
             tags=["decoder"], responses=error_responses(401, 403, 409))  # fmt: skip
def start(daemon: DaemonDep) -> StateReply:
    """Open the streams and decode at cadence (idempotent)."""
    return StateReply(state=daemon.start())


@router.post("/decoder/stop", response_model=StateReply, dependencies=[Authorized],
             tags=["decoder"], responses=error_responses(401, 403))  # fmt: skip
def stop(daemon: DaemonDep) -> StateReply:
    """Stop decoding and close the streams (the output stream stays declared)."""
    return StateReply(state=daemon.stop())


@router.get("/model", response_model=ModelPublic, tags=["model"])
def get_model(daemon: DaemonDep) -> dict:
    return daemon.describe_model()


@router.put("/model", response_model=ModelPublic, dependencies=[Authorized], tags=["model"],
            responses=error_responses(401, 403, 404, 409, 413, 422, 503))  # fmt: skip
def put_model(body: ModelLoad, daemon: DaemonDep) -> dict:
    """Load a model (by name from the models folder, optionally one of its stored
    calibrations); a running decoder switches between two steps."""
    return daemon.load_model(body.name, body.calibration)
