"""``GET /v1/events``: every event, oldest first, after a cursor, never one skipped."""

from __future__ import annotations

from alembic import command
from flask.testing import FlaskClient
from sqlalchemy import text

from service.db import Database
from service.events import new_event
from service.extension import Services
from service.migrate import alembic_config, upgrade
from service.models import DEFAULT_PROJECT_ID
from service.projects import create_project


def add_events(
    services: Services, *types: str, job_id: str | None = "job_a", project: str = DEFAULT_PROJECT_ID
) -> list[str]:
    ids = []
    for event_type in types:
        with services.db.transaction() as session:
            ids.append(
                new_event(
                    session, event_type, {"n": len(ids)}, job_id=job_id, project_id=project
                ).id
            )
    return ids


def test_events_are_listed_oldest_first(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    ids = add_events(services, "job.processing", "job.completed", "test.ping")
    page = client.get("/v1/events", headers=auth).json
    assert [item["id"] for item in page["items"]] == ids
    assert page["items"][1]["type"] == "job.completed"
    assert page["items"][1]["data"] == {"n": 1}
    assert page["next_cursor"] is None


def test_pages_follow_next_cursor_to_the_end(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    ids = add_events(services, *["job.processing"] * 5)
    seen: list[str] = []
    query = "limit=2"
    while True:
        page = client.get(f"/v1/events?{query}", headers=auth).json
        seen += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        query = f"limit=2&after={page['next_cursor']}"
    assert seen == ids


def test_after_returns_only_newer_events(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    ids = add_events(services, "job.processing", "job.completed", "job.failed")
    page = client.get(f"/v1/events?after={ids[0]}", headers=auth).json
    assert [item["id"] for item in page["items"]] == ids[1:]


def test_filters_by_type_and_job(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    mine = add_events(services, "job.processing", "job.completed", job_id="job_mine")
    add_events(services, "job.processing", job_id="job_other")
    by_job = client.get("/v1/events?job_id=job_mine", headers=auth).json
    assert [item["id"] for item in by_job["items"]] == mine
    by_type = client.get("/v1/events?type=job.completed", headers=auth).json
    assert [item["id"] for item in by_type["items"]] == mine[1:]


def test_unknown_cursor_and_type_are_422_naming_the_field(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    response = client.get("/v1/events?after=evt_nope", headers=auth)
    assert response.status_code == 422
    assert response.json["message"].startswith("after:")
    response = client.get("/v1/events?type=job.exploded", headers=auth)
    assert response.status_code == 422
    assert "type" in response.json["message"]


def test_bad_stream_inputs_are_422_naming_the_field(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    response = client.get("/v1/events/stream?type=job.exploded", headers=auth)
    assert response.status_code == 422 and "type" in response.json["message"]
    response = client.get("/v1/events/stream", headers={**auth, "Last-Event-ID": "evt_nope"})
    assert response.status_code == 422
    assert response.json["message"].startswith("Last-Event-ID:")
    assert client.get("/v1/jobs/job_nope/stream", headers=auth).status_code == 404


def test_events_require_a_token(client: FlaskClient) -> None:
    assert client.get("/v1/events").status_code == 401
    assert client.get("/v1/events/stream").status_code == 401


def test_an_event_committed_behind_an_open_transaction_waits_for_it(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    """The cursor never passes an event that a slower transaction has yet to commit."""
    if services.db.is_sqlite:
        return  # one writer at a time: commits happen in insert order
    slow = services.db.sessions()
    slow.begin()
    early = new_event(
        slow, "job.processing", {}, job_id="job_slow", project_id=DEFAULT_PROJECT_ID
    ).id
    slow.flush()  # inserted, so positioned, but not committed
    (late,) = add_events(services, "job.completed")
    assert client.get("/v1/events", headers=auth).json["items"] == []  # after 1 s of waiting
    slow.commit()
    slow.close()
    items = client.get("/v1/events", headers=auth).json["items"]
    assert [item["id"] for item in items] == [early, late]


def test_migration_orders_existing_events_by_creation(stack_database_url: str) -> None:
    db = Database(stack_database_url)
    command.upgrade(alembic_config(db), "0001")
    with db.engine.begin() as conn:
        for event_id, created in (("evt_b", "2026-01-02"), ("evt_a", "2026-01-01")):
            conn.execute(
                text(
                    "INSERT INTO events (id, type, created_at, payload) "
                    "VALUES (:id, 'job.processing', :created, '{}')"
                ),
                {"id": event_id, "created": created},
            )
    upgrade(db)
    with db.transaction() as session:
        new_event(session, "job.completed", {}, job_id=None, project_id=DEFAULT_PROJECT_ID)
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT id FROM events ORDER BY txid, seq")).scalars().all()
    db.dispose()
    assert rows[:2] == ["evt_a", "evt_b"] and len(rows) == 3


def test_another_projects_events_are_invisible(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    with services.db.transaction() as session:
        other = create_project(session, "other").id
    (theirs,) = add_events(services, "job.completed", project=other)
    mine = add_events(services, "job.completed")
    items = client.get("/v1/events", headers=auth).json["items"]
    assert [item["id"] for item in items] == mine
    response = client.get(f"/v1/events?after={theirs}", headers=auth)
    assert response.status_code == 422  # an id of another project is no event of ours
