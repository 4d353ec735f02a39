"""Making projects and tokens straight in the database, for tests of isolation and scopes."""

from __future__ import annotations

from dataclasses import dataclass

from service.bearer import token_hash
from service.db import Database
from service.models import ApiToken, Project, new_id, utcnow
from service.projects import create_project, create_token


@dataclass(frozen=True)
class Tenant:
    project_id: str
    webhook_secret: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def add_project(db: Database, name: str, scope: str = "write", token: str | None = None) -> Tenant:
    """Create project ``name`` with one token of ``scope``: a fresh one, or ``token``."""
    with db.transaction() as session:
        project = create_project(session, name)
        assert project.secret is not None
        if token is None:
            token = create_token(session, project, scope)[1]
        else:
            session.add(
                ApiToken(
                    id=new_id("tok"),
                    project_id=project.id,
                    scope=scope,
                    token_hash=token_hash(token),
                    created_at=utcnow(),
                )
            )
        return Tenant(project.id, project.secret, token)


def add_token(db: Database, project_id: str, scope: str) -> str:
    """Issue another token of an existing project; return its value."""
    with db.transaction() as session:
        project = session.get(Project, project_id)
        assert project is not None
        return create_token(session, project, scope)[1]
