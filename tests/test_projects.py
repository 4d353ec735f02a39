"""Projects and scoped tokens through the HTTP API.

Two projects side by side: every client endpoint answers project B's token on
project A's resource with 404 and changes nothing; lists show only one's own rows;
the admin API needs an admin token; env tokens are ``write`` tokens of ``default``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text

from service.extension import Services
from service.models import DEFAULT_PROJECT_ID, ApiToken, Delivery, Job, Project, Subscription
from tests.tenants import Tenant, add_project, add_token

ADMIN_TOKEN = "admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMAGE = {"init_image": "https://example.com/a.png"}
# Nothing is delivered in these tests; loopback targets are allowed (see below).
TARGET = "http://127.0.0.1:9/in"


@pytest.fixture(autouse=True)
def loopback_targets(services: Services) -> None:
    services.settings = replace(services.settings, allow_private_targets=True)


@pytest.fixture
def admin(services: Services) -> Services:
    services.settings = replace(services.settings, admin_tokens=(ADMIN_TOKEN,))
    return services


@pytest.fixture
def alpha(services: Services) -> Tenant:
    return add_project(services.db, "alpha")


@pytest.fixture
def beta(services: Services) -> Tenant:
    return add_project(services.db, "beta")


def created(response: Any, status: int = 201) -> dict[str, Any]:
    assert response.status_code == status, response.get_json()
    body: dict[str, Any] = response.get_json()
    return body


# -- the admin API ------------------------------------------------------------------------


@pytest.mark.usefixtures("admin")
def test_admin_creates_a_project_and_a_token_that_works_at_once(client: FlaskClient) -> None:
    project = created(client.post("/v1/projects", json={"name": "alpha"}, headers=ADMIN))
    assert set(project) == {"id", "name", "created_at", "webhook_secret"}
    assert project["name"] == "alpha" and project["webhook_secret"].startswith("whsec_")
    listed = client.get("/v1/projects", headers=ADMIN).get_json()["items"]
    assert {"default", "alpha"} == {item["name"] for item in listed}
    assert all("webhook_secret" not in item for item in listed)

    url = f"/v1/projects/{project['id']}/tokens"
    token = created(client.post(url, json={"scope": "write", "description": "ci"}, headers=ADMIN))
    assert set(token) == {"id", "token", "scope", "description", "created_at"}
    assert token["scope"] == "write" and token["description"] == "ci"
    bearer = {"Authorization": f"Bearer {token['token']}"}
    assert client.get("/v1/jobs", headers=bearer).status_code == 200

    tokens = client.get(url, headers=ADMIN).get_json()["items"]
    assert [item["id"] for item in tokens] == [token["id"]]
    assert "token" not in tokens[0]


@pytest.mark.usefixtures("admin")
def test_a_revoked_token_stops_working_at_once(client: FlaskClient, alpha: Tenant) -> None:
    url = f"/v1/projects/{alpha.project_id}/tokens"
    token = created(client.post(url, json={"scope": "read"}, headers=ADMIN))
    bearer = {"Authorization": f"Bearer {token['token']}"}
    assert client.get("/v1/jobs", headers=bearer).status_code == 200
    assert client.delete(f"{url}/{token['id']}", headers=ADMIN).status_code == 204
    assert client.get("/v1/jobs", headers=bearer).status_code == 401
    assert client.delete(f"{url}/{token['id']}", headers=ADMIN).status_code == 404


@pytest.mark.usefixtures("admin")
def test_a_token_is_revoked_only_through_its_own_project(
    client: FlaskClient, alpha: Tenant, beta: Tenant
) -> None:
    token = created(
        client.post(
            f"/v1/projects/{alpha.project_id}/tokens", json={"scope": "write"}, headers=ADMIN
        )
    )
    wrong = client.delete(f"/v1/projects/{beta.project_id}/tokens/{token['id']}", headers=ADMIN)
    assert wrong.status_code == 404
    assert (
        client.get("/v1/jobs", headers={"Authorization": f"Bearer {token['token']}"}).status_code
        == 200
    )


@pytest.mark.usefixtures("admin")
def test_a_taken_project_name_is_409_and_a_bad_one_422(client: FlaskClient) -> None:
    created(client.post("/v1/projects", json={"name": "alpha"}, headers=ADMIN))
    taken = client.post("/v1/projects", json={"name": "alpha"}, headers=ADMIN)
    assert taken.status_code == 409 and "alpha" in taken.get_json()["message"]
    assert client.post("/v1/projects", json={"name": "default"}, headers=ADMIN).status_code == 409
    for bad in (
        {"name": ""},
        {"name": "Has Spaces"},
        {"name": "x" * 65},
        {},
        {"name": "a", "x": 1},
    ):
        response = client.post("/v1/projects", json=bad, headers=ADMIN)
        assert response.status_code == 422, bad
    scope = client.post(
        f"/v1/projects/{DEFAULT_PROJECT_ID}/tokens", json={"scope": "root"}, headers=ADMIN
    )
    assert scope.status_code == 422 and "scope" in scope.get_json()["message"]


@pytest.mark.usefixtures("admin")
def test_an_unknown_project_is_404_on_every_admin_endpoint(client: FlaskClient) -> None:
    for method, path, body in [
        ("get", "/v1/projects/prj_nope/tokens", None),
        ("post", "/v1/projects/prj_nope/tokens", {"scope": "read"}),
        ("delete", "/v1/projects/prj_nope/tokens/tok_nope", None),
        ("post", "/v1/projects/prj_nope/rotate-webhook-secret", None),
    ]:
        response = getattr(client, method)(path, json=body, headers=ADMIN)
        assert response.status_code == 404, (method, path)


ADMIN_ENDPOINTS = [
    ("get", "/v1/projects", None),
    ("post", "/v1/projects", {"name": "sneaky"}),
    ("get", f"/v1/projects/{DEFAULT_PROJECT_ID}/tokens", None),
    ("post", f"/v1/projects/{DEFAULT_PROJECT_ID}/tokens", {"scope": "admin"}),
    ("delete", f"/v1/projects/{DEFAULT_PROJECT_ID}/tokens/tok_x", None),
    ("post", f"/v1/projects/{DEFAULT_PROJECT_ID}/rotate-webhook-secret", None),
]


@pytest.mark.usefixtures("admin")
def test_admin_endpoints_need_an_admin_token(
    client: FlaskClient, services: Services, auth: dict[str, str]
) -> None:
    read = {"Authorization": f"Bearer {add_token(services.db, DEFAULT_PROJECT_ID, 'read')}"}
    for method, path, body in ADMIN_ENDPOINTS:
        call = getattr(client, method)
        assert call(path, json=body).status_code == 401, path
        assert call(path, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        for headers in (auth, read):
            refused = call(path, json=body, headers=headers)
            assert refused.status_code == 403, (path, refused.get_json())
            assert "admin token" in refused.get_json()["message"]
    with services.db.transaction() as session:
        assert session.scalars(select(Project.name)).all() == ["default"]
        assert session.scalars(select(ApiToken.id)).all() == [read_token_id(session)]


def read_token_id(session: Any) -> str:
    return str(session.scalars(select(ApiToken.id).where(ApiToken.scope == "read")).one())


def test_a_database_admin_token_manages_projects_but_is_no_client(
    client: FlaskClient, services: Services
) -> None:
    token = {"Authorization": f"Bearer {add_token(services.db, DEFAULT_PROJECT_ID, 'admin')}"}
    assert client.get("/v1/projects", headers=token).status_code == 200
    for path in ("/v1/jobs", "/v1/subscriptions", "/v1/deliveries"):
        refused = client.get(path, headers=token)
        assert refused.status_code == 403 and "admin" in refused.get_json()["message"]


@pytest.mark.usefixtures("admin")
def test_an_admin_token_is_no_client_of_any_project(client: FlaskClient) -> None:
    for method, path in [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/subscriptions"),
        ("get", "/v1/deliveries"),
        ("get", "/v1/jobs/job_x"),
    ]:
        response = getattr(client, method)(path, json=IMAGE, headers=ADMIN)
        assert response.status_code == 403, path


# -- scopes and tokens -----------------------------------------------------------------------


def test_a_read_token_reads_but_cannot_change_anything(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    job = created(client.post("/v1/jobs", json=IMAGE, headers=alpha.auth), 202)
    read = {"Authorization": f"Bearer {add_token(services.db, alpha.project_id, 'read')}"}
    assert client.get(f"/v1/jobs/{job['id']}", headers=read).status_code == 200
    assert client.get("/v1/jobs", headers=read).get_json()["items"][0]["id"] == job["id"]
    for method, path, body in [
        ("post", "/v1/jobs", IMAGE),
        ("post", "/v1/subscriptions", {"kind": "webhook", "url": TARGET}),
        ("patch", "/v1/subscriptions/sub_x", {"description": "x"}),
        ("delete", "/v1/subscriptions/sub_x", None),
        ("post", "/v1/deliveries/dlv_x/retry", None),
    ]:
        refused = getattr(client, method)(path, json=body, headers=read)
        assert refused.status_code == 403, path
        assert "read scope" in refused.get_json()["message"]
    with services.db.transaction() as session:
        assert session.scalars(select(Job.id)).all() == [job["id"]]


def test_tokens_are_stored_only_as_their_sha256(services: Services, alpha: Tenant) -> None:
    with services.db.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_tokens")).all()
        dump = repr(rows)
    assert alpha.token not in dump
    assert hashlib.sha256(alpha.token.encode()).hexdigest() in dump


def test_env_tokens_are_write_tokens_of_default(
    client: FlaskClient, services: Services, auth: dict[str, str], alpha: Tenant
) -> None:
    job = created(client.post("/v1/jobs", json=IMAGE, headers=auth), 202)
    with services.db.transaction() as session:
        stored = session.get(Job, job["id"])
        assert stored is not None and stored.project_id == DEFAULT_PROJECT_ID
    default_read = {"Authorization": f"Bearer {add_token(services.db, DEFAULT_PROJECT_ID, 'read')}"}
    assert client.get(f"/v1/jobs/{job['id']}", headers=default_read).status_code == 200
    assert client.get(f"/v1/jobs/{job['id']}", headers=alpha.auth).status_code == 404


# -- isolation: project B on project A's resources -------------------------------------------


def alpha_resources(client: FlaskClient, alpha: Tenant) -> dict[str, str]:
    """A job, a webhook subscription and a delivery (its test ping) of project A."""
    job = created(client.post("/v1/jobs", json=IMAGE, headers=alpha.auth), 202)
    sub = created(
        client.post(
            "/v1/subscriptions", json={"kind": "webhook", "url": TARGET}, headers=alpha.auth
        )
    )
    ping = created(client.post(f"/v1/subscriptions/{sub['id']}/test", headers=alpha.auth), 202)
    return {"job": job["id"], "sub": sub["id"], "delivery": ping["delivery_id"]}


def foreign_calls(ids: dict[str, str]) -> list[tuple[str, str, dict[str, Any] | None]]:
    """Every client endpoint that names a resource, aimed at project A's resources."""
    sub, delivery, job = ids["sub"], ids["delivery"], ids["job"]
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    return [
        ("get", f"/v1/jobs/{job}", None),
        ("get", f"/v1/jobs/{job}/stream", None),
        ("get", f"/v1/subscriptions/{sub}", None),
        ("patch", f"/v1/subscriptions/{sub}", {"url": "http://127.0.0.1:8/evil", "enabled": False}),
        ("delete", f"/v1/subscriptions/{sub}", None),
        ("post", f"/v1/subscriptions/{sub}/rotate-secret", None),
        ("post", f"/v1/subscriptions/{sub}/test", None),
        ("post", f"/v1/subscriptions/{sub}/recover", {"since": since}),
        ("get", f"/v1/deliveries/{delivery}", None),
        ("post", f"/v1/deliveries/{delivery}/retry", None),
    ]


def snapshot(services: Services) -> dict[str, Any]:
    with services.db.transaction() as session:
        return {
            "jobs": [(j.id, j.status) for j in session.scalars(select(Job))],
            "subs": [
                (s.id, s.url, s.enabled, s.secret, s.previous_secret)
                for s in session.scalars(select(Subscription))
            ],
            "deliveries": [
                (d.id, d.status, d.due_at, d.project_id) for d in session.scalars(select(Delivery))
            ],
        }


def test_another_projects_token_gets_404_everywhere_and_changes_nothing(
    app: Flask, client: FlaskClient, services: Services, alpha: Tenant, beta: Tenant
) -> None:
    ids = alpha_resources(client, alpha)
    before = snapshot(services)
    calls = foreign_calls(ids)
    for method, path, body in calls:
        response = getattr(client, method)(path, json=body, headers=beta.auth)
        assert response.status_code == 404, (method, path, response.get_json())
        # The same answer as for an id that does not exist: no existence oracle.
        missing = getattr(client, method)(
            re.sub(r"(job|sub|dlv)_[a-z0-9]+", r"\1_doesnotexist", path),
            json=body,
            headers=beta.auth,
        )
        assert missing.status_code == 404
    assert snapshot(services) == before

    # Every client route with an id in it is in the list above.
    covered = {(m.upper(), re.sub(r"(job|sub|dlv)_[a-z0-9]+", "<id>", p)) for m, p, _ in calls}
    routes = {
        (method, re.sub(r"<[^>]+>", "<id>", rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(("/v1/jobs/", "/v1/subscriptions/", "/v1/deliveries/"))
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert routes <= covered, routes - covered


def test_lists_show_only_the_tokens_project(
    client: FlaskClient, alpha: Tenant, beta: Tenant
) -> None:
    ids = alpha_resources(client, alpha)
    for path in (
        "/v1/jobs",
        "/v1/subscriptions",
        "/v1/deliveries",
        f"/v1/deliveries?subscription_id={ids['sub']}",
        f"/v1/deliveries?job_id={ids['job']}",
    ):
        assert client.get(path, headers=beta.auth).get_json()["items"] == [], path
    assert [j["id"] for j in client.get("/v1/jobs", headers=alpha.auth).get_json()["items"]] == [
        ids["job"]
    ]
    assert len(client.get("/v1/deliveries", headers=alpha.auth).get_json()["items"]) == 1


def test_idempotency_keys_are_scoped_per_project(
    client: FlaskClient, services: Services, alpha: Tenant, beta: Tenant
) -> None:
    key = {"Idempotency-Key": "same-key"}
    first = created(client.post("/v1/jobs", json=IMAGE, headers={**alpha.auth, **key}), 202)
    other = created(
        client.post("/v1/jobs", json={**IMAGE, "prompt": "x"}, headers={**beta.auth, **key}), 202
    )
    assert first["id"] != other["id"]
    # Another token of the same project replays the same job.
    second = {"Authorization": f"Bearer {add_token(services.db, alpha.project_id, 'write')}"}
    replay = client.post("/v1/jobs", json=IMAGE, headers={**second, **key})
    assert replay.status_code == 200 and replay.get_json()["id"] == first["id"]


# -- limits and secrets ----------------------------------------------------------------------


def test_subscriptions_per_project_are_capped(
    client: FlaskClient, services: Services, alpha: Tenant, beta: Tenant
) -> None:
    services.settings = replace(services.settings, max_subscriptions_per_project=2)
    body = {"kind": "webhook", "url": TARGET}
    for _ in range(2):
        created(client.post("/v1/subscriptions", json=body, headers=alpha.auth))
    refused = client.post("/v1/subscriptions", json=body, headers=alpha.auth)
    assert refused.status_code == 409
    assert "MOTIONHOOK_MAX_SUBSCRIPTIONS_PER_PROJECT" in refused.get_json()["message"]
    created(client.post("/v1/subscriptions", json=body, headers=beta.auth))


@pytest.mark.usefixtures("admin")
def test_rotating_a_projects_webhook_secret_keeps_the_old_one_for_24_hours(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    rotated = client.post(f"/v1/projects/{alpha.project_id}/rotate-webhook-secret", headers=ADMIN)
    body = created(rotated, 200)
    assert (
        body["webhook_secret"].startswith("whsec_")
        and body["webhook_secret"] != alpha.webhook_secret
    )
    with services.db.transaction() as session:
        project = session.get(Project, alpha.project_id)
        assert project is not None
        assert project.secret == body["webhook_secret"]
        assert project.previous_secret == alpha.webhook_secret
        assert project.previous_secret_expires_at is not None
        left = project.previous_secret_expires_at - datetime.now(UTC)
        assert timedelta(hours=23) < left <= timedelta(hours=24)


@pytest.mark.usefixtures("admin")
def test_default_rotates_away_from_the_configured_webhook_secret(
    client: FlaskClient, services: Services
) -> None:
    rotated = client.post(f"/v1/projects/{DEFAULT_PROJECT_ID}/rotate-webhook-secret", headers=ADMIN)
    body = created(rotated, 200)
    with services.db.transaction() as session:
        project = session.get(Project, DEFAULT_PROJECT_ID)
        assert project is not None
        assert project.secret == body["webhook_secret"]
        assert project.previous_secret == services.settings.webhook_secret


# -- the command -----------------------------------------------------------------------------


def test_the_tokens_command_creates_lists_and_revokes(
    client: FlaskClient, services: Services, motionhook: Any
) -> None:
    made = motionhook("projects", "create", "alpha")
    assert "whsec_" in made.output
    assert "alpha" in motionhook("projects", "list").output

    created_token = motionhook("tokens", "create", "--project", "alpha", "--scope", "read")
    token = created_token.stdout.strip()
    assert token.startswith("mh_") and "\n" not in token
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/jobs", headers=bearer).status_code == 200
    assert client.post("/v1/jobs", json=IMAGE, headers=bearer).status_code == 403

    listed = motionhook("tokens", "list", "--project", "alpha").output
    assert token not in listed and "read" in listed
    token_id = listed.split("\t")[0]
    assert motionhook("tokens", "list", "--project", "default").output == ""
    motionhook("tokens", "revoke", token_id, "--project", "default", exit_code=1)
    motionhook("tokens", "revoke", token_id, "--project", "alpha")
    assert client.get("/v1/jobs", headers=bearer).status_code == 401


def test_the_tokens_command_names_an_unknown_project_or_scope(motionhook: Any) -> None:
    unknown = motionhook("tokens", "create", "--project", "nope", "--scope", "read", exit_code=2)
    assert "no project named 'nope'" in unknown.output
    bad = motionhook("tokens", "create", "--project", "default", "--scope", "root", exit_code=2)
    assert "--scope" in bad.output
    motionhook("projects", "create", "default", exit_code=1)
