"""Credentials stay in: the ModelsLab key, Slack/Discord URLs, SQL parameters, file modes.

And a cap on how many callback bodies one job may store.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from service import create_app
from service.callbacks import callback_token
from service.config import DEFAULTS, Settings
from service.db import Database
from service.extension import Services
from service.migrate import upgrade
from service.models import CallbackRecord, Event
from service.observability import before_send
from service.subscriptions import mask_target_url
from service.upstream import UpstreamClient
from tests.conftest import CALLBACK_SECRET, ENGINES, TOKEN, _make_url, app_config
from tests.local_http import LocalServer, Received

MODELSLAB_KEY = "mlk_Zq7Xw2Vb9Np4Ld6Ks1"
SLACK_URL = "https://hooks.slack.com/services/T0ABCDEF1/B0ABCDEFGH2/abcdefghijklmnopqrstuvwx"
DISCORD_URL = "https://discord.com/api/webhooks/123456789012345678/AbCdEf-GhIjKl_MnOpQr"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(params=ENGINES)
def keyed_app(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Flask]:
    """The app with a real ModelsLab key and a small callback cap."""
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    url = _make_url(request, request.param, tmp_path)
    app = create_app(
        app_config(
            url,
            tmp_path,
            MODELSLAB_API_KEY=MODELSLAB_KEY,
            MAX_CALLBACKS_PER_JOB=3,
            ALLOW_PRIVATE_TARGETS=True,  # no DNS lookups for hooks.slack.com here
        )
    )
    upgrade(app.extensions["motionhook"].db)
    yield app
    app.extensions["motionhook"].db.dispose()


def signed(job_id: str) -> str:
    return f"/v1/callbacks/modelslab/{job_id}?sig={callback_token(CALLBACK_SECRET, job_id)}"


def new_job(client: FlaskClient) -> str:
    response = client.post(
        "/v1/jobs", json={"init_image": "https://example.com/a.png"}, headers=AUTH
    )
    assert response.status_code == 202
    job_id: str = response.get_json()["id"]
    return job_id


# -- the ModelsLab key -------------------------------------------------------------------


def test_modelslab_key_in_a_callback_is_scrubbed_before_storing_and_fan_out(
    keyed_app: Flask,
) -> None:
    client = keyed_app.test_client()
    services: Services = keyed_app.extensions["motionhook"]
    job_id = new_job(client)
    body = {"status": "failed", "id": 9, "message": f"invalid key {MODELSLAB_KEY} for account"}
    response = client.post(signed(job_id), json=body)
    assert response.status_code == 200
    job = client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json()
    assert job["error"]["message"] == "invalid key [redacted] for account"
    with services.db.transaction() as session:
        stored = list(session.scalars(select(CallbackRecord.body)))
        events = [json.dumps(e) for e in session.scalars(select(Event.payload))]
    assert stored and events
    for text_kept in (*stored, *events, json.dumps(job)):
        assert MODELSLAB_KEY not in text_kept


def test_modelslab_key_in_a_submit_answer_is_scrubbed_from_the_raw_body() -> None:
    def answer(_request: Received) -> tuple[int, dict[str, str], bytes]:
        body = {"status": "error", "message": f"key {MODELSLAB_KEY} has no credits"}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    with LocalServer(answer) as upstream, requests.Session() as session:
        client = UpstreamClient(upstream.url, MODELSLAB_KEY, timeout=5, session=session)
        result = client.submit({"init_image": "https://example.com/a.png"})
        assert upstream.received[0].body.count(MODELSLAB_KEY.encode()) == 1  # it was sent
    assert MODELSLAB_KEY.encode() not in result.raw
    assert result.message == "key [redacted] has no credits"


# -- callback cap -------------------------------------------------------------------------


def test_callbacks_beyond_the_cap_are_answered_200_and_not_stored(keyed_app: Flask) -> None:
    client = keyed_app.test_client()
    services: Services = keyed_app.extensions["motionhook"]
    job_id = new_job(client)
    outcomes = []
    for number in range(5):
        response = client.post(signed(job_id), json={"status": "processing", "id": number})
        assert response.status_code == 200
        outcomes.append(response.get_json()["outcome"])
    assert outcomes[3:] == ["over_cap", "over_cap"]
    with services.db.transaction() as session:
        query = select(CallbackRecord.id).where(CallbackRecord.job_id == job_id)
        assert len(list(session.scalars(query))) == 3


# -- Slack and Discord URLs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,url,masked",
    [
        ("slack", SLACK_URL, "https://hooks.slack.com/services/T0…/B0…H2/***"),
        ("discord", DISCORD_URL + "?thread_id=1", "https://discord.com/api/webhooks/12…78/***"),
        ("webhook", "https://u:pw@example.com/h?x=1", "https://u:***@example.com/h?x=1"),
        ("amqp", "amqp://guest:s3cret@mq.example.com/vh", "amqp://guest:***@mq.example.com/vh"),
        ("webhook", "https://example.com/hook", "https://example.com/hook"),
    ],
)
def test_mask_target_url(kind: str, url: str, masked: str) -> None:
    assert mask_target_url(kind, url) == masked


def test_slack_and_discord_urls_are_full_only_in_the_create_response(keyed_app: Flask) -> None:
    client, auth = keyed_app.test_client(), AUTH
    for kind, url in (("slack", SLACK_URL), ("discord", DISCORD_URL)):
        created = client.post("/v1/subscriptions", json={"kind": kind, "url": url}, headers=auth)
        assert created.status_code == 201, created.get_json()
        assert created.get_json()["url"] == url
        sub_id = created.get_json()["id"]
        token = url.rsplit("/", 1)[1]
        answers = [
            client.get(f"/v1/subscriptions/{sub_id}", headers=auth),
            client.get("/v1/subscriptions", headers=auth),
            client.patch(f"/v1/subscriptions/{sub_id}", json={"description": "x"}, headers=auth),
        ]
        for answer in answers:
            assert answer.status_code == 200
            assert token not in answer.get_data(as_text=True)
            assert "***" in answer.get_data(as_text=True)


def test_sentry_events_are_scrubbed_of_slack_and_discord_urls() -> None:
    event = {
        "message": f"delivery to {SLACK_URL} failed",
        "extra": {"target": DISCORD_URL},
        "exception": {"values": [{"value": f"POST {DISCORD_URL}: 500"}]},
    }
    scrubbed = json.dumps(before_send(event, {}))
    for secret in (SLACK_URL.rsplit("/", 1)[1], DISCORD_URL.rsplit("/", 1)[1], "T0ABCDEF1"):
        assert secret not in scrubbed
    assert "hooks.slack.com/[redacted]" in scrubbed


@pytest.mark.parametrize("engine_name", ENGINES)
def test_sql_errors_do_not_carry_bound_parameters(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    engine_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = Database(_make_url(request, engine_name, tmp_path))
    try:
        with pytest.raises(SQLAlchemyError) as failure, db.transaction() as session:
            session.execute(
                text("INSERT INTO no_such_table (url) VALUES (:url)"), {"url": SLACK_URL}
            )
    finally:
        db.dispose()
    logging.getLogger("motionhook.test").error("failed", exc_info=failure.value)
    assert "no_such_table" in str(failure.value)
    assert SLACK_URL not in str(failure.value)
    assert SLACK_URL not in caplog.text


# -- file modes -----------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_files_and_instance_secrets_are_created_0600(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the usual umask, which would make files 0644
    try:
        instance = tmp_path / "instance"
        settings = Settings.from_mapping(dict(DEFAULTS), instance)
        db = Database(settings.database_url)
        upgrade(db)
        with db.transaction() as session:
            session.execute(text("SELECT 1"))
            database = Path(settings.database_url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                path = database.with_name(database.name + suffix)
                assert path.exists(), path
                assert mode(path) == 0o600, (path, oct(mode(path)))
        db.dispose()
        for name in ("api_token", "callback_secret", "webhook_secret"):
            assert mode(instance / name) == 0o600, name
        assert settings.webhook_secret.startswith("whsec_")
        assert [p.name for p in instance.iterdir() if p.name.startswith(".")] == []
    finally:
        os.umask(previous)


def test_instance_secrets_are_generated_once_and_reused(tmp_path: Path) -> None:
    instance = tmp_path / "instance"
    first = Settings.from_mapping(dict(DEFAULTS), instance)
    second = Settings.from_mapping(dict(DEFAULTS), instance)
    assert first.callback_secret == second.callback_secret
    assert first.webhook_secret == second.webhook_secret
