"""A project's own ModelsLab key: set and cleared by admins (API and CLI), shown only
masked, sent upstream for the project's jobs and scrubbed wherever it could come back."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import select

from service.callbacks import callback_token
from service.capacity import account_of
from service.extension import Services
from service.models import CallbackRecord, Event, Job, Project
from service.observability import before_send
from service.tasks import upstream_key
from service.upstream import UpstreamClient
from tests.conftest import CALLBACK_SECRET
from tests.local_http import LocalServer, Received
from tests.tenants import Tenant, add_project

INSTANCE_KEY = "mlk_instance_Zq7Xw2Vb9Np4"
PROJECT_KEY = "mlk_project_Ks1Ld6Np4Vb9"
OTHER_KEY = "mlk_other_Qw3Er5Ty7Ui9Op"
ADMIN_TOKEN = "admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMAGE = {"init_image": "https://example.com/a.png"}


@pytest.fixture
def app_overrides() -> dict[str, Any]:
    """An instance ModelsLab key and an admin token."""
    return {"MODELSLAB_API_KEY": INSTANCE_KEY, "ADMIN_TOKENS": ADMIN_TOKEN}


@pytest.fixture
def alpha(services: Services) -> Tenant:
    return add_project(services.db, "alpha")


def set_key(client: FlaskClient, project_id: str, key: str | None) -> Any:
    return client.patch(
        f"/v1/projects/{project_id}", json={"modelslab_api_key": key}, headers=ADMIN
    )


def stored(services: Services, project_id: str) -> tuple[str | None, str | None]:
    with services.db.transaction() as session:
        project = session.get(Project, project_id)
        assert project is not None
        return project.modelslab_api_key, project.modelslab_account


# -- the admin API --------------------------------------------------------------------------


def test_an_admin_sets_and_clears_a_projects_key_and_sees_it_only_masked(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    answer = set_key(client, alpha.project_id, PROJECT_KEY)
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["modelslab_api_key"] == "***" + PROJECT_KEY[-4:]
    listed = client.get("/v1/projects", headers=ADMIN)
    [row] = [item for item in listed.get_json()["items"] if item["id"] == alpha.project_id]
    assert row["modelslab_api_key"] == "***" + PROJECT_KEY[-4:]
    for response in (answer, listed):
        assert PROJECT_KEY not in response.get_data(as_text=True)
    assert stored(services, alpha.project_id) == (
        PROJECT_KEY,
        account_of(PROJECT_KEY, INSTANCE_KEY),
    )

    cleared = set_key(client, alpha.project_id, None)
    assert cleared.status_code == 200
    assert "modelslab_api_key" not in cleared.get_json()
    assert stored(services, alpha.project_id) == (None, None)


def test_a_project_can_be_created_with_its_own_key(client: FlaskClient, services: Services) -> None:
    body = {"name": "beta", "modelslab_api_key": PROJECT_KEY}
    created = client.post("/v1/projects", json=body, headers=ADMIN)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["modelslab_api_key"] == "***" + PROJECT_KEY[-4:]
    assert PROJECT_KEY not in created.get_data(as_text=True)
    assert stored(services, created.get_json()["id"])[0] == PROJECT_KEY


def test_a_short_key_is_masked_whole(client: FlaskClient, alpha: Tenant) -> None:
    answer = set_key(client, alpha.project_id, "short-key")
    assert answer.get_json()["modelslab_api_key"] == "***"


def test_the_instance_key_given_to_a_project_is_the_default_account(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    assert set_key(client, alpha.project_id, INSTANCE_KEY).status_code == 200
    assert stored(services, alpha.project_id) == (INSTANCE_KEY, None)


@pytest.mark.parametrize("bad", ["", "short", "has a space in it", "x" * 257, 42, "tab\there-key"])
def test_a_bad_key_is_422_naming_the_field_without_echoing_it(
    client: FlaskClient, alpha: Tenant, bad: object
) -> None:
    answer = set_key(client, alpha.project_id, bad)  # type: ignore[arg-type]
    assert answer.status_code == 422
    body = answer.get_json()
    assert "modelslab_api_key" in json.dumps(body["errors"])
    if isinstance(bad, str) and bad:
        assert bad not in answer.get_data(as_text=True)


def test_the_key_field_is_required_and_nothing_else_is_taken(
    client: FlaskClient, alpha: Tenant
) -> None:
    url = f"/v1/projects/{alpha.project_id}"
    assert client.patch(url, json={}, headers=ADMIN).status_code == 422
    unknown = client.patch(url, json={"modelslab_api_key": None, "name": "x"}, headers=ADMIN)
    assert unknown.status_code == 422


def test_only_admins_set_keys_and_an_unknown_project_is_404(
    client: FlaskClient, alpha: Tenant
) -> None:
    mine = client.patch(
        f"/v1/projects/{alpha.project_id}",
        json={"modelslab_api_key": PROJECT_KEY},
        headers=alpha.auth,
    )
    assert mine.status_code == 403
    assert set_key(client, "prj_nope", PROJECT_KEY).status_code == 404


def test_a_key_in_a_request_body_is_scrubbed_from_sentry_events() -> None:
    event = {"request": {"data": {"name": "alpha", "modelslab_api_key": PROJECT_KEY}}}
    scrubbed = json.dumps(before_send(event, {}))
    assert PROJECT_KEY not in scrubbed and "alpha" in scrubbed


def test_setting_a_key_does_not_log_it(
    client: FlaskClient, alpha: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert set_key(client, alpha.project_id, PROJECT_KEY).status_code == 200
    assert set_key(client, alpha.project_id, "bad key").status_code == 422
    assert PROJECT_KEY not in caplog.text


# -- the command ----------------------------------------------------------------------------


def test_the_command_sets_lists_masked_and_clears_a_key(
    services: Services, alpha: Tenant, motionhook: Any
) -> None:
    made = motionhook("projects", "set-key", "alpha", stdin=PROJECT_KEY + "\n")
    assert "***" + PROJECT_KEY[-4:] in made.output
    assert stored(services, alpha.project_id) == (
        PROJECT_KEY,
        account_of(PROJECT_KEY, INSTANCE_KEY),
    )
    listed = motionhook("projects", "list").output
    assert "***" + PROJECT_KEY[-4:] in listed
    for output in (made.output, listed):
        assert PROJECT_KEY not in output

    motionhook("projects", "clear-key", "alpha")
    assert stored(services, alpha.project_id) == (None, None)


def test_a_script_gives_the_command_the_key_in_the_environment(
    services: Services, alpha: Tenant, motionhook: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTIONHOOK_PROJECT_MODELSLAB_API_KEY", OTHER_KEY)
    made = motionhook("projects", "set-key", "alpha")
    assert OTHER_KEY not in made.output
    assert stored(services, alpha.project_id)[0] == OTHER_KEY


def test_the_command_refuses_a_bad_key_and_an_unknown_project(
    services: Services, alpha: Tenant, motionhook: Any
) -> None:
    bad = motionhook("projects", "set-key", "alpha", stdin="bad key\n", exit_code=2)
    assert "--modelslab-api-key" in bad.output and "bad key" not in bad.output.split(":", 1)[1]
    missing = motionhook(
        "projects", "set-key", "nope", "--modelslab-api-key", PROJECT_KEY, exit_code=2
    )
    assert "no project named 'nope'" in missing.output
    assert stored(services, alpha.project_id) == (None, None)


# -- upstream calls and scrubbing -----------------------------------------------------------


def echo_key(request: Received) -> tuple[int, dict[str, str], bytes]:
    """A ModelsLab that refuses, quoting every key it knows of back."""
    sent = json.loads(request.body)["key"]
    body = {"status": "error", "message": f"key {sent} (not {INSTANCE_KEY}) has no credits"}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def test_a_projects_key_goes_upstream_and_both_keys_are_scrubbed_from_the_answer() -> None:
    with LocalServer(echo_key) as upstream, requests.Session() as session:
        client = UpstreamClient(upstream.url, INSTANCE_KEY, timeout=5, session=session)
        answers = [client.submit(IMAGE, PROJECT_KEY), client.fetch("146", PROJECT_KEY)]
        sent = [json.loads(request.body)["key"] for request in upstream.received]
    assert sent == [PROJECT_KEY, PROJECT_KEY]
    for answer in answers:
        for key in (PROJECT_KEY, INSTANCE_KEY):
            assert key.encode() not in answer.raw and key not in answer.message
        assert answer.message == "key [redacted] (not [redacted]) has no credits"


def test_without_a_project_key_the_instance_key_goes_upstream() -> None:
    with LocalServer(echo_key) as upstream, requests.Session() as session:
        client = UpstreamClient(upstream.url, INSTANCE_KEY, timeout=5, session=session)
        client.submit(IMAGE, None)
        assert json.loads(upstream.received[0].body)["key"] == INSTANCE_KEY


def test_a_projects_key_in_a_callback_is_scrubbed_before_storing_and_fan_out(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    assert set_key(client, alpha.project_id, PROJECT_KEY).status_code == 200
    job_id = client.post("/v1/jobs", json=IMAGE, headers=alpha.auth).get_json()["id"]
    body = {"status": "failed", "id": 9, "message": f"invalid key {PROJECT_KEY} for account"}
    sig = callback_token(CALLBACK_SECRET, job_id)
    answer = client.post(f"/v1/callbacks/modelslab/{job_id}?sig={sig}", json=body)
    assert answer.status_code == 200
    job = client.get(f"/v1/jobs/{job_id}", headers=alpha.auth).get_json()
    assert job["error"]["message"] == "invalid key [redacted] for account"
    with services.db.transaction() as session:
        kept = [*session.scalars(select(CallbackRecord.body))]
        kept += [json.dumps(payload) for payload in session.scalars(select(Event.payload))]
    assert kept
    for text_kept in (*kept, json.dumps(job)):
        assert PROJECT_KEY not in text_kept


def test_the_worker_scrubs_a_key_it_sends_from_logs_and_sentry(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    assert set_key(client, alpha.project_id, OTHER_KEY).status_code == 200
    job_id = client.post("/v1/jobs", json=IMAGE, headers=alpha.auth).get_json()["id"]
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert upstream_key(session, job) == OTHER_KEY
    event = {"message": f"submit with {OTHER_KEY} failed", "extra": {"detail": OTHER_KEY}}
    assert OTHER_KEY not in json.dumps(before_send(event, {}))


def test_a_job_of_a_project_without_a_key_uses_the_instance_key(
    client: FlaskClient, services: Services, alpha: Tenant
) -> None:
    job_id = client.post("/v1/jobs", json=IMAGE, headers=alpha.auth).get_json()["id"]
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert upstream_key(session, job) is None


def test_metrics_show_slots_per_account_by_name_never_by_key(
    client: FlaskClient, alpha: Tenant
) -> None:
    assert set_key(client, alpha.project_id, PROJECT_KEY).status_code == 200
    assert client.post("/v1/jobs", json=IMAGE, headers=alpha.auth).status_code == 202
    scraped = client.get("/metrics").get_data(as_text=True)
    account = account_of(PROJECT_KEY, INSTANCE_KEY)
    assert f'motionhook_upstream_slots{{account="{account}",state="waiting"}} 1.0' in scraped
    assert 'motionhook_upstream_slots{account="default",state="in_use"} 0.0' in scraped
    assert PROJECT_KEY not in scraped
