"""The callback endpoint and the job state machine, through the Flask client."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import func, select

from schemas.upstream import UpstreamResult
from service.callbacks import callback_token
from service.extension import Services
from service.jobs import apply_upstream_result, fail_job
from service.models import CallbackRecord, Event, Job, Task

SUCCESS = {
    "status": "success",
    "id": 146,
    "output": ["https://cdn.example/v.mp4"],
    "generationTime": 4.2,
}


def new_job(client: FlaskClient, auth: dict[str, str]) -> str:
    response = client.post(
        "/v1/jobs", json={"init_image": "https://example.com/a.png"}, headers=auth
    )
    return str(response.get_json()["id"])


def counts(services: Services, job_id: str) -> dict[str, Any]:
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return {
            "status": job.status,
            "upstream_status": job.upstream_status,
            "events": sorted(session.scalars(select(Event.type).where(Event.job_id == job_id))),
            "callbacks": session.scalar(
                select(func.count())
                .select_from(CallbackRecord)
                .where(CallbackRecord.job_id == job_id)
            ),
            "tasks": sorted(session.scalars(select(Task.kind).where(Task.job_id == job_id))),
        }


def test_wrong_missing_and_other_job_tokens_are_401_and_change_nothing(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    other_id = new_job(client, auth)
    before = counts(services, job_id)
    assert post_callback(job_id, SUCCESS, sig="wrong").status_code == 401
    assert post_callback(job_id, SUCCESS, sig="").status_code == 401
    no_sig = client.post(f"/v1/callbacks/modelslab/{job_id}", json=SUCCESS)
    assert no_sig.status_code == 401
    other_token = callback_token("test-callback-secret", other_id)
    assert post_callback(job_id, SUCCESS, sig=other_token).status_code == 401
    assert counts(services, job_id) == before


def test_previous_secret_is_accepted_during_rotation(
    client: FlaskClient, auth: dict[str, str], app: Any, services: Services, post_callback: Any
) -> None:
    from dataclasses import replace

    job_id = new_job(client, auth)
    services.settings = replace(
        services.settings,
        callback_secret="new-secret",
        callback_secret_previous="test-callback-secret",
    )
    assert post_callback(job_id, SUCCESS).status_code == 200


def test_success_callback_queues_download_and_duplicates_do_nothing(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    first = post_callback(job_id, {**SUCCESS, "track_id": job_id})
    assert first.status_code == 200
    assert first.get_json()["outcome"] == "applied"
    second = post_callback(job_id, SUCCESS)
    assert second.get_json()["outcome"] == "duplicate"
    state = counts(services, job_id)
    assert state["status"] == "processing"
    assert state["upstream_status"] == "success"
    assert state["tasks"] == ["download"]
    assert state["callbacks"] == 2
    assert state["events"] == []


def test_callback_for_finished_job_is_recorded_without_event(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    assert post_callback(job_id, {"status": "failed", "message": "nsfw"}).status_code == 200
    before = counts(services, job_id)
    assert before["status"] == "failed"
    assert before["events"] == ["job.failed"]
    late = post_callback(job_id, {"status": "processing", "id": 146, "eta": 9})
    late_success = post_callback(job_id, SUCCESS)
    assert late.status_code == 200 and late_success.status_code == 200
    after = counts(services, job_id)
    assert after["events"] == ["job.failed"]
    assert after["callbacks"] == 3
    assert after["status"] == "failed"


def test_processing_then_late_processing_emits_one_event(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    body = {"status": "processing", "id": "146", "eta": 30, "meta": {"track_id": job_id}}
    assert post_callback(job_id, body).get_json()["outcome"] == "applied"
    assert post_callback(job_id, body).get_json()["outcome"] == "duplicate"
    state = counts(services, job_id)
    assert state["status"] == "processing"
    assert state["events"] == ["job.processing"]
    assert "reconcile" in state["tasks"]
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert job["upstream"] == {"id": "146", "status": "processing", "eta": 30.0}


def test_callback_before_submit_response_wins(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    assert post_callback(job_id, SUCCESS).get_json()["outcome"] == "applied"
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        late_submit = UpstreamResult(status="processing", upstream_id="146", eta=60)
        outcome = apply_upstream_result(
            session,
            services.db,
            job,
            late_submit,
            callback_grace=600,
            job_timeout=7200,
            media_url=services.media_url,
        )
    assert outcome == "duplicate"
    state = counts(services, job_id)
    assert state["upstream_status"] == "success"
    assert state["events"] == []
    assert state["tasks"] == ["download"]


def test_malformed_authenticated_body_is_400_and_stored(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    response = post_callback(job_id, None, raw=b"{not json")
    assert response.status_code == 400
    assert "JSON" in response.get_json()["message"]
    assert post_callback(job_id, {"no": "status"}).status_code == 400
    with services.db.transaction() as session:
        bodies = list(
            session.scalars(select(CallbackRecord.body).where(CallbackRecord.job_id == job_id))
        )
    assert "{not json" in bodies


def test_tolerant_shapes_messege_and_error_status(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    response = post_callback(job_id, {"status": "error", "messege": "out of credits", "id": 1})
    assert response.status_code == 200
    job = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "upstream_error", "message": "out of credits"}


def test_track_id_mismatch_is_400(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    assert post_callback(job_id, {**SUCCESS, "track_id": "someone-else"}).status_code == 400
    assert counts(services, job_id)["status"] == "queued"


def test_success_after_timeout_still_completes(
    client: FlaskClient, auth: dict[str, str], services: Services, post_callback: Any
) -> None:
    job_id = new_job(client, auth)
    with services.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        fail_job(session, services.db, job, "timeout", "too slow", services.media_url)
    assert post_callback(job_id, SUCCESS).get_json()["outcome"] == "applied"
    assert counts(services, job_id)["tasks"] == ["download"]
