"""``/v1/projects``: projects and their tokens, for admin tokens only."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from sqlalchemy.orm import Session

from schemas.projects import (
    ProjectCreateSchema,
    ProjectListSchema,
    ProjectSchema,
    ProjectUpdateSchema,
    TokenCreateSchema,
    TokenListSchema,
    TokenSchema,
)
from service.api.auth import require_admin
from service.api.errors import abort
from service.extension import services
from service.models import Project
from service.projects import (
    ProjectNameTaken,
    create_project,
    create_token,
    list_projects,
    list_tokens,
    project_resource,
    revoke_token,
    rotate_webhook_secret,
    set_modelslab_key,
    token_resource,
)

blp = Blueprint(
    "projects",
    __name__,
    url_prefix="/v1/projects",
    description="Projects and their API tokens (admin tokens only)",
)
blp.before_request(require_admin)
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


def load_project(session: Session, project_id: str) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        abort(404, message=f"project {project_id} not found")
    return project


@blp.post("")
@blp.doc(security=SECURITY)
@blp.arguments(ProjectCreateSchema)
@blp.response(201, ProjectSchema)
@blp.alt_response(409, description="The name is taken")
def create(params: dict[str, Any]) -> dict[str, Any]:
    """Create a project; its per-job webhook secret is shown here once."""
    svc = services()
    with svc.db.transaction() as session:
        try:
            project = create_project(session, params["name"])
        except ProjectNameTaken:
            abort(409, message=f"name: a project named {params['name']!r} already exists")
        set_modelslab_key(project, params["modelslab_api_key"], svc.settings.modelslab_api_key)
        return project_resource(project, webhook_secret=project.secret)


@blp.patch("/<string:project_id>")
@blp.doc(security=SECURITY)
@blp.arguments(ProjectUpdateSchema)
@blp.response(200, ProjectSchema)
def update(params: dict[str, Any], project_id: str) -> dict[str, Any]:
    """Set the project's own ModelsLab key (null: use the instance's); shown back masked."""
    svc = services()
    with svc.db.transaction() as session:
        project = load_project(session, project_id)
        set_modelslab_key(project, params["modelslab_api_key"], svc.settings.modelslab_api_key)
        return project_resource(project)


@blp.get("")
@blp.doc(security=SECURITY)
@blp.response(200, ProjectListSchema)
def list_all() -> dict[str, Any]:
    """List projects, oldest first."""
    with services().db.transaction() as session:
        return {"items": [project_resource(project) for project in list_projects(session)]}


@blp.post("/<string:project_id>/rotate-webhook-secret")
@blp.doc(security=SECURITY)
@blp.response(200, ProjectSchema)
def rotate(project_id: str) -> dict[str, Any]:
    """Issue a new per-job webhook secret; the old one keeps signing alongside for 24 hours."""
    svc = services()
    with svc.db.transaction() as session:
        project = load_project(session, project_id)
        secret = rotate_webhook_secret(project, svc.settings.webhook_secret)
        return project_resource(project, webhook_secret=secret)


@blp.post("/<string:project_id>/tokens")
@blp.doc(security=SECURITY)
@blp.arguments(TokenCreateSchema)
@blp.response(201, TokenSchema)
def create_project_token(params: dict[str, Any], project_id: str) -> dict[str, Any]:
    """Issue a token of the project; its value is shown here once and stored hashed."""
    with services().db.transaction() as session:
        project = load_project(session, project_id)
        token, value = create_token(session, project, params["scope"], params["description"])
        return token_resource(token, value=value)


@blp.get("/<string:project_id>/tokens")
@blp.doc(security=SECURITY)
@blp.response(200, TokenListSchema)
def list_project_tokens(project_id: str) -> dict[str, Any]:
    """List the project's tokens (never their values)."""
    with services().db.transaction() as session:
        project = load_project(session, project_id)
        return {"items": [token_resource(token) for token in list_tokens(session, project)]}


@blp.delete("/<string:project_id>/tokens/<string:token_id>")
@blp.doc(security=SECURITY)
@blp.response(204)
def revoke(project_id: str, token_id: str) -> None:
    """Revoke a token; it stops working at once."""
    with services().db.transaction() as session:
        if not revoke_token(session, load_project(session, project_id), token_id):
            abort(404, message=f"token {token_id} not found in project {project_id}")
