"""Slot accounting and the order of submits, in the database (no HTTP, no upstream)."""

from __future__ import annotations

from datetime import timedelta

from flask.testing import FlaskClient

from service.capacity import claim_submits, queue_position, settle_submit, slots_in_use
from service.extension import Services
from service.models import Job, UpstreamCapacity, utcnow
from tests.tenants import add_project

BODY = {"init_image": "https://example.com/in.png"}


def create(client: FlaskClient, auth: dict[str, str], count: int) -> list[str]:
    ids = []
    for _ in range(count):
        response = client.post("/v1/jobs", json=BODY, headers=auth)
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])
    return ids


def claim(services: Services, limit: int, max_queued: int = 3) -> list[str]:
    with services.db.transaction() as session:
        tasks = claim_submits(
            session,
            services.db,
            owner="test",
            lease=60,
            limit=limit,
            max_queued=max_queued,
            now=utcnow() + timedelta(seconds=1),
        )
        return [task.job_id for task in tasks]


def test_submits_take_turns_across_projects_oldest_first_in_each(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 5)
    other = add_project(services.db, "other")
    single = create(client, other.auth, 1)

    assert claim(services, 10, max_queued=10) == [batch[0], single[0], *batch[1:]]


def test_a_project_holding_every_slot_waits_for_one_holding_none(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 6)
    assert claim(services, 10) == batch[:3]
    other = add_project(services.db, "other")
    single = create(client, other.auth, 1)
    with services.db.transaction() as session:
        assert queue_position(session, session.get(Job, single[0])) == 1
        job = session.get(Job, batch[0])
        settle_submit(
            session,
            services.db,
            job,
            accepted=False,
            rate_limited=False,
            retry_after=None,
            max_queued=3,
        )
    assert claim(services, 10) == single


def test_the_cap_holds_and_positions_count_what_waits(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 5)
    other = add_project(services.db, "other")
    single = create(client, other.auth, 1)

    assert claim(services, 10) == [batch[0], single[0], batch[1]]
    assert claim(services, 10) == []
    with services.db.transaction() as session:
        assert slots_in_use(session)["default"] == 3
        positions = [queue_position(session, session.get(Job, job_id)) for job_id in batch]
    assert positions == [None, None, 1, 2, 3]
    # ModelsLab refused one (not a 429): its slot is free again, for the next in line.
    with services.db.transaction() as session:
        job = session.get(Job, batch[1])
        settle_submit(
            session,
            services.db,
            job,
            accepted=False,
            rate_limited=False,
            retry_after=None,
            max_queued=3,
        )
    assert claim(services, 10) == [batch[2]]


def test_a_429_pauses_everything_then_lets_one_probe_out(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 6)
    assert claim(services, 10) == batch[:3]
    with services.db.transaction() as session:
        settle_submit(
            session,
            services.db,
            session.get(Job, batch[2]),
            accepted=False,
            rate_limited=True,
            retry_after=0.5,
            max_queued=3,
        )
        state = session.get(UpstreamCapacity, "default")
        assert state is not None and state.effective_cap == 2 and state.probing
    # Paused (claim looks one second ahead: past the pause), then one probe at a time.
    assert claim(services, 10) == [batch[3]]
    assert claim(services, 10) == []
    with services.db.transaction() as session:
        settle_submit(
            session,
            services.db,
            session.get(Job, batch[3]),
            accepted=True,
            rate_limited=False,
            retry_after=None,
            max_queued=3,
        )
        state = session.get(UpstreamCapacity, "default")
        assert state is not None and not state.probing and state.probe_job_id is None
        assert slots_in_use(session)["default"] == 3
