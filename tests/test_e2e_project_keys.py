"""End to end: projects with their own ModelsLab keys, judged by what the simulator saw.

The simulator takes the instance's key and two project keys, keeps ModelsLab's
queued-request cap per key (per account, as ModelsLab does) and counts every
request under a fingerprint of the key it carried (``/_sim/stats`` ``accounts``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests

from service.devstack import Stack
from service.simulator import key_fingerprint
from tests.conftest import eventually
from tests.test_e2e_core import (
    DEADLINE,
    HTTP_TIMEOUT,
    SMALL_VIDEO,
    STACK_ENV,
    get_job,
    query,
    settle,
    sim_stats,
    submit,
)

pytestmark = pytest.mark.e2e

INSTANCE_KEY = "instance-modelslab-key-0000"
KEY_A = "alpha-own-modelslab-key-1111"
KEY_B = "beta-own-modelslab-key-2222"
ADMIN = {"Authorization": "Bearer admin-token-for-tests"}


def start(make_stack: Callable[..., Stack], *sim_flags: str, **env: str) -> Stack:
    stack = make_stack(
        **{
            **STACK_ENV,
            "MOTIONHOOK_MODELSLAB_API_KEY": INSTANCE_KEY,
            "MOTIONHOOK_ADMIN_TOKENS": ADMIN["Authorization"].removeprefix("Bearer "),
            **env,
        }
    )
    keys = ("--api-key", INSTANCE_KEY, "--api-key", KEY_A, "--api-key", KEY_B)
    stack.start_all("--eta", "1", *keys, *sim_flags)
    return stack


def add_project(stack: Stack, name: str, key: str | None = None) -> dict[str, str]:
    """Create a project (with its own key, if given) through the admin API; its auth header."""
    body: dict[str, Any] = {"name": name}
    if key is not None:
        body["modelslab_api_key"] = key
    project = requests.post(
        f"{stack.web_url}/v1/projects", json=body, headers=ADMIN, timeout=HTTP_TIMEOUT
    )
    assert project.status_code == 201, project.text
    assert key is None or project.json()["modelslab_api_key"] == "***" + key[-4:]
    token = requests.post(
        f"{stack.web_url}/v1/projects/{project.json()['id']}/tokens",
        json={"scope": "write"},
        headers=ADMIN,
        timeout=HTTP_TIMEOUT,
    )
    assert token.status_code == 201, token.text
    return {"Authorization": f"Bearer {token.json()['token']}"}


def submit_as(stack: Stack, auth: dict[str, str]) -> str:
    body = {"init_image": f"{stack.sim_url}/_sim/sample.png", **SMALL_VIDEO}
    response = requests.post(
        f"{stack.web_url}/v1/jobs", json=body, headers=auth, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def job_as(stack: Stack, auth: dict[str, str], job_id: str) -> dict[str, Any]:
    response = requests.get(f"{stack.web_url}/v1/jobs/{job_id}", headers=auth, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def reaches(stack: Stack, auth: dict[str, str], job_id: str, status: str) -> None:
    def reached() -> bool:
        return job_as(stack, auth, job_id)["status"] == status

    eventually(stack, reached, f"job {job_id} to be {status}", DEADLINE)


def account(stack: Stack, key: str) -> dict[str, Any]:
    """What the simulator saw of one key's account."""
    seen: dict[str, Any] = sim_stats(stack)["accounts"][key_fingerprint(key)]
    return seen


def submit_statuses(stack: Stack, key: str) -> dict[str, int]:
    """HTTP statuses of the submits the simulator answered with this key (none: {})."""
    seen = sim_stats(stack)["accounts"].get(key_fingerprint(key))
    return dict(seen["http_statuses"]["submit"]) if seen else {}


def test_each_project_calls_modelslab_with_its_own_key(
    make_stack: Callable[..., Stack],
) -> None:
    # No callbacks: every job completes through a fetch, which must carry the key too.
    stack = start(make_stack, "--delay", "0.3", "--drop-callback", MOTIONHOOK_CALLBACK_GRACE="1")
    alpha, beta = add_project(stack, "alpha", KEY_A), add_project(stack, "beta", KEY_B)
    jobs = {KEY_A: submit_as(stack, alpha), KEY_B: submit_as(stack, beta)}
    default_job = submit(stack)["id"]
    reaches(stack, alpha, jobs[KEY_A], "completed")
    reaches(stack, beta, jobs[KEY_B], "completed")
    settle(stack, default_job, "completed")

    for key in (KEY_A, KEY_B, INSTANCE_KEY):
        seen = account(stack, key)
        assert seen["submits"] == 1 and seen["fetches"] >= 1, (key, seen)
        assert submit_statuses(stack, key) == {"200": 1}, seen
    # Nothing went out with another key (or none), and no key reached a log.
    assert sum(seen["submits"] for seen in sim_stats(stack)["accounts"].values()) == 3
    for process in stack.processes:
        if process.name != "simulator":
            assert KEY_A not in process.log() and KEY_B not in process.log(), process.name


def test_a_429_on_one_account_does_not_pause_another(make_stack: Callable[..., Stack]) -> None:
    # motionhook believes in 3 slots; ModelsLab gives each account 1 and pauses for 60 s.
    stack = start(
        make_stack,
        *("--delay", "30", "--max-queued", "1", "--rate-limit-retry-after", "60"),
        MOTIONHOOK_MODELSLAB_MAX_QUEUED="3",
    )
    alpha, beta = add_project(stack, "alpha", KEY_A), add_project(stack, "beta", KEY_B)
    first = submit_as(stack, alpha)
    reaches(stack, alpha, first, "processing")
    refused = submit_as(stack, alpha)
    eventually(
        stack,
        lambda: "429" in submit_statuses(stack, KEY_A),
        "ModelsLab to refuse alpha's second job",
        DEADLINE,
    )
    beta_job = submit_as(stack, beta)
    reaches(stack, beta, beta_job, "processing")

    assert job_as(stack, alpha, refused)["status"] == "queued"
    assert submit_statuses(stack, KEY_B) == {"200": 1}
    paused = {
        row.account: row.paused_until is not None
        for row in query(stack, "SELECT account, paused_until FROM upstream_capacity")
    }
    assert list(paused.values()).count(True) == 1, paused
    assert paused.get("default") is not True


def test_the_cap_is_counted_per_account_and_shared_by_projects_without_a_key(
    make_stack: Callable[..., Stack],
) -> None:
    stack = start(
        make_stack,
        *("--delay", "30", "--max-queued", "1"),
        MOTIONHOOK_MODELSLAB_MAX_QUEUED="1",
    )
    keyless, alpha = add_project(stack, "keyless"), add_project(stack, "alpha", KEY_A)
    default_job = submit(stack)["id"]
    settle(stack, default_job, "processing")
    waiting = submit_as(stack, keyless)
    own = submit_as(stack, alpha)
    # Created after the keyless project's job, alpha's goes out on its own account's
    # slot while the keyless one waits for the default account's only slot.
    reaches(stack, alpha, own, "processing")
    job = job_as(stack, keyless, waiting)
    assert job["status"] == "queued" and job["queue_position"] == 1
    assert get_job(stack, default_job)["queue_position"] is None

    stats = sim_stats(stack)
    assert "429" not in stats["http_statuses"]["submit"]
    assert account(stack, INSTANCE_KEY)["max_outstanding"] == 1
    assert account(stack, KEY_A)["max_outstanding"] == 1
