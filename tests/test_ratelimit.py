"""Rate limits: one budget per project, shared through Redis, never on callbacks."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from service import create_app
from service.migrate import upgrade
from tests.conftest import app_config
from tests.tenants import add_project

# Two configured tokens, both of project ``default``, and one of project ``other``.
TOKEN_A, TOKEN_A2 = "token-a-0123456789", "token-a2-0123456789"
TOKEN_B = "token-b-0123456789"
REDIS_URL = "redis://127.0.0.1:6379/0"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Flask]]:
    """Apps on one migrated SQLite database with a tiny limit: project ``default`` (two
    configured tokens) and project ``other`` (TOKEN_B)."""
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "instance"))
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        config = app_config(
            f"sqlite:///{tmp_path / 'rl.db'}",
            tmp_path,
            API_TOKENS=f"{TOKEN_A},{TOKEN_A2}",
            RATELIMIT="3/minute",
            **overrides,
        )
        flask_app = create_app(config)
        db = flask_app.extensions["motionhook"].db
        upgrade(db)
        if not apps:
            add_project(db, "other", token=TOKEN_B)
        apps.append(flask_app)
        return flask_app

    yield make
    for flask_app in apps:
        flask_app.extensions["motionhook"].db.dispose()


def spend(client: FlaskClient, token: str, times: int) -> list[int]:
    return [client.get("/v1/jobs", headers=bearer(token)).status_code for _ in range(times)]


def test_a_token_over_its_limit_gets_429_with_retry_after(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    assert spend(client, TOKEN_A, 3) == [200, 200, 200]
    limited = client.get("/v1/jobs", headers=bearer(TOKEN_A))
    assert limited.status_code == 429
    body = limited.get_json()
    assert body["code"] == 429 and body["status"] == "Too Many Requests"
    assert "rate limit exceeded" in body["message"]
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Remaining"] == "0"


def test_other_projects_keep_their_own_budget(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    assert spend(client, TOKEN_A, 4)[-1] == 429
    assert spend(client, TOKEN_B, 3) == [200, 200, 200]


def test_the_tokens_of_one_project_share_its_budget(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    assert spend(client, TOKEN_A, 3) == [200, 200, 200]
    assert spend(client, TOKEN_A2, 1) == [429]


def test_bad_tokens_do_not_spend_a_valid_tokens_budget(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    assert set(spend(client, "forged-token-1", 5)) == {401, 429}
    assert spend(client, TOKEN_A, 3) == [200, 200, 200]


def test_the_limit_spans_every_v1_endpoint(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    client.get("/v1/jobs", headers=bearer(TOKEN_A))
    client.get("/v1/subscriptions", headers=bearer(TOKEN_A))
    client.get("/v1/deliveries", headers=bearer(TOKEN_A))
    assert client.get("/v1/jobs/job_x", headers=bearer(TOKEN_A)).status_code == 429


def test_callbacks_media_and_probes_are_never_limited(make_app: Callable[..., Flask]) -> None:
    client = make_app().test_client()
    callback_codes = {
        client.post("/v1/callbacks/modelslab/job_x?sig=forged", json={}).status_code
        for _ in range(8)
    }
    assert callback_codes == {401}
    assert 429 not in {client.get("/media/a.mp4?exp=1&sig=x").status_code for _ in range(8)}
    assert {client.get("/healthz").status_code for _ in range(8)} == {200}


def test_an_unreachable_limit_store_falls_back_to_counting_in_process(
    make_app: Callable[..., Flask],
) -> None:
    client = make_app(RATELIMIT_STORAGE_URL="redis://127.0.0.1:1/0").test_client()
    assert spend(client, TOKEN_A, 4) == [200, 200, 200, 429]
    assert spend(client, TOKEN_B, 1) == [200]


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"mhtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in connection.scan_iter(f"*{prefix}*"):
        connection.delete(key)
    connection.close()


def test_instances_sharing_redis_share_each_tokens_budget(
    make_app: Callable[..., Flask], redis_prefix: str
) -> None:
    shared = {"RATELIMIT_STORAGE_URL": REDIS_URL, "RATELIMIT_KEY_PREFIX": redis_prefix}
    first = make_app(**shared).test_client()
    second = make_app(**shared).test_client()
    assert spend(first, TOKEN_A, 2) == [200, 200]
    assert spend(second, TOKEN_A, 2) == [200, 429]
    assert spend(first, TOKEN_A, 1) == [429]
    assert spend(second, TOKEN_B, 1) == [200]
