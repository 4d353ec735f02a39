"""HTTP tests for /v1/jobs through the Flask client: creation, reads, bad input."""

from __future__ import annotations

import io
from typing import Any

from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import select

from service.extension import Services
from service.models import Task

IMAGE_URL = "https://example.com/cat.png"


def png_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def create(client: FlaskClient, auth: dict[str, str], **body: Any) -> Any:
    return client.post("/v1/jobs", json={"init_image": IMAGE_URL, **body}, headers=auth)


def test_create_job_returns_202_and_queues_submit(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    response = create(client, auth, prompt="a cat", width=512, metadata={"user": 7})
    assert response.status_code == 202
    job = response.get_json()
    assert job["status"] == "queued"
    assert job["model_id"] == "wan2.2"
    assert job["input"] == {"init_image": IMAGE_URL, "prompt": "a cat", "width": 512}
    assert job["metadata"] == {"user": 7}
    assert job["id"].startswith("job_") and len(job["id"]) > 20
    with services.db.transaction() as session:
        kinds = [t.kind for t in session.scalars(select(Task).where(Task.job_id == job["id"]))]
    assert kinds == ["submit"]


def test_get_job_round_trips(client: FlaskClient, auth: dict[str, str]) -> None:
    job = create(client, auth).get_json()
    response = client.get(f"/v1/jobs/{job['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json()["id"] == job["id"]


def test_unknown_job_is_404_json(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/jobs/job_nope", headers=auth)
    assert response.status_code == 404
    assert response.get_json()["code"] == 404


def test_missing_or_wrong_token_is_401(client: FlaskClient) -> None:
    assert client.get("/v1/jobs").status_code == 401
    wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "bearer" in wrong.get_json()["message"].lower()


def test_list_paginates_newest_first_and_filters(client: FlaskClient, auth: dict[str, str]) -> None:
    ids = [create(client, auth, prompt=str(i)).get_json()["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        query = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(query, headers=auth).get_json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))
    queued = client.get("/v1/jobs?status=queued", headers=auth).get_json()
    assert len(queued["items"]) == 5
    assert client.get("/v1/jobs?status=completed", headers=auth).get_json()["items"] == []


def test_bad_cursor_and_status_are_422(client: FlaskClient, auth: dict[str, str]) -> None:
    bad_cursor = client.get("/v1/jobs?cursor=garbage", headers=auth)
    assert bad_cursor.status_code == 422
    assert "cursor" in bad_cursor.get_json()["message"]
    bad_status = client.get("/v1/jobs?status=done", headers=auth)
    assert bad_status.status_code == 422
    assert "status" in bad_status.get_json()["message"]


def assert_422_naming(response: Any, field: str) -> None:
    assert response.status_code == 422, response.get_data(as_text=True)
    body = response.get_json()
    assert field in body["message"]
    assert set(body) >= {"code", "status", "message"}


def test_width_over_512_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_422_naming(create(client, auth, width=1024), "width")


def test_num_frames_over_25_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_422_naming(create(client, auth, num_frames=100), "num_frames")


def test_min_guidance_scale_zero_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_422_naming(create(client, auth, min_guidance_scale=0), "min_guidance_scale")


def test_non_url_init_image_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/jobs", json={"init_image": "not a url"}, headers=auth)
    assert_422_naming(response, "init_image")


def test_unknown_model_lists_supported_ids(client: FlaskClient, auth: dict[str, str]) -> None:
    response = create(client, auth, model_id="svd")
    assert_422_naming(response, "model_id")
    assert "wan2.2" in response.get_json()["message"]
    assert "ltx-2.3" in response.get_json()["message"]


def test_unknown_field_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_422_naming(create(client, auth, colour="red"), "colour")


def test_client_cannot_set_upstream_key_or_webhook(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    assert_422_naming(create(client, auth, key="x"), "key")
    assert_422_naming(create(client, auth, webhook="http://x.example"), "webhook")
    assert_422_naming(create(client, auth, track_id="mine"), "track_id")


def test_body_that_is_not_json_is_400(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post("/v1/jobs", data="{nope", content_type="application/json", headers=auth)
    assert response.status_code == 400
    assert "JSON" in response.get_json()["message"]
    plain = client.post("/v1/jobs", data="hello", content_type="text/plain", headers=auth)
    assert plain.status_code == 415


def test_missing_image_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_422_naming(client.post("/v1/jobs", json={"prompt": "x"}, headers=auth), "init_image")


def test_metadata_over_4kb_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    assert_422_naming(create(client, auth, metadata={"x": "y" * 5000}), "metadata")


def test_private_webhook_url_is_refused(client: FlaskClient, auth: dict[str, str]) -> None:
    response = create(client, auth, webhook_url="http://169.254.169.254/latest")
    assert_422_naming(response, "webhook_url")


def test_multipart_upload_is_stored_and_served(client: FlaskClient, auth: dict[str, str]) -> None:
    image = png_bytes()
    response = client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(image), "cat.png"), "prompt": "a cat", "num_frames": "8"},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert response.status_code == 202, response.get_json()
    job = response.get_json()
    assert job["input"]["num_frames"] == 8
    media = job["input"]["init_image"]
    assert media.startswith("http://127.0.0.1:8000/media/")
    served = client.get(media.removeprefix("http://127.0.0.1:8000"))
    assert served.status_code == 200
    assert served.data == image


def test_upload_of_20_mb_is_413_naming_image(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(b"\0" * (20 * 1024 * 1024)), "big.png")},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert "image" in response.get_json()["message"]


def test_upload_that_is_not_an_image_is_422(client: FlaskClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/jobs",
        data={"image": (io.BytesIO(b"<html>hello</html>"), "x.png")},
        headers=auth,
        content_type="multipart/form-data",
    )
    assert_422_naming(response, "image")


def test_idempotency_key_replays_and_conflicts(client: FlaskClient, auth: dict[str, str]) -> None:
    headers = {**auth, "Idempotency-Key": "abc-123"}
    first = client.post("/v1/jobs", json={"init_image": IMAGE_URL}, headers=headers)
    again = client.post("/v1/jobs", json={"init_image": IMAGE_URL}, headers=headers)
    other = client.post("/v1/jobs", json={"init_image": IMAGE_URL, "fps": 8}, headers=headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    assert other.status_code == 409
    assert "Idempotency-Key" in other.get_json()["message"]
