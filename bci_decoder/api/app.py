"""The FastAPI application: the daemon is created in ``lifespan`` and handed to routes as
a dependency; ``create_app`` takes the settings so tests build their own."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bci_decoder.api.routes import calibrations, control, page
from bci_decoder.config import ServeConfig
from bci_decoder.runtime.daemon import Daemon, DaemonError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        app.state.calibrations = calibrations.make_manager(d)
        if cfg.autostart:
            d.start()
        try:
            yield
        finally:
            app.state.calibrations.close()
            d.close()

    app = FastAPI(
        title="bci_decoder",
        summary="Real-time spike-token decoding: control, status and calibration.",
        lifespan=lifespan,
    )
    app.state.token = token
    app.state.config = cfg

    @app.exception_handler(DaemonError)
    async def _daemon_error(request: Request, exc: DaemonError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.api.max_body_mb * 2**20:
            return JSONResponse(
                {"detail": f"request body over {cfg.api.max_body_mb} MB; send less data"},
                status_code=413,
            )
        return await call_next(request)

    app.include_router(control.router)
    app.include_router(calibrations.router)
    app.include_router(page.router)
    return app
