"""Fan-out stays inside the project, and per-job webhooks are signed with the project's secret.

A real worker, with real HTTP sinks on loopback for ModelsLab and every target.
The stand-in ModelsLab refuses every job, so each job fails at once and fans out
``job.failed``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service.extension import Services
from service.models import Delivery
from service.worker import Worker
from tests.sinks import Received, Sink
from tests.tenants import Tenant, add_project

REFUSED = (200, {"Content-Type": "application/json"}, b'{"status":"error","message":"bad image"}')
IMAGE = "https://example.com/a.png"


@pytest.fixture
def sinks() -> Iterator[dict[str, Sink]]:
    made = {
        name: Sink(lambda _n, _r: REFUSED) if name == "modelslab" else Sink()
        for name in ("modelslab", "alpha_sub", "alpha_job", "beta_sub", "beta_job", "default_job")
    }
    yield made
    for sink in made.values():
        sink.close()


@pytest.fixture
def loopback(services: Services, sinks: dict[str, Sink]) -> Services:
    """ModelsLab and every target on loopback sinks."""
    services.settings = replace(
        services.settings,
        allow_private_targets=True,
        modelslab_base_url=sinks["modelslab"].url,
        delivery_timeout=2.0,
    )
    return services


def work(services: Services) -> None:
    """Run a real worker until no work is due: submit (refused), fan out, deliver."""
    Worker(services).run(once=True)


def subscribe(client: FlaskClient, tenant: Tenant, url: str) -> str:
    response = client.post(
        "/v1/subscriptions", json={"kind": "webhook", "url": url}, headers=tenant.auth
    )
    assert response.status_code == 201, response.get_json()
    return str(response.get_json()["id"])


def submit(client: FlaskClient, auth: dict[str, str], webhook_url: str) -> str:
    body = {"init_image": IMAGE, "webhook_url": webhook_url}
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 202, response.get_json()
    return str(response.get_json()["id"])


def verifies(secret: str, request: Received) -> bool:
    try:
        Webhook(secret).verify(request.body, request.headers)
    except WebhookVerificationError:
        return False
    return True


def job_of(request: Received) -> str:
    return str(json.loads(request.body)["data"]["id"])


@pytest.mark.usefixtures("loopback")
def test_fan_out_and_per_job_webhooks_stay_inside_each_project(
    client: FlaskClient, services: Services, sinks: dict[str, Sink], auth: dict[str, str]
) -> None:
    alpha = add_project(services.db, "alpha")
    beta = add_project(services.db, "beta")
    alpha_sub = subscribe(client, alpha, sinks["alpha_sub"].url)
    beta_sub = subscribe(client, beta, sinks["beta_sub"].url)

    alpha_job = submit(client, alpha.auth, sinks["alpha_job"].url)
    work(services)
    [to_alpha_sub] = sinks["alpha_sub"].wait_for(1)
    [to_alpha_job] = sinks["alpha_job"].wait_for(1)
    assert job_of(to_alpha_sub) == job_of(to_alpha_job) == alpha_job
    with services.db.transaction() as session:
        targets = session.scalars(
            select(Delivery.subscription_id).where(Delivery.job_id == alpha_job)
        ).all()
    assert sorted(targets, key=str) == sorted([alpha_sub, None], key=str)

    # B's own job reaches B's subscription, which never saw A's.
    beta_job = submit(client, beta.auth, sinks["beta_job"].url)
    work(services)
    [to_beta_job] = sinks["beta_job"].wait_for(1)
    [to_beta_sub] = sinks["beta_sub"].wait_for(1)
    assert job_of(to_beta_sub) == job_of(to_beta_job) == beta_job
    assert [job_of(r) for r in sinks["alpha_sub"].received] == [alpha_job]
    assert beta_sub not in targets

    # Each project's per-job webhooks verify with its own secret, and only with it.
    default_secret = services.settings.webhook_secret
    assert verifies(alpha.webhook_secret, to_alpha_job)
    assert not verifies(beta.webhook_secret, to_alpha_job)
    assert not verifies(default_secret, to_alpha_job)
    assert verifies(beta.webhook_secret, to_beta_job)
    assert not verifies(alpha.webhook_secret, to_beta_job)

    # Project ``default`` (the env token) still signs with MOTIONHOOK_WEBHOOK_SECRET.
    submit(client, auth, sinks["default_job"].url)
    work(services)
    [to_default_job] = sinks["default_job"].wait_for(1)
    assert verifies(default_secret, to_default_job)
    assert not verifies(alpha.webhook_secret, to_default_job)
