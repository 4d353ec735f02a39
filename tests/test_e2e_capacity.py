"""End to end: the ModelsLab queued-request cap, against the simulator's own record.

The simulator counts generations submitted and not finished (``outstanding``,
``max_outstanding``) and answers 429 with ModelsLab's body past its cap, so
these tests judge motionhook by what ModelsLab would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from service.devstack import Stack
from tests.conftest import eventually
from tests.test_e2e_core import STACK_ENV, get_job, query, settle, sim_stats, submit

pytestmark = pytest.mark.e2e

CAP = 3
DEADLINE = 60.0


def start(make_stack: Callable[..., Stack], *sim_flags: str, workers: int = 1, **env: str) -> Stack:
    stack = make_stack(**{**STACK_ENV, "MOTIONHOOK_MODELSLAB_MAX_QUEUED": str(CAP), **env})
    stack.start_all("--delay", "0.6", "--eta", "1", "--max-queued", str(CAP), *sim_flags)
    for _ in range(workers - 1):
        stack.start_worker()
    return stack


def all_settled(stack: Stack, job_ids: list[str], status: str = "completed") -> Any:
    def done() -> bool:
        return all(get_job(stack, job_id)["status"] == status for job_id in job_ids)

    return eventually(stack, done, f"{len(job_ids)} jobs to be {status}", DEADLINE)


def test_a_batch_of_three_times_the_cap_completes_without_a_429(
    make_stack: Callable[..., Stack],
) -> None:
    stack = start(make_stack)
    jobs = [submit(stack) for _ in range(3 * CAP)]
    # While the first ones generate, the rest wait their turn in order and say where.
    waiting = [get_job(stack, job["id"]) for job in jobs[CAP + 1 :]]
    positions = [job["queue_position"] for job in waiting if job["status"] == "queued"]
    assert positions == sorted(positions) and all(p >= 1 for p in positions)
    all_settled(stack, [job["id"] for job in jobs])
    stats = sim_stats(stack)
    assert stats["http_statuses"]["submit"] == {"200": 3 * CAP}
    assert stats["max_outstanding"] == CAP
    assert all(get_job(stack, job["id"])["queue_position"] is None for job in jobs)


@pytest.mark.postgresql
@pytest.mark.parametrize("stack_database_url", ["postgresql"], indirect=True)
def test_two_workers_on_postgresql_never_exceed_the_cap_together(
    make_stack: Callable[..., Stack],
) -> None:
    stack = start(make_stack, workers=2)
    jobs = [submit(stack) for _ in range(4 * CAP)]
    all_settled(stack, [job["id"] for job in jobs])
    stats = sim_stats(stack)
    assert stats["max_outstanding"] <= CAP
    assert "429" not in stats["http_statuses"]["submit"]
    assert stats["submits"] == 4 * CAP


def test_a_429_pauses_submissions_and_one_probe_recovers(
    make_stack: Callable[..., Stack],
) -> None:
    # Another program holds two of the three slots: ModelsLab takes one job of ours.
    stack = start(make_stack, "--held-slots", "2", "--rate-limit-retry-after", "1")
    jobs = [submit(stack) for _ in range(4)]
    all_settled(stack, [job["id"] for job in jobs])
    stats = sim_stats(stack)
    statuses = stats["http_statuses"]["submit"]
    # Every job was taken exactly once; each refusal paused everything for retry_after
    # (one second) and was followed by a single probe, so refusals stay few.
    assert statuses["200"] == 4
    assert 1 <= statuses.get("429", 0) <= 4
    assert stats["max_outstanding"] == 1
    rows = query(stack, "SELECT effective_cap, probing FROM upstream_capacity")
    assert rows[0].effective_cap == 1


def test_the_queue_timeout_fails_only_jobs_that_never_reached_modelslab(
    make_stack: Callable[..., Stack],
) -> None:
    # One slot, a 15-second generation: the two jobs behind it wait past their 3 s,
    # however slowly a busy machine creates them.
    stack = start(
        make_stack,
        "--delay",
        "15",
        MOTIONHOOK_MODELSLAB_MAX_QUEUED="1",
        MOTIONHOOK_QUEUE_TIMEOUT="3",
    )
    first, *behind = [submit(stack) for _ in range(3)]
    for job in behind:
        failed = settle(stack, job["id"], "failed")
        assert failed["error"]["code"] == "queue_timeout"
        assert failed["upstream"]["id"] is None
    completed = settle(stack, first["id"], "completed", timeout=DEADLINE)
    assert completed["error"] is None
    assert sim_stats(stack)["submits"] == 1


def test_another_projects_single_job_starts_within_one_turnover(
    make_stack: Callable[..., Stack],
) -> None:
    stack = start(make_stack, "--delay", "1.5", MOTIONHOOK_ADMIN_TOKENS="admin-token-for-tests")
    admin = {"Authorization": "Bearer admin-token-for-tests"}
    api = stack.api()
    project = api.post(f"{stack.web_url}/v1/projects", json={"name": "other"}, headers=admin)
    assert project.status_code == 201, project.text
    token = api.post(
        f"{stack.web_url}/v1/projects/{project.json()['id']}/tokens",
        json={"scope": "write"},
        headers=admin,
    )
    assert token.status_code == 201, token.text
    batch = [submit(stack) for _ in range(4 * CAP)]
    other = api.post(
        f"{stack.web_url}/v1/jobs",
        json={"init_image": f"{stack.sim_url}/_sim/sample.png", "width": 128, "height": 128},
        headers={"Authorization": f"Bearer {token.json()['token']}"},
    )
    assert other.status_code == 202, other.text
    all_settled(stack, [job["id"] for job in batch])
    rows = query(
        stack,
        "SELECT id, submitted_at FROM jobs WHERE submitted_at IS NOT NULL ORDER BY submitted_at",
    )
    order = [row.id for row in rows]
    # When it arrived the batch held every slot: the next slot to free was its.
    assert order.index(other.json()["id"]) <= CAP + 1
