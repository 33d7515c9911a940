"""Dependencies: the daemon, its settings and the bearer-token check, as ``Annotated``
aliases so routes stay short and tests can override them."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bci_decoder.runtime.daemon import Daemon

_bearer = HTTPBearer(auto_error=False)


def get_daemon(request: Request) -> Daemon:
    return request.app.state.daemon


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Mutating calls carry ``Authorization: Bearer <token>``."""
    if creds is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this call changes the decoder: send 'Authorization: Bearer <token>' "
            "(the token is in the serve config, $BCI_DECODER_TOKEN or <state_dir>/token)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(creds.credentials, request.app.state.token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")


DaemonDep = Annotated[Daemon, Depends(get_daemon)]
Authorized = Depends(require_token)
