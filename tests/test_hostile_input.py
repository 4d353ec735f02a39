"""Inputs a security review found giving 500s or poisoning reads: all answered 4xx now.

Every test runs on SQLite and on PostgreSQL (when configured) through the HTTP API.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from schemas.jobs import MAX_INIT_IMAGE_LENGTH
from schemas.strict_json import MAX_DEPTH
from service.extension import Services
from service.models import CallbackRecord, Job

IMAGE = "https://example.com/cat.png"
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e309", "-1e400")


def raw_post(client: FlaskClient, path: str, body: str, auth: dict[str, str]) -> Any:
    return client.post(path, data=body, content_type="application/json", headers=auth)


def post_form(client: FlaskClient, fields: dict[str, str], auth: dict[str, str]) -> Any:
    return client.post("/v1/jobs", data=fields, content_type="multipart/form-data", headers=auth)


def new_job(client: FlaskClient, auth: dict[str, str]) -> str:
    response = client.post("/v1/jobs", json={"init_image": IMAGE}, headers=auth)
    assert response.status_code == 202, response.get_json()
    job_id: str = response.get_json()["id"]
    return job_id


def stored_bodies(services: Services, job_id: str) -> list[str | None]:
    with services.db.transaction() as session:
        query = select(CallbackRecord.body).where(CallbackRecord.job_id == job_id)
        return list(session.scalars(query))


def job_count(services: Services) -> int:
    with services.db.transaction() as session:
        return len(list(session.scalars(select(Job.id))))


# -- non-finite numbers --------------------------------------------------------------


@pytest.mark.parametrize("number", NON_FINITE)
def test_non_finite_number_in_metadata_is_422_naming_the_field(
    client: FlaskClient, auth: dict[str, str], services: Services, number: str
) -> None:
    body = f'{{"init_image": "{IMAGE}", "metadata": {{"scores": [1, {number}]}}}}'
    response = raw_post(client, "/v1/jobs", body, auth)
    assert response.status_code == 422
    payload = response.get_json()
    assert payload["errors"] == {"json": {"metadata.scores.1": ["must be a finite number"]}}
    assert "metadata.scores.1" in payload["message"]
    assert job_count(services) == 0
    listing = client.get("/v1/jobs", headers=auth)
    json.loads(listing.get_data(as_text=True), parse_constant=pytest.fail)


def test_non_finite_number_in_a_subscription_is_422_naming_the_field(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    body = '{"kind": "webhook", "url": "https://93.184.215.14/h", "description": NaN}'
    response = raw_post(client, "/v1/subscriptions", body, auth)
    assert response.status_code == 422
    assert response.get_json()["errors"] == {"json": {"description": ["must be a finite number"]}}


def test_a_bare_non_finite_body_is_400(client: FlaskClient, auth: dict[str, str]) -> None:
    response = raw_post(client, "/v1/jobs", "Infinity", auth)
    assert response.status_code == 400
    assert response.get_json()["message"] == "body is not valid JSON: non-finite number"


def test_non_finite_number_in_multipart_metadata_is_422(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    response = post_form(client, {"init_image": IMAGE, "metadata": '{"x": NaN}'}, auth)
    assert response.status_code == 422
    assert "metadata" in response.get_json()["message"]


# -- nesting -------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deeply_nested_bodies_are_400_on_jobs_and_subscriptions(
    client: FlaskClient, auth: dict[str, str], depth: int
) -> None:
    nested = "[" * depth + "]" * depth
    for path, body in (
        ("/v1/jobs", f'{{"init_image": "{IMAGE}", "metadata": {{"x": {nested}}}}}'),
        (
            "/v1/subscriptions",
            f'{{"kind": "webhook", "url": "https://93.184.215.14/h", "events": {nested}}}',
        ),
    ):
        response = raw_post(client, path, body, auth)
        assert response.status_code == 400, (path, response.get_json())
        assert response.get_json()["message"] == f"body is nested deeper than {MAX_DEPTH} levels"


def test_brackets_inside_strings_do_not_count_as_nesting(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    body = {"init_image": IMAGE, "metadata": {"note": "[" * 500 + '\\"{' * 100}}
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 202, response.get_json()


def test_deeply_nested_callback_is_400_and_stored(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Callable[..., Any]
) -> None:
    job_id = new_job(client, auth)
    raw = b'{"status": "success", "meta": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    response = post_callback(job_id, None, raw=raw)
    assert response.status_code == 400
    assert "nested deeper" in response.get_json()["message"]
    assert stored_bodies(services, job_id) == [raw.decode()]


# -- NUL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/job_%00",
        "/v1/subscriptions/sub_%00",
        "/v1/deliveries/%00",
        "/v1/subscriptions/%00/rotate-secret",
    ],
)
def test_nul_in_the_path_is_400(client: FlaskClient, auth: dict[str, str], path: str) -> None:
    method = client.post if path.endswith("rotate-secret") else client.get
    response = method(path, headers=auth)
    assert response.status_code == 400
    assert response.get_json()["message"] == "path must not contain NUL characters"


def test_nul_in_a_callback_path_is_400(client: FlaskClient) -> None:
    response = client.post("/v1/callbacks/modelslab/job_%00?sig=x", json={})
    assert response.status_code == 400


@pytest.mark.parametrize(
    "query",
    ["status=%00", "cursor=abc%00", "job_id=%00&status=failed", "%00=1"],
)
def test_nul_in_the_query_is_400(client: FlaskClient, auth: dict[str, str], query: str) -> None:
    for path in ("/v1/jobs", "/v1/deliveries"):
        response = client.get(f"{path}?{query}", headers=auth)
        assert response.status_code == 400, (path, response.get_json())
        assert "must not contain NUL characters" in response.get_json()["message"]


def test_nul_in_a_header_we_read_is_400(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    headers = {**auth, "Idempotency-Key": "key\x00one"}
    response = client.post("/v1/jobs", json={"init_image": IMAGE}, headers=headers)
    assert response.status_code == 400
    assert (
        response.get_json()["message"] == "header Idempotency-Key: must not contain NUL characters"
    )
    assert job_count(services) == 0


@pytest.mark.parametrize(
    "body,field",
    [
        ({"init_image": IMAGE, "prompt": "a cat\u0000"}, "prompt"),
        ({"init_image": IMAGE, "metadata": {"k\u0000": 1}}, "metadata.k\\x00"),
        ({"init_image": IMAGE, "metadata": {"tags": ["ok", "bad\u0000"]}}, "metadata.tags.1"),
    ],
)
def test_nul_in_json_strings_is_422_naming_the_field(
    client: FlaskClient, auth: dict[str, str], services: Services, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]["json"]
    assert job_count(services) == 0


def test_nul_in_a_subscription_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    body = {"kind": "webhook", "url": "https://93.184.215.14/h", "description": "x\u0000"}
    response = client.post("/v1/subscriptions", json=body, headers=auth)
    assert response.status_code == 422
    assert response.get_json()["errors"]["json"] == {
        "description": ["must not contain NUL characters"]
    }


def test_nul_in_a_multipart_field_is_422(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    response = post_form(client, {"init_image": IMAGE, "prompt": "a\x00cat"}, auth)
    assert response.status_code == 422
    assert response.get_json()["errors"]["json"] == {"prompt": ["must not contain NUL characters"]}
    assert job_count(services) == 0


def test_raw_nul_in_a_callback_body_is_400_and_stored_escaped(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Callable[..., Any]
) -> None:
    job_id = new_job(client, auth)
    raw = b'{"status": "success", "id": 1, "output": ["https://x/a.mp4\x00"]}\x00\xff'
    response = post_callback(job_id, None, raw=raw)
    assert response.status_code == 400
    assert stored_bodies(services, job_id) == [
        '{"status": "success", "id": 1, "output": ["https://x/a.mp4\\x00"]}\\x00\\xff'
    ]


def test_escaped_nul_in_a_callback_body_is_400_and_stored(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Callable[..., Any]
) -> None:
    job_id = new_job(client, auth)
    raw = b'{"status": "failed", "message": "bad\\u0000"}'
    response = post_callback(job_id, None, raw=raw)
    assert response.status_code == 400
    assert "message: must not contain NUL characters" in response.get_json()["message"]
    assert stored_bodies(services, job_id) == [raw.decode()]


# -- init_image ----------------------------------------------------------------------


def test_init_image_longer_than_2048_characters_is_422(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    base = "https://example.com/"
    fits = base + "a" * (MAX_INIT_IMAGE_LENGTH - len(base))
    assert client.post("/v1/jobs", json={"init_image": fits}, headers=auth).status_code == 202
    for too_long in (fits + "a", "https://" + "a" * 9_000_000):
        response = client.post("/v1/jobs", json={"init_image": too_long}, headers=auth)
        assert response.status_code == 422
        assert response.get_json()["errors"]["json"] == {
            "init_image": [f"must be at most {MAX_INIT_IMAGE_LENGTH} characters"]
        }
    assert job_count(services) == 1


# -- callbacks: numbers that overflow ------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"status": "success", "id": 1e309, "output": []}',
        b'{"status": "success", "id": 1' + b"0" * 5000 + b', "output": []}',
        b'{"status": "success", "id": 1e300, "output": []}',
        b'{"status": "processing", "id": 5, "eta": NaN}',
    ],
)
def test_callback_with_overflowing_numbers_is_400_and_stored(
    client: FlaskClient,
    auth: dict[str, str],
    services: Services,
    post_callback: Callable[..., Any],
    raw: bytes,
) -> None:
    job_id = new_job(client, auth)
    response = post_callback(job_id, None, raw=raw)
    assert response.status_code == 400
    assert stored_bodies(services, job_id) == [raw.decode()]


def test_callback_with_an_absurd_eta_is_applied_without_it(
    client: FlaskClient, auth: dict[str, str], post_callback: Callable[..., Any]
) -> None:
    job_id = new_job(client, auth)
    response = post_callback(job_id, {"status": "processing", "id": 7, "eta": 1e308})
    assert response.status_code == 200
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert job["upstream"] == {"id": "7", "status": "processing", "eta": None}


def test_callback_with_a_long_status_is_400(
    client: FlaskClient, auth: dict[str, str], post_callback: Callable[..., Any]
) -> None:
    job_id = new_job(client, auth)
    response = post_callback(job_id, {"status": "x" * 20, "id": 7})
    assert response.status_code == 400


def test_bodies_of_unauthenticated_requests_are_not_parsed(client: FlaskClient) -> None:
    nested = "[" * 1000 + "]" * 1000
    for path in ("/v1/jobs", "/v1/subscriptions"):
        response = raw_post(client, path, f'{{"x": {nested}, "y": NaN}}', {})
        assert response.status_code == 401, path
