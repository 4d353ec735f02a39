"""Fuzz every operation of ``/openapi.json`` with schemathesis: no input may cause a 5xx.

Generated JSON never holds non-finite numbers, and rarely NULs where they hurt, so
a second pass walks the same operations and poisons each body property, path
parameter and query parameter in turn (``NaN``, ``Infinity``, ``1e309``, ``\\u0000``):
each must be refused with a 4xx.

Only the ``not_a_server_error`` check runs: generated inputs are mostly invalid on
purpose, and a well-formed 4xx is the right answer to them. Random path ids only
ever reach "not found", so every case that has path parameters is sent a second
time aimed at resources that exist (and callbacks with a valid ``sig``), which is
where request bodies are actually parsed and applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service import create_app
from service.callbacks import callback_token
from service.extension import Services
from service.migrate import upgrade
from tests.conftest import CALLBACK_SECRET, TOKEN, app_config

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADMIN_TOKEN = "fuzz-admin-token"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A public address literal: accepted as a target without DNS, never connected to here.
TARGET_URL = "https://93.184.215.14/hook"


@dataclass
class Existing:
    """Ids of a job, a subscription and a delivery that exist, made through the API."""

    client: FlaskClient
    ids: dict[str, str] = field(default_factory=dict)

    def new_job(self) -> str:
        response = self.client.post(
            "/v1/jobs", json={"init_image": "https://example.com/cat.png"}, headers=AUTH
        )
        assert response.status_code == 202, response.get_data(as_text=True)
        job_id: str = response.get_json()["id"]
        return job_id

    def refresh(self) -> None:
        """(Re)create every resource, e.g. after a fuzzed DELETE removed one."""
        response = self.client.post(
            "/v1/subscriptions", json={"kind": "webhook", "url": TARGET_URL}, headers=AUTH
        )
        assert response.status_code == 201, response.get_data(as_text=True)
        subscription_id = response.get_json()["id"]
        sent = self.client.post(f"/v1/subscriptions/{subscription_id}/test", headers=AUTH)
        assert sent.status_code == 202, sent.get_data(as_text=True)
        self.ids = {
            "job_id": self.new_job(),
            "subscription_id": subscription_id,
            "delivery_id": sent.get_json()["delivery_id"],
        }

    def aim(self, case: schemathesis.Case) -> bool:
        """Point the case's path parameters at existing resources; False if it has none."""
        if not case.path_parameters:
            return False
        if "track_id" in case.path_parameters:
            # A fresh job per callback, so each fuzzed body meets a job it can still change.
            job_id = self.new_job()
            case.path_parameters = {"track_id": job_id}
            case.query = {**(case.query or {}), "sig": callback_token(CALLBACK_SECRET, job_id)}
            return True
        if not set(case.path_parameters) <= set(self.ids):
            return False
        case.path_parameters = {name: self.ids[name] for name in case.path_parameters}
        return True


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """The web app on a migrated SQLite database of its own."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp / "instance"))
        # A limit never reached: a 429 would hide what the handlers do with the input.
        config = app_config(
            f"sqlite:///{tmp / 'motionhook.db'}",
            tmp,
            RATELIMIT="1000000/minute",
            ADMIN_TOKENS=ADMIN_TOKEN,
        )
        app = create_app(config)
        services: Services = app.extensions["motionhook"]
        upgrade(services.db)
        yield app
        services.db.dispose()


@pytest.fixture(scope="module")
def existing(fuzzed_app: Flask) -> Existing:
    resources = Existing(fuzzed_app.test_client())
    resources.refresh()
    return resources


@pytest.fixture
def api_schema(fuzzed_app: Flask, request: pytest.FixtureRequest) -> Any:
    # schemathesis 4's lazy loader renames subtests through ``node._nodeid``, which
    # pytest 9 no longer sets; give it one so the per-operation reports work.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
    # Event streams never end, so a fuzzer's read of one would never return; their
    # inputs are checked in tests/test_events_api.py.
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzzed_app).exclude(path=STREAMS)


schema = schemathesis.pytest.from_fixture("api_schema")
STREAMS = ["/v1/events/stream", "/v1/jobs/{job_id}/stream"]


# Every operation is fuzzed in one test: on a busy 2-core machine that takes minutes.
@pytest.mark.timeout(1200)
@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    database=None,  # keep no example database in the working tree
    suppress_health_check=list(HealthCheck),
)
def test_no_input_causes_a_server_error(case: schemathesis.Case, existing: Existing) -> None:
    if case.path in STREAMS:
        pytest.skip("event streams never end (their inputs: tests/test_events_api.py)")
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
    if existing.aim(case):
        response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
        if case.method.upper() == "DELETE" and response.status_code < 300:
            existing.refresh()


# Raw JSON values a JSON encoder never writes but a hostile client may.
POISONS = ("NaN", "Infinity", "-Infinity", "1e309", '"nul\\u0000"', '{"k\\u0000": 1}')


def _operations(app: Flask) -> list[Any]:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def _body_properties(operation: Any) -> list[str]:
    for body in operation.body:
        if body.media_type == "application/json":
            return list(body.definition["schema"].get("properties") or {"status": {}})
    return []


def _admin_ids(client: FlaskClient) -> dict[str, str]:
    """A project and one of its tokens, made through the admin API."""
    project = client.post("/v1/projects", json={"name": "poisoned"}, headers=ADMIN_AUTH)
    assert project.status_code == 201, project.get_data(as_text=True)
    project_id = project.get_json()["id"]
    token = client.post(
        f"/v1/projects/{project_id}/tokens", json={"scope": "write"}, headers=ADMIN_AUTH
    )
    assert token.status_code == 201, token.get_data(as_text=True)
    return {"project_id": project_id, "token_id": token.get_json()["id"]}


def _path(
    operation: Any, ids: dict[str, str], existing: Existing, poisoned: str | None = None
) -> tuple[str, str]:
    """The operation's path aimed at existing resources (``poisoned`` gets a NUL); its sig."""
    values = {}
    sig = ""
    for parameter in operation.path_parameters:
        name = parameter.name
        value = existing.new_job() if name == "track_id" else {**existing.ids, **ids}[name]
        if name == "track_id":
            sig = callback_token(CALLBACK_SECRET, value)
        values[name] = quote(value + "\x00" if name == poisoned else value, safe="")
    return operation.path.format(**values), sig


def test_non_finite_numbers_and_nuls_anywhere_are_4xx(
    fuzzed_app: Flask, existing: Existing
) -> None:
    client = fuzzed_app.test_client()
    admin_ids = _admin_ids(client)
    answers: list[tuple[str, int]] = []

    def send(operation: Any, path: str, query: dict[str, str], body: str | None) -> None:
        url = f"{path}?{urlencode(query)}" if query else path
        response = client.open(
            url,
            method=operation.method.upper(),
            data=body,
            content_type="application/json" if body is not None else None,
            headers=ADMIN_AUTH if path.startswith("/v1/projects") else AUTH,
        )
        answers.append((f"{operation.method.upper()} {url} {body}", response.status_code))

    for operation in _operations(fuzzed_app):
        for prop in _body_properties(operation):
            for poison in POISONS:
                path, sig = _path(operation, admin_ids, existing)
                send(operation, path, {"sig": sig} if sig else {}, f'{{"{prop}": {poison}}}')
        for parameter in operation.path_parameters:
            path, sig = _path(operation, admin_ids, existing, poisoned=parameter.name)
            send(operation, path, {"sig": sig} if sig else {}, None)
        for parameter in operation.query:
            path, sig = _path(operation, admin_ids, existing)
            query = {"sig": sig} if sig else {}
            send(operation, path, {**query, parameter.name: "x\x00"}, None)
    assert len(answers) > 150
    wrong = [(request, status) for request, status in answers if not 400 <= status < 500]
    assert wrong == []


def test_inputs_the_fuzzer_once_crashed_on_are_4xx(fuzzed_app: Flask) -> None:
    client = fuzzed_app.test_client()
    # A non-ASCII callback token made hmac.compare_digest raise TypeError.
    response = client.post("/v1/callbacks/modelslab/job_x?sig=%C2%80", json={})
    assert response.status_code == 401
    # werkzeug names a multipart part None when its name is malformed; sorting keys then broke.
    body = b'--b\r\nContent-Disposition: form-data; name="\r"\r\n\r\nnull\r\n--b--\r\n'
    response = client.post(
        "/v1/jobs", data=body, content_type="multipart/form-data; boundary=b", headers=AUTH
    )
    assert response.status_code == 400
    assert response.get_json()["message"] == "multipart body has a part without a valid name"
