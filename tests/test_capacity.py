"""Slot accounting and the order of submits, in the database (no HTTP, no upstream)."""

from __future__ import annotations

from datetime import timedelta

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from service.capacity import claim_submits, queue_position, settle_submit, slots_in_use
from service.extension import Services
from service.models import Job, Project, UpstreamCapacity, utcnow
from service.projects import set_modelslab_key
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


def settle(
    session: Session,
    services: Services,
    job: Job | None,
    *,
    accepted: bool = False,
    rate_limited: bool = False,
    retry_after: float | None = None,
    max_queued: int = 3,
) -> None:
    """What the worker does with ModelsLab's answer to ``job``'s submit."""
    assert job is not None
    settle_submit(
        session,
        services.db,
        job,
        accepted=accepted,
        rate_limited=rate_limited,
        retry_after=retry_after,
        max_queued=max_queued,
    )


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
        settle(session, services, job)
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
        settle(session, services, job)
    assert claim(services, 10) == [batch[2]]


def test_a_429_pauses_the_account_then_lets_one_probe_out(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 6)
    assert claim(services, 10) == batch[:3]
    with services.db.transaction() as session:
        settle(session, services, session.get(Job, batch[2]), rate_limited=True, retry_after=0.5)
        state = session.get(UpstreamCapacity, "default")
        assert state is not None and state.effective_cap == 2 and state.probing
    # Paused (claim looks one second ahead: past the pause), then one probe at a time.
    assert claim(services, 10) == [batch[3]]
    assert claim(services, 10) == []
    with services.db.transaction() as session:
        settle(session, services, session.get(Job, batch[3]), accepted=True)
        state = session.get(UpstreamCapacity, "default")
        assert state is not None and not state.probing and state.probe_job_id is None
        assert slots_in_use(session)["default"] == 3


def own_key(services: Services, project_id: str, key: str) -> None:
    with services.db.transaction() as session:
        project = session.get(Project, project_id)
        assert project is not None
        set_modelslab_key(project, key, services.settings.modelslab_api_key)


def test_a_project_with_its_own_key_has_its_own_slots(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 4)
    keyless = add_project(services.db, "keyless")
    shared = create(client, keyless.auth, 2)
    owner = add_project(services.db, "owner")
    own_key(services, owner.project_id, "own-modelslab-key-0001")
    own = create(client, owner.auth, 4)

    # Three slots on each account: the default one taken in turns by the two projects
    # without a key, the owner's account by the owner alone.
    claimed = claim(services, 10)
    assert sorted(claimed) == sorted([batch[0], shared[0], batch[1], *own[:3]])
    assert claim(services, 10) == []
    with services.db.transaction() as session:
        in_use = slots_in_use(session)
        assert in_use["default"] == 3 and sum(in_use.values()) == 6
        assert queue_position(session, session.get(Job, own[3])) == 1
        assert queue_position(session, session.get(Job, shared[1])) == 1
        assert queue_position(session, session.get(Job, batch[2])) == 2


def test_a_429_pauses_only_its_own_account(
    client: FlaskClient, auth: dict[str, str], services: Services
) -> None:
    batch = create(client, auth, 4)
    owner = add_project(services.db, "owner")
    own_key(services, owner.project_id, "own-modelslab-key-0001")
    own = create(client, owner.auth, 2)
    assert sorted(claim(services, 2, max_queued=1)) == sorted([batch[0], own[0]])
    with services.db.transaction() as session:
        settle(
            session,
            services,
            session.get(Job, batch[0]),
            rate_limited=True,
            retry_after=60,
            max_queued=1,
        )
        settle(session, services, session.get(Job, own[0]), max_queued=1)
        paused = session.get(UpstreamCapacity, "default")
        assert paused is not None and paused.paused_until is not None
    # The default account waits out its minute; the owner's next job goes out.
    assert claim(services, 10, max_queued=1) == [own[1]]
