"""Bearer-token authentication, scopes, and keeping each client inside its project.

The request's token is resolved once (:func:`current_principal`) and kept in ``g``;
the rate limiter keys on it too. Client blueprints call :func:`require_client`,
the admin blueprint :func:`require_admin`. Another project's row answers 404, as
a row that does not exist does: a token learns nothing of other projects.
"""

from __future__ import annotations

from typing import TypeVar

from flask import g, request
from sqlalchemy.orm import Session

from service.api.errors import abort
from service.bearer import bearer_token
from service.extension import services
from service.models import Delivery, Job, Subscription
from service.projects import ADMIN, READ, Principal, resolve_token

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UNAUTHORIZED = "missing or invalid bearer token (Authorization: Bearer <token>)"

Owned = TypeVar("Owned", Job, Subscription, Delivery)


def current_principal() -> Principal | None:
    """Whom this request's bearer token speaks for (looked up once per request)."""
    if "motionhook_principal" not in g:
        token = bearer_token(request.headers.get("Authorization"))
        settings = services().settings
        g.motionhook_principal = (
            None
            if token is None
            else resolve_token(
                services().db,
                token,
                api_tokens=settings.api_tokens,
                admin_tokens=settings.admin_tokens,
            )
        )
    principal: Principal | None = g.motionhook_principal
    return principal


def _authenticated() -> Principal:
    principal = current_principal()
    if principal is None:
        abort(401, message=UNAUTHORIZED)
    return principal


def require_client() -> None:
    """Admit a project's token: ``read`` only to read, ``write`` to everything."""
    principal = _authenticated()
    if principal.scope == ADMIN:
        abort(403, message="admin tokens manage projects and tokens; use a project's token here")
    if principal.scope == READ and request.method not in READ_METHODS:
        abort(403, message="this token has the read scope; changes need a write token")


def require_admin() -> None:
    """Admit only admin tokens (projects and tokens are managed with them)."""
    if _authenticated().scope != ADMIN:
        abort(403, message="this endpoint needs an admin token")


def client_project() -> str:
    """The id of the project the request's (client) token belongs to."""
    principal = _authenticated()
    assert principal.project_id is not None, "require_client admits project tokens only"
    return principal.project_id


def owned(
    session: Session, model: type[Owned], row_id: str, noun: str, *, lock: bool = False
) -> Owned:
    """Load one of the client's project's rows, or answer 404 (also for other projects')."""
    row = session.get(model, row_id, with_for_update=True if lock else None)
    if row is None or row.project_id != client_project():
        abort(404, message=f"{noun} {row_id} not found")
    return row
