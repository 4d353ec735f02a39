"""Projects and their tokens: who a bearer token speaks for, and what it may do.

A client token belongs to one project and reaches only that project's rows. Scopes:
``read`` (GET only), ``write`` (everything a client does), ``admin`` (projects and
tokens; an admin token is a client of no project). Tokens from the database are
stored as their SHA-256 and shown once, on create; ``MOTIONHOOK_API_TOKENS`` are
``write`` tokens of project ``default`` and ``MOTIONHOOK_ADMIN_TOKENS`` are admin.

A project may bring its own ModelsLab key: its jobs are then submitted and fetched
with it, on that account's queued-request cap. The key is never shown back whole.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.bearer import is_one_of, token_hash
from service.capacity import account_of
from service.db import Database
from service.jobs import isoformat
from service.models import DEFAULT_PROJECT_ID, ApiToken, Job, Project, new_id, utcnow
from service.notifiers.webhook import generate_secret
from service.subscriptions import MASK, rotate_secret

DEFAULT_PROJECT = "default"
READ, WRITE, ADMIN = "read", "write", "admin"
SCOPES = (READ, WRITE, ADMIN)
TOKEN_PREFIX = "mh_"
# A masked key keeps this many of its last characters, enough to recognise it.
KEY_SHOWN = 4


class ProjectNameTaken(Exception):
    """Another project already has this name."""


@dataclass(frozen=True)
class Principal:
    """Who a request's bearer token speaks for."""

    scope: str
    # The one project a client token reaches; None for admin tokens.
    project_id: str | None
    # Names the token without revealing it (rate-limit keys): a prefix of its hash.
    fingerprint: str


def resolve_token(
    db: Database, token: str, *, api_tokens: tuple[str, ...], admin_tokens: tuple[str, ...]
) -> Principal | None:
    """Return whom ``token`` speaks for, or None when it is no valid token.

    Configured tokens are compared in constant time and never touch the database;
    any other is looked up by its hash, so a revoked token stops working at once.
    """
    fingerprint = token_hash(token)[:32]
    if is_one_of(token, admin_tokens):
        return Principal(ADMIN, None, fingerprint)
    if is_one_of(token, api_tokens):
        return Principal(WRITE, DEFAULT_PROJECT_ID, fingerprint)
    return _stored_token(db, token_hash(token))


def resolve_token_hash(
    db: Database, digest: str, *, api_tokens: tuple[str, ...], admin_tokens: tuple[str, ...]
) -> Principal | None:
    """:func:`resolve_token` for a token known only by its hash (the dashboard's session)."""
    if is_one_of(digest, [token_hash(token) for token in admin_tokens]):
        return Principal(ADMIN, None, digest[:32])
    if is_one_of(digest, [token_hash(token) for token in api_tokens]):
        return Principal(WRITE, DEFAULT_PROJECT_ID, digest[:32])
    return _stored_token(db, digest)


def _stored_token(db: Database, digest: str) -> Principal | None:
    with db.transaction() as session:
        row = session.execute(
            select(ApiToken.scope, ApiToken.project_id).where(ApiToken.token_hash == digest)
        ).first()
    if row is None:
        return None
    scope, project_id = row
    return Principal(scope, None if scope == ADMIN else project_id, digest[:32])


def project_resource(project: Project, *, webhook_secret: str | None = None) -> dict[str, Any]:
    """Render a project; its webhook secret only when just created or rotated, its own
    ModelsLab key (masked) only when it has one."""
    resource: dict[str, Any] = {
        "id": project.id,
        "name": project.name,
        "created_at": isoformat(project.created_at),
    }
    if webhook_secret is not None:
        resource["webhook_secret"] = webhook_secret
    if project.modelslab_api_key is not None:
        resource["modelslab_api_key"] = mask_key(project.modelslab_api_key)
    return resource


def mask_key(key: str) -> str:
    """Show a ModelsLab key as ``***`` and its last characters (only ``***`` if short)."""
    return MASK + (key[-KEY_SHOWN:] if len(key) >= 4 * KEY_SHOWN else "")


def set_modelslab_key(project: Project, key: str | None, instance_key: str) -> None:
    """Give the project its own ModelsLab key (None: back to the instance's key).

    Jobs already at ModelsLab keep the slot they hold on their account; the next
    submit and fetch of every job of the project use the new key.
    """
    project.modelslab_api_key = key
    project.modelslab_account = account_of(key, instance_key)
    project.updated_at = utcnow()


def job_api_key(session: Session, job_id: str) -> str | None:
    """The own ModelsLab key of the job's project, or None when it uses the instance's."""
    return session.scalar(
        select(Project.modelslab_api_key)
        .join(Job, Job.project_id == Project.id)
        .where(Job.id == job_id)
    )


def token_resource(token: ApiToken, *, value: str | None = None) -> dict[str, Any]:
    """Render a token; its value only on create (it is not stored)."""
    resource: dict[str, Any] = {
        "id": token.id,
        "scope": token.scope,
        "description": token.description,
        "created_at": isoformat(token.created_at),
    }
    if value is not None:
        resource["token"] = value
    return resource


def create_project(session: Session, name: str) -> Project:
    """Insert a project with a fresh per-job webhook secret; raise ProjectNameTaken."""
    if find_project(session, name) is not None:
        raise ProjectNameTaken(name)
    now = utcnow()
    project = Project(
        id=new_id("prj"), name=name, secret=generate_secret(), created_at=now, updated_at=now
    )
    session.add(project)
    try:
        session.flush()
    except IntegrityError:
        # Another request created the same name between our check and insert.
        raise ProjectNameTaken(name) from None
    return project


def find_project(session: Session, name: str) -> Project | None:
    return session.scalars(select(Project).where(Project.name == name)).first()


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.created_at, Project.id)))


def rotate_webhook_secret(project: Project, configured_secret: str) -> str:
    """Give the project a new per-job webhook secret; the old one signs alongside for 24 h.

    ``default`` signs with ``MOTIONHOOK_WEBHOOK_SECRET`` (``configured_secret``) until
    its first rotation, so that is the secret which keeps signing for the overlap.
    """
    if project.secret is None:
        project.secret = configured_secret
    return rotate_secret(project)


def create_token(
    session: Session, project: Project, scope: str, description: str = ""
) -> tuple[ApiToken, str]:
    """Issue a token of ``project``; return the row and the value, which is not stored."""
    value = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        id=new_id("tok"),
        project_id=project.id,
        scope=scope,
        description=description,
        token_hash=token_hash(value),
        created_at=utcnow(),
    )
    session.add(token)
    return token, value


def list_tokens(session: Session, project: Project) -> list[ApiToken]:
    return list(
        session.scalars(
            select(ApiToken)
            .where(ApiToken.project_id == project.id)
            .order_by(ApiToken.created_at, ApiToken.id)
        )
    )


def revoke_token(session: Session, project: Project, token_id: str) -> bool:
    """Delete one of the project's tokens; False when it has no such token."""
    token = session.get(ApiToken, token_id)
    if token is None or token.project_id != project.id:
        return False
    session.delete(token)
    return True
