"""End to end to brokers: gunicorn ``web``, ``motionhook worker``, the simulator, and real
RabbitMQ, NATS JetStream, Redis and a moto server for SQS and EventBridge.

Subscriptions are made through the API; the outcome is judged by what a consumer
reads from each broker and what the deliveries API says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from service.devstack import SAMPLE_IMAGE
from tests.brokers import (
    AWS_ENV,
    REDIS,
    AmqpQueue,
    NatsStream,
    Server,
    aws_client,
    moto_server,
    redis_entries,
    redis_server,
    servers,
    sqs_messages,
    unique,
    verify,
)
from tests.conftest import eventually
from tests.sinks import Sink
from tests.test_e2e_fanout import FAST_RETRIES, SMALL_VIDEO, Api, all_settled, start

__all__ = ["servers", "start"]  # the fixtures, imported for the tests below

pytestmark = pytest.mark.e2e


@pytest.fixture
def destinations(tmp_path: Path, servers: list[Server]) -> Iterator[dict[str, Any]]:
    """A fresh exchange+queue, stream, Redis stream, SQS queues and event bus (via moto)."""
    moto = moto_server(tmp_path).start()
    servers.append(moto)
    endpoint = f"http://127.0.0.1:{moto.port}"
    sqs, events = aws_client("sqs", endpoint), aws_client("events", endpoint)
    bus = unique("mh-test-")
    events.create_event_bus(Name=bus)
    bus_queue = sqs.create_queue(QueueName=unique("mh-test-"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=bus_queue, AttributeNames=["QueueArn"])
    events.put_rule(Name="all", EventBusName=bus, EventPattern='{"source": ["motionhook"]}')
    events.put_targets(
        Rule="all",
        EventBusName=bus,
        Targets=[{"Id": "q", "Arn": arn["Attributes"]["QueueArn"]}],
    )
    made = {
        "endpoint": endpoint,
        "sqs": sqs,
        "amqp": AmqpQueue(),
        "nats": NatsStream().create(),
        "redis": unique("mh-test-"),
        "queue": sqs.create_queue(
            QueueName=unique("mh-test-") + ".fifo", Attributes={"FifoQueue": "true"}
        )["QueueUrl"],
        "bus": bus,
        "bus_queue": bus_queue,
    }
    yield made
    made["amqp"].close()
    made["nats"].delete()
    redis.Redis.from_url(REDIS).delete(made["redis"])


@pytest.fixture
def brokers_stack(start: Callable[..., Api], destinations: dict[str, Any]) -> Callable[[], Api]:
    """A stack (simulator, web, one worker) that reaches moto, with fast retries."""

    def start_stack() -> Api:
        return start(
            simulator=True,
            **FAST_RETRIES,
            **AWS_ENV,
            MOTIONHOOK_AWS_ENDPOINT_URL=destinations["endpoint"],
            MOTIONHOOK_LOG_LEVEL="DEBUG",
        )

    return start_stack


def subscribe_all(api: Api, made: dict[str, Any], hook: Sink) -> dict[str, dict[str, Any]]:
    urls = {
        "amqp": made["amqp"].url,
        "nats": made["nats"].url(),
        "redis": f"{REDIS}?stream={made['redis']}&maxlen=1000",
        "sqs": made["queue"],
        "eventbridge": f"eventbridge://{made['bus']}?region=us-east-1",
        "webhook": hook.url,
    }
    return {kind: api.subscribe(kind, url, ["job.completed"]) for kind, url in urls.items()}


def received(made: dict[str, Any]) -> dict[str, list[tuple[dict[str, str], bytes]]]:
    return {
        "amqp": [(props.headers, body) for props, body in made["amqp"].messages()],
        "nats": made["nats"].messages(),
        "redis": redis_entries(REDIS, made["redis"]),
        "eventbridge": sqs_messages(made["sqs"], made["bus_queue"]),
    }


def test_one_job_gives_exactly_one_signed_message_per_destination(
    brokers_stack: Callable[[], Api], destinations: dict[str, Any]
) -> None:
    api = brokers_stack()
    hook = Sink()
    try:
        subs = subscribe_all(api, destinations, hook)
        with SAMPLE_IMAGE.open("rb") as image:
            job = api.call(
                "POST",
                "/v1/jobs",
                202,
                files={"image": ("sample.png", image, "image/png")},
                data={k: str(v) for k, v in SMALL_VIDEO.items()},
            )
        settled = eventually(
            api.stack,
            lambda: (
                lambda items: (
                    items
                    if len(items) == 6 and all(item["status"] == "delivered" for item in items)
                    else None
                )
            )(api.deliveries(job_id=job["id"])),
            "six deliveries of job.completed",
            timeout=60,
        )
        (webhook_request,) = hook.received
    finally:
        hook.close()
    body = webhook_request.body
    event = verify(
        subs["webhook"]["secret"], body, {**webhook_request.headers, "event-type": "job.completed"}
    )
    assert event["data"]["id"] == job["id"]

    messages = received(destinations)
    for kind in ("amqp", "nats", "redis"):
        ((headers, message_body),) = messages[kind]
        assert message_body == body, kind  # byte for byte what the webhook got
        assert verify(subs[kind]["secret"], message_body, headers)["id"] == event["id"]
    ((_attributes, bus_event),) = messages["eventbridge"]
    routed = json.loads(bus_event)
    assert (routed["source"], routed["detail-type"]) == ("motionhook", "job.completed")
    assert routed["detail"] == event
    # Every attempt is on record with the broker's answer.
    answers = {
        item["kind"]: api.delivery(item["id"])["attempts"][0]["response_excerpt"]
        for item in settled
    }
    assert answers["amqp"].startswith("confirmed")
    assert answers["nats"].startswith("PubAck")
    assert answers["redis"].startswith("XADD")
    assert answers["sqs"].startswith("MessageId")
    assert answers["eventbridge"].startswith("EventId")

    # A replayed delivery is published again, and JetStream and SQS FIFO drop the copy.
    replayed = [item["id"] for item in settled if item["kind"] in ("nats", "sqs")]
    for delivery_id in replayed:
        api.call("POST", f"/v1/deliveries/{delivery_id}/retry", 202)
    twice = eventually(
        api.stack,
        lambda: (
            all_settled(api, replayed, "delivered")
            if all(api.delivery(i)["attempt_count"] == 2 for i in replayed)
            else None
        ),
        "the replays",
    )
    nats_answer = next(d for d in twice if d["kind"] == "nats")["attempts"][-1]["response_excerpt"]
    assert "duplicate" in nats_answer
    assert len(destinations["nats"].messages()) == 1
    # Read only now: moto forgets a FIFO de-duplication id once its message is deleted
    # (SQS keeps it for five minutes).
    ((headers, message_body),) = sqs_messages(destinations["sqs"], destinations["queue"])
    assert message_body == body
    assert verify(subs["sqs"]["secret"], message_body, headers)["id"] == event["id"]


def test_wrong_credentials_disable_the_subscription_and_never_leak(
    brokers_stack: Callable[[], Api],
    servers: list[Server],
    tmp_path: Path,
    destinations: dict[str, Any],
) -> None:
    password = "wrong-" + unique("")
    (tmp_path / "guarded").mkdir()
    guarded = redis_server(tmp_path / "guarded", password="right-" + unique("")).start()
    servers.append(guarded)
    api = brokers_stack()
    subs = [
        api.subscribe(
            "amqp",
            f"amqp://guest:{password}@127.0.0.1:5672/?exchange={destinations['amqp'].exchange}",
        ),
        api.subscribe("redis", f"redis://:{password}@127.0.0.1:{guarded.port}/0?stream=s"),
    ]
    pings = [api.ping(sub["id"]) for sub in subs]

    failed = eventually(
        api.stack, lambda: all_settled(api, [p["delivery_id"] for p in pings], "failed"), "failures"
    )
    for delivery in failed:
        assert delivery["attempt_count"] == 1  # permanent: not retried
        assert "authentication failed" in delivery["last_error"]
    for sub in subs:
        found = api.call("GET", f"/v1/subscriptions/{sub['id']}", 200)
        assert found["enabled"] is False
        assert "authentication failed" in found["disabled_reason"]
        assert ":***@" in found["url"]
    seen = [json.dumps(api.deliveries()), json.dumps(api.call("GET", "/v1/subscriptions", 200))]
    seen += [json.dumps(sub) for sub in subs] + [json.dumps(d) for d in failed]
    seen += [process.log() for process in api.stack.processes]
    assert not [text for text in seen if password in text]
