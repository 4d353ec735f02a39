"""The Discord interactions endpoint: signatures, PING, ``/animate`` to a queued job.

Requests are signed as Discord signs them (a real Ed25519 key pair); attachments
are served, and ``@original`` edits answered, by a local fake of Discord's CDN and
API over a real socket.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from nacl.signing import SigningKey
from PIL import Image

from service import create_app
from service.delivery import Deliverer
from service.jobs import create_job
from service.migrate import upgrade
from service.models import Job, JobStatus, utcnow
from service.outbound import make_session
from tests.conftest import ENGINES, _make_url, app_config
from tests.local_http import Answer, LocalServer, Received

SIGNING_KEY = SigningKey.generate()
PUBLIC_KEY = SIGNING_KEY.verify_key.encode().hex()
URL = "/v1/chat/discord/interactions"
EDIT_PATH = "/api/webhooks/app1/interaction-token/messages/@original"
AUTH = {"Authorization": "Bearer test-token"}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def signed(body: bytes, *, key: SigningKey = SIGNING_KEY) -> dict[str, str]:
    """The headers Discord sends: Ed25519 over the timestamp followed by the raw body."""
    timestamp = str(int(time.time()))
    signature = key.sign(timestamp.encode() + body).signature.hex()
    return {
        "X-Signature-Ed25519": signature,
        "X-Signature-Timestamp": timestamp,
        "Content-Type": "application/json",
    }


def post(client: FlaskClient, payload: dict[str, Any]) -> Any:
    body = json.dumps(payload).encode()
    return client.post(URL, data=body, headers=signed(body))


def animate(
    cdn: str,
    *,
    prompt: str = "the cat waves",
    user: str = "u1",
    guild: str = "g1",
    content_type: str = "image/png",
    path: str = "/attachments/cat.png",
    **options: Any,
) -> dict[str, Any]:
    """An ``/animate`` interaction as Discord sends it from a guild channel."""
    opts = [
        {"name": "image", "type": 11, "value": "att1"},
        {"name": "prompt", "type": 3, "value": prompt},
    ] + [
        {"name": name, "type": 4 if isinstance(value, int) else 3, "value": value}
        for name, value in options.items()
    ]
    return {
        "type": 2,
        "id": "i1",
        "application_id": "app1",
        "token": "interaction-token",
        "guild_id": guild,
        "channel_id": "c1",
        "member": {"user": {"id": user, "username": "someone"}},
        "data": {
            "name": "animate",
            "type": 1,
            "options": opts,
            "resolved": {
                "attachments": {
                    "att1": {
                        "id": "att1",
                        "filename": "cat.png",
                        "url": cdn + path,
                        "content_type": content_type,
                        "size": 1000,
                    }
                }
            },
        },
    }


@pytest.fixture
def cdn() -> Iterator[LocalServer]:
    """Discord's CDN (attachments) and API (``@original`` edits, under ``/api``)."""
    image = png()

    def respond(request: Received) -> Answer:
        if request.path.startswith("/attachments/"):
            return 200, {"Content-Type": "image/png"}, image
        if request.path.startswith("/text/"):
            return 200, {"Content-Type": "image/png"}, b"not an image at all"
        if request.method == "PATCH" and request.path == EDIT_PATH:
            return 200, {"Content-Type": "application/json"}, b'{"id": "m1"}'
        return 404, {}, b""

    with LocalServer(respond) as server:
        yield server


@pytest.fixture(params=ENGINES)
def make_app(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Flask]]:
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    url = _make_url(request, request.param, tmp_path)
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings = {"DISCORD_PUBLIC_KEY": PUBLIC_KEY, "ALLOW_PRIVATE_TARGETS": True} | overrides
        flask_app = create_app(app_config(url, tmp_path, **settings))
        upgrade(flask_app.extensions["motionhook"].db)
        apps.append(flask_app)
        return flask_app

    yield make
    for flask_app in apps:
        flask_app.extensions["motionhook"].db.dispose()


def jobs(flask_app: Flask) -> list[Job]:
    with flask_app.extensions["motionhook"].db.transaction() as session:
        found = list(session.query(Job).all())
        session.expunge_all()
        return found


def test_not_configured_answers_404_naming_the_setting(make_app: Callable[..., Flask]) -> None:
    client = make_app(DISCORD_PUBLIC_KEY=None).test_client()
    response = post(client, {"type": 1})
    assert response.status_code == 404
    assert "MOTIONHOOK_DISCORD_PUBLIC_KEY" in response.get_json()["message"]


def test_ping_is_answered_with_pong(make_app: Callable[..., Flask]) -> None:
    response = post(make_app().test_client(), {"type": 1})
    assert response.status_code == 200
    assert response.get_json() == {"type": 1}


@pytest.mark.parametrize("breakage", ["other key", "tampered body", "no headers", "not hex"])
def test_bad_signature_is_401_and_creates_nothing(
    make_app: Callable[..., Flask], cdn: LocalServer, breakage: str
) -> None:
    flask_app = make_app()
    body = json.dumps(animate(cdn.url)).encode()
    headers = signed(body)
    if breakage == "other key":
        headers = signed(body, key=SigningKey.generate())
    elif breakage == "tampered body":
        body = body.replace(b"the cat waves", b"the dog waves")
    elif breakage == "no headers":
        headers = {"Content-Type": "application/json"}
    else:
        headers["X-Signature-Ed25519"] = "zz" * 64
    response = flask_app.test_client().post(URL, data=body, headers=headers)
    assert response.status_code == 401
    assert jobs(flask_app) == []
    assert cdn.received == []


def test_animate_defers_and_queues_an_ordinary_job_with_its_source(
    make_app: Callable[..., Flask], cdn: LocalServer
) -> None:
    flask_app = make_app()
    client = flask_app.test_client()
    response = post(client, animate(cdn.url, model="ltx-2.3"))
    assert response.status_code == 200
    assert response.get_json() == {"type": 5}
    assert [r.path for r in cdn.received] == ["/attachments/cat.png"]
    [job] = jobs(flask_app)
    assert job.project_id == "prj_default"
    assert job.model_id == "ltx-2.3"
    assert job.input["prompt"] == "the cat waves"
    # The CDN link expires: the image is stored like an upload.
    assert job.input["image_key"].startswith("inputs/")
    resource = client.get(f"/v1/jobs/{job.id}", headers={"Authorization": "Bearer test-token"})
    assert resource.status_code == 200, resource.get_json()
    assert resource.get_json()["source"] == {
        "kind": "discord",
        "workspace": "g1",
        "channel": "c1",
        "user": "u1",
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"content_type": "application/pdf"}, "image: must be an image"),
        ({"path": "/text/cat.png"}, "image"),
        ({"path": "/missing.png"}, "image: Discord answered 404"),
        ({"model": "sdxl"}, "model"),
    ],
)
def test_bad_options_get_an_ephemeral_message_and_no_job(
    make_app: Callable[..., Flask], cdn: LocalServer, change: dict[str, Any], named: str
) -> None:
    flask_app = make_app()
    response = post(flask_app.test_client(), animate(cdn.url, **change))
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["type"] == 4
    assert answer["data"]["flags"] == 64
    assert answer["data"]["allowed_mentions"] == {"parse": []}
    assert named in answer["data"]["content"]
    assert jobs(flask_app) == []


def test_rate_limit_per_chat_user(make_app: Callable[..., Flask], cdn: LocalServer) -> None:
    flask_app = make_app(CHAT_RATE_LIMIT="2/hour")
    client = flask_app.test_client()
    answers = [post(client, animate(cdn.url)).get_json()["type"] for _ in range(3)]
    assert answers == [5, 5, 4]
    # Another user has a budget of their own.
    assert post(client, animate(cdn.url, user="u2")).get_json()["type"] == 5
    assert len(jobs(flask_app)) == 3


def test_allow_list_holds(make_app: Callable[..., Flask], cdn: LocalServer) -> None:
    flask_app = make_app(CHAT_ALLOWED="g1,T123")
    client = flask_app.test_client()
    refused = post(client, animate(cdn.url, guild="g2")).get_json()
    assert refused["type"] == 4
    assert "not allowed" in refused["data"]["content"]
    assert post(client, animate(cdn.url, guild="g1")).get_json()["type"] == 5
    assert len(jobs(flask_app)) == 1


def jobs_ahead(flask_app: Flask, *, outstanding: int, waiting: int) -> list[str]:
    """Jobs asked for before: ``outstanding`` hold ModelsLab slots; the waiting ones' ids."""
    db = flask_app.extensions["motionhook"].db
    with db.transaction() as session:
        made = [
            create_job(session, db, {"prompt": "earlier"}, project_id="prj_default")
            for _ in range(outstanding + waiting)
        ]
        for job in made[:outstanding]:
            job.status = JobStatus.PROCESSING
            job.upstream_slot_since = utcnow()
        return [job.id for job in made[outstanding:]]


def leave_queue(flask_app: Flask, job_id: str) -> None:
    """The job gets its ModelsLab slot and is submitted."""
    with flask_app.extensions["motionhook"].db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = JobStatus.PROCESSING
        job.upstream_slot_since = utcnow()


def deliver_due(flask_app: Flask) -> int:
    """Claim and send the due deliveries as the worker does; how many there were."""
    deliverer = Deliverer(
        flask_app.extensions["motionhook"], make_session(allow_private=True), owner="test"
    )
    try:
        claimed = deliverer.claim(10)
        for prepared in claimed:
            deliverer.deliver(prepared)
    finally:
        deliverer.close()
    return len(claimed)


def edits(server: LocalServer) -> list[dict[str, Any]]:
    return [
        json.loads(r.body) for r in server.received if r.method == "PATCH" and r.path == EDIT_PATH
    ]


def animate_chat_job(flask_app: Flask, cdn: LocalServer) -> str:
    """Ask for a video by ``/animate``; the chat job's id."""
    assert post(flask_app.test_client(), animate(cdn.url)).get_json() == {"type": 5}
    [job_id] = [job.id for job in jobs(flask_app) if job.source]
    return job_id


def test_animate_waiting_for_a_slot_edits_original_with_its_queue_position(
    make_app: Callable[..., Flask], cdn: LocalServer
) -> None:
    flask_app = make_app(DISCORD_API_URL=cdn.url + "/api", MODELSLAB_MAX_QUEUED=1)
    client = flask_app.test_client()
    [ahead] = jobs_ahead(flask_app, outstanding=1, waiting=1)
    job_id = animate_chat_job(flask_app, cdn)

    # One reply that is no event: listed and fetched like any delivery.
    [listed] = client.get(f"/v1/deliveries?job_id={job_id}", headers=AUTH).get_json()["items"]
    assert {k: listed[k] for k in ("kind", "event_id", "event_type", "subscription_id")} == {
        "kind": "discord_reply",
        "event_id": None,
        "event_type": None,
        "subscription_id": None,
    }
    assert listed["status"] == "pending"
    assert deliver_due(flask_app) == 1
    assert edits(cdn) == [
        {"content": "🕒 Queued, position 2", "embeds": [], "allowed_mentions": {"parse": []}}
    ]
    detail = client.get(f"/v1/deliveries/{listed['id']}", headers=AUTH).get_json()
    assert detail["status"] == "delivered"
    assert [a["status_code"] for a in detail["attempts"]] == [200]

    # Sent again, it says where the job is then.
    leave_queue(flask_app, ahead)
    retried = client.post(f"/v1/deliveries/{listed['id']}/retry", headers=AUTH)
    assert retried.status_code == 202, retried.get_json()
    assert deliver_due(flask_app) == 1
    assert edits(cdn)[-1]["content"] == "🕒 Queued, position 1"
    # Nothing of the interaction token shows in the deliveries API.
    assert "interaction-token" not in json.dumps([listed, detail, retried.get_json()])


def test_queued_edit_after_the_job_started_is_refused_and_edits_nothing(
    make_app: Callable[..., Flask], cdn: LocalServer
) -> None:
    flask_app = make_app(DISCORD_API_URL=cdn.url + "/api", MODELSLAB_MAX_QUEUED=1)
    jobs_ahead(flask_app, outstanding=1, waiting=0)
    job_id = animate_chat_job(flask_app, cdn)
    leave_queue(flask_app, job_id)
    assert deliver_due(flask_app) == 1
    assert edits(cdn) == []
    client = flask_app.test_client()
    [listed] = client.get(f"/v1/deliveries?job_id={job_id}", headers=AUTH).get_json()["items"]
    assert listed["status"] == "failed"
    assert listed["last_error"] == "superseded: the job has left the queue"


def test_a_job_that_finds_a_free_slot_gets_no_queued_edit(
    make_app: Callable[..., Flask], cdn: LocalServer
) -> None:
    flask_app = make_app(DISCORD_API_URL=cdn.url + "/api", MODELSLAB_MAX_QUEUED=2)
    jobs_ahead(flask_app, outstanding=1, waiting=0)
    job_id = animate_chat_job(flask_app, cdn)

    # One slot of two is free: the job is submitted at once, and "generating" follows.
    client = flask_app.test_client()
    assert client.get(f"/v1/deliveries?job_id={job_id}", headers=AUTH).get_json()["items"] == []
    assert deliver_due(flask_app) == 0
    assert edits(cdn) == []
