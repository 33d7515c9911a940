"""The FastAPI application: the daemon is created in ``lifespan`` and handed to routes as
a dependency; ``create_app`` takes the settings so tests build their own."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from bci_decoder.api import errors
from bci_decoder.api.body_limit import BodyLimit
from bci_decoder.api.routes import calibrations, control, page
from bci_decoder.api.schemas import CalibrationCreate
from bci_decoder.api.uploads import UploadParser
from bci_decoder.runtime.calibration_jobs import remove_partial
from bci_decoder.runtime.daemon import CALIBRATIONS, Daemon
from bci_decoder.serve_config import ServeConfig

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The upload parsing worker is spawned this long after the daemon is built, not during
# start-up: its spawn and imports took ~60 ms of start to ready on 2 busy cores
# (benchmarks/serve_startup.py). An upload before then spawns it (UploadParser.pool).
UPLOAD_WORKER_AFTER_S = 1.0


def resolve_token(cfg: ServeConfig) -> str:
    """The bearer token: config, else $BCI_DECODER_TOKEN, else a new random one written
    to <state_dir>/token (mode 600) so local tools can read it."""
    token = cfg.api.token or os.environ.get("BCI_DECODER_TOKEN")
    if token:
        if len(token) < 8:
            raise ValueError("the API token must have at least 8 characters")
        return token
    if cfg.api.host not in LOOPBACK:
        raise ValueError(
            f"serving on {cfg.api.host} (not loopback) needs an explicit token: set api.token "
            "or $BCI_DECODER_TOKEN"
        )
    path = Path(cfg.state_dir) / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token


def create_app(cfg: ServeConfig, daemon: Daemon | None = None) -> FastAPI:
    token = resolve_token(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        d = daemon or Daemon(cfg)
        app.state.daemon = d
        for gone in remove_partial(d.model_dir / CALIBRATIONS):
            log.warning("removed %s, left by a calibration that did not finish", gone)
        app.state.calibrations = calibrations.make_manager(d)
        app.state.uploads = UploadParser()
        warm = asyncio.get_running_loop().call_later(
            UPLOAD_WORKER_AFTER_S, app.state.uploads.warm_up
        )  # spawned before the first upload, not on it
        if cfg.autostart:
            d.start()
        try:
            yield
        finally:
            warm.cancel()
            app.state.calibrations.close()
            app.state.uploads.close()
            d.close()

    app = FastAPI(
        title="bci_decoder",
        summary="Real-time spike-token decoding: control, status and calibration.",
        lifespan=lifespan,
    )
    app.state.token = token
    app.state.config = cfg

    errors.install(app)  # every error is an ErrorReply, as the OpenAPI document says
    # counts the bytes received, chunked bodies too (the limit is read per request)
    app.add_middleware(BodyLimit, max_bytes=lambda: cfg.api.max_body_mb * 2**20)

    app.include_router(control.router)
    app.include_router(calibrations.router)
    app.include_router(page.router)

    def openapi() -> dict:
        """FastAPI's document plus the schemas of bodies parsed outside FastAPI."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                              routes=app.routes)  # fmt: skip
            comps = doc.setdefault("components", {}).setdefault("schemas", {})
            ref = "#/components/schemas/{model}"
            extra = CalibrationCreate.model_json_schema(ref_template=ref)
            comps.update(extra.pop("$defs", {}))
            comps["CalibrationCreate"] = extra
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app
