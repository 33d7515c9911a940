"""One error body for every 4xx/5xx the API sends, declared in the OpenAPI document.

FastAPI documents 422 as ``{"detail": [ValidationError, ...]}`` while ``HTTPException``
sends ``{"detail": "text"}``: a client (or schemathesis) reading the schema was told the
wrong shape. Here every error is ``ErrorReply``: ``detail`` is always the message to read
(what to fix), ``errors`` lists the fields at fault for a validation error. Each route
declares the codes it can return (``error_responses``).
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

DESCRIPTIONS = {
    400: "Malformed request",
    401: "No bearer token: this call changes the decoder",
    403: "Wrong bearer token",
    404: "No such model, calibration or job",
    409: "Conflicts with the daemon's state (busy, idle, name taken)",
    413: "Request body over api.max_body_mb (bytes received, chunked too)",
    422: "Invalid input; 'detail' says what to fix, 'errors' which fields",
    503: "The decode loop did not take the new engine in time",
}


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(default_factory=list)  # where: ["body", "name"]
    msg: str
    type: str


class ErrorReply(BaseModel):
    detail: str  # the message: what is wrong and what to do
    errors: list[ErrorItem] = Field(default_factory=list)  # validation errors by field


def error_responses(*codes: int) -> dict[int | str, dict]:
    return {c: {"model": ErrorReply, "description": DESCRIPTIONS[c]} for c in codes}


def validation_items(errors: list[dict]) -> list[dict]:
    """pydantic's errors as JSON-safe ``ErrorItem`` dicts."""
    return [
        {
            "loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors[:50]
    ]


def validation_reply(errors: list[dict], status: int = 422) -> JSONResponse:
    items = validation_items(errors)
    text = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in items[:10])
    return JSONResponse(
        {"detail": f"invalid request: {text}"[:2000], "errors": items}, status_code=status
    )


def install(app: FastAPI) -> None:
    """Exception handlers that answer every error as an ``ErrorReply``."""
    from bci_decoder.runtime.daemon import DaemonError  # (the upload worker imports this
    # module and must not import the daemon, which imports torch)

    @app.exception_handler(DaemonError)
    async def _daemon_error(request: Request, exc: DaemonError) -> JSONResponse:
        body = {"detail": str(exc), "errors": getattr(exc, "errors", None) or []}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.detail), "errors": []},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_reply(list(exc.errors()))
