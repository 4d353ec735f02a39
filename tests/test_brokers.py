"""Publishing to real brokers through the worker's BrokerPool (no web, no database).

RabbitMQ, NATS JetStream and Redis are the machine's (or private instances on free
ports where a test restarts a server or needs a password); SQS and EventBridge are
a moto server started here. Each test reads back what was published with the
broker's own client and checks the body, headers and signature as a consumer would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from service.config import Settings, load_config
from service.devstack import free_port
from service.notifiers import brokers
from service.notifiers.brokers import BrokerPool, outgoing
from service.notifiers.policy import AttemptResult
from service.notifiers.webhook import generate_secret, serialize
from tests.brokers import (
    AWS_ENV,
    NATS,
    RABBITMQ,
    REDIS,
    AmqpQueue,
    NatsStream,
    Server,
    aws_client,
    moto_server,
    nats_server,
    redis_entries,
    redis_server,
    servers,
    sqs_messages,
    unique,
    verify,
)

__all__ = ["servers"]  # the fixture, imported for the tests below

SECRET = generate_secret()


def envelope(number: int = 1, event_type: str = "job.completed") -> dict[str, Any]:
    return {
        "id": unique(f"evt_{number}_"),
        "type": event_type,
        "created_at": "2026-12-01T12:00:00Z",
        "data": {"id": "job_abc", "status": "completed", "prompt": "ünïcode ✓"},
    }


def send(
    pool: BrokerPool, kind: str, url: str, event: dict[str, Any], *, secrets: list[str]
) -> AttemptResult:
    """Publish one event, as a batch of one."""
    (result,) = pool.publish(kind, url, [outgoing(event, secrets)])
    return result


def make_pool(tmp_path: Path, **config: Any) -> BrokerPool:
    settings = Settings.from_mapping(
        load_config({"ALLOW_PRIVATE_TARGETS": True, "DELIVERY_TIMEOUT": 3, **config}, environ={}),
        tmp_path,
    )
    return BrokerPool(settings)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[BrokerPool]:
    made = make_pool(tmp_path)
    yield made
    made.close()


@pytest.fixture
def amqp_queue() -> Iterator[AmqpQueue]:
    queue = AmqpQueue()
    yield queue
    queue.close()


@pytest.fixture
def stream() -> Iterator[NatsStream]:
    created = NatsStream().create()
    yield created
    created.delete()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = moto_server(tmp_path_factory.mktemp("moto")).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture
def aws_pool(tmp_path: Path, moto: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerPool]:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    made = make_pool(tmp_path, AWS_ENDPOINT_URL=moto)
    yield made
    made.close()


def check(event: dict[str, Any], headers: dict[str, str], body: bytes) -> None:
    """The message is the webhook body byte for byte, signed with the subscription's secret."""
    assert body == serialize(event).encode()
    assert verify(SECRET, body, headers) == event


# -- one message per publish, with the right body, headers and signature ----------------


def test_amqp_publish_is_confirmed_persistent_and_signed(
    pool: BrokerPool, amqp_queue: AmqpQueue
) -> None:
    event = envelope()
    result = send(pool, "amqp", amqp_queue.url, event, secrets=[SECRET])

    assert result.outcome.result == "delivered", result
    assert "confirmed" in result.response_excerpt
    ((properties, body),) = amqp_queue.messages()
    check(event, properties.headers, body)
    assert properties.message_id == event["id"]
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    assert properties.type == "job.completed"


def test_amqp_routing_key_defaults_to_the_event_type_and_can_be_fixed(
    pool: BrokerPool, amqp_queue: AmqpQueue
) -> None:
    amqp_queue.channel.queue_unbind(amqp_queue.queue, amqp_queue.exchange, "#")
    amqp_queue.channel.queue_bind(amqp_queue.queue, amqp_queue.exchange, "job.failed")
    amqp_queue.channel.queue_bind(amqp_queue.queue, amqp_queue.exchange, "fixed")

    failed = send(pool, "amqp", amqp_queue.url, envelope(1, "job.failed"), secrets=[SECRET])
    fixed = send(pool, "amqp", amqp_queue.url + "&routing_key=fixed", envelope(2), secrets=[SECRET])
    unroutable = send(pool, "amqp", amqp_queue.url, envelope(3), secrets=[SECRET])

    assert (failed.outcome.result, fixed.outcome.result) == ("delivered", "delivered")
    # No queue takes job.completed: the message comes back; the delivery fails, but the
    # subscription stays (another event type may well be routed).
    assert unroutable.outcome.result == "failed"
    assert "unroutable" in unroutable.outcome.reason
    assert [props.type for props, _body in amqp_queue.messages()] == ["job.failed", "job.completed"]


def test_amqp_concurrent_publishes_share_one_connection_and_are_all_confirmed(
    pool: BrokerPool, amqp_queue: AmqpQueue
) -> None:
    events = [envelope(number) for number in range(300)]
    with ThreadPoolExecutor(16) as threads:
        results = list(
            threads.map(lambda e: send(pool, "amqp", amqp_queue.url, e, secrets=[SECRET]), events)
        )

    assert {result.outcome.result for result in results} == {"delivered"}
    ids = [properties.message_id for properties, _body in amqp_queue.messages()]
    assert sorted(ids) == sorted(event["id"] for event in events)
    assert len(pool._publishers) == 1


def test_amqp_exchange_deleted_after_connecting_is_permanent(
    pool: BrokerPool, amqp_queue: AmqpQueue
) -> None:
    assert send(pool, "amqp", amqp_queue.url, envelope(1), secrets=[SECRET]).outcome.result == (
        "delivered"
    )
    amqp_queue.channel.exchange_delete(amqp_queue.exchange)

    gone = send(pool, "amqp", amqp_queue.url, envelope(2), secrets=[SECRET])

    amqp_queue.channel.exchange_declare(amqp_queue.exchange, exchange_type="topic")
    assert gone.outcome.result == "permanent", gone
    assert "does not exist" in gone.outcome.reason


def test_nats_publish_is_acknowledged_by_the_stream(pool: BrokerPool, stream: NatsStream) -> None:
    event = envelope()
    result = send(pool, "nats", stream.url(), event, secrets=[SECRET])

    assert result.outcome.result == "delivered", result
    assert result.response_excerpt.startswith(f"PubAck: stream {stream.name}, sequence 1")
    ((headers, body),) = stream.messages()
    check(event, headers, body)
    assert headers["Nats-Msg-Id"] == event["id"]


def test_nats_retried_publish_is_deduplicated_by_jetstream(
    pool: BrokerPool, stream: NatsStream
) -> None:
    event = envelope()
    first = send(pool, "nats", stream.url(), event, secrets=[SECRET])
    again = send(pool, "nats", stream.url(), event, secrets=[SECRET])

    assert (first.outcome.result, again.outcome.result) == ("delivered", "delivered")
    assert "duplicate" in again.response_excerpt
    assert len(stream.messages()) == 1


def test_redis_xadd_trims_approximately_and_records_the_entry_id(pool: BrokerPool) -> None:
    name = unique("mh-test-")
    url = f"{REDIS}?stream={name}&maxlen=10"
    events = [envelope(number) for number in range(300)]
    try:
        results = [send(pool, "redis", url, event, secrets=[SECRET]) for event in events]
        entries = redis_entries(REDIS, name)
    finally:
        redis.Redis.from_url(REDIS).delete(name)

    assert {result.outcome.result for result in results} == {"delivered"}
    assert results[0].response_excerpt.startswith(f"XADD {name}: entry ")
    assert 10 <= len(entries) < 300  # MAXLEN ~ 10: trimmed, in whole nodes
    headers, body = entries[-1]
    check(events[-1], headers, body)


def test_sqs_standard_and_fifo_queues_get_the_envelope_and_attributes(
    aws_pool: BrokerPool, moto: str
) -> None:
    sqs = aws_client("sqs", moto)
    standard = sqs.create_queue(QueueName=unique("mh-test-"))["QueueUrl"]
    fifo = sqs.create_queue(
        QueueName=unique("mh-test-") + ".fifo", Attributes={"FifoQueue": "true"}
    )["QueueUrl"]
    event = envelope()

    results = [send(aws_pool, "sqs", url, event, secrets=[SECRET]) for url in (standard, fifo)]
    retried = send(aws_pool, "sqs", fifo, event, secrets=[SECRET])

    assert [r.outcome.result for r in results] == ["delivered", "delivered"]
    assert results[0].status == 200
    assert results[0].response_excerpt.startswith("MessageId ")
    assert "sequence" in results[1].response_excerpt
    for url in (standard, fifo):
        ((attributes, body),) = sqs_messages(sqs, url)
        check(event, attributes, body)
    # The retry was accepted, and SQS dropped it as a duplicate of the same event id.
    assert retried.outcome.result == "delivered"


def test_eventbridge_event_carries_source_detail_type_and_the_envelope(
    aws_pool: BrokerPool, moto: str
) -> None:
    events = aws_client("events", moto)
    sqs = aws_client("sqs", moto)
    bus = unique("mh-test-")
    events.create_event_bus(Name=bus)
    queue = sqs.create_queue(QueueName=unique("mh-test-"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]
    events.put_rule(
        Name="all", EventBusName=bus, EventPattern=json.dumps({"source": ["motionhook"]})
    )
    events.put_targets(
        Rule="all", EventBusName=bus, Targets=[{"Id": "queue", "Arn": arn["QueueArn"]}]
    )
    event = envelope()

    result = send(
        aws_pool, "eventbridge", f"eventbridge://{bus}?region=us-east-1", event, secrets=[SECRET]
    )

    assert result.outcome.result == "delivered", result
    assert result.response_excerpt.startswith("EventId ")
    ((_attributes, body),) = sqs_messages(sqs, queue)
    received = json.loads(body)
    assert (received["source"], received["detail-type"]) == ("motionhook", "job.completed")
    assert received["detail"] == event


# -- batches: many deliveries to one destination in one publish ------------------------


def batch_of(count: int) -> tuple[list[dict[str, Any]], list[Any]]:
    events = [envelope(number) for number in range(count)]
    return events, [outgoing(event, [SECRET]) for event in events]


def test_a_redis_batch_is_one_pipeline_with_an_entry_id_for_each(pool: BrokerPool) -> None:
    name = unique("mh-test-")
    url = f"{REDIS}?stream={name}"
    admin = redis.Redis.from_url(REDIS)
    events, messages = batch_of(50)
    try:
        results = pool.publish("redis", url, messages)
        entries = redis_entries(REDIS, name)
        (client,) = [c for c in admin.client_list() if c.get("name") == "motionhook"]
    finally:
        admin.delete(name)
        admin.close()

    assert {result.outcome.result for result in results} == {"delivered"}
    # Each delivery records its own entry id, in the order of the batch.
    ids = [result.response_excerpt.removeprefix(f"XADD {name}: entry ") for result in results]
    assert len(set(ids)) == 50
    assert ids == sorted(ids, key=lambda entry: tuple(map(int, entry.split("-"))))
    assert len(entries) == 50
    for event, (headers, body) in zip(events, entries, strict=True):
        check(event, headers, body)
    assert client["cmd"] == "xadd"  # one connection for the whole batch


def test_a_nats_batch_is_acknowledged_message_by_message(
    pool: BrokerPool, stream: NatsStream
) -> None:
    events, messages = batch_of(40)
    repeated = [*messages, messages[0]]  # a retried delivery inside the same batch

    results = pool.publish("nats", stream.url(), repeated)

    assert {result.outcome.result for result in results} == {"delivered"}
    sequences = {result.response_excerpt.split("sequence ")[1] for result in results[:-1]}
    assert len(sequences) == 40
    assert "duplicate" in results[-1].response_excerpt
    received = stream.messages()
    assert len(received) == 40
    by_id = {headers["Nats-Msg-Id"]: (headers, body) for headers, body in received}
    for event in events:
        check(event, *by_id[event["id"]])


def test_an_amqp_batch_is_confirmed_message_by_message(
    pool: BrokerPool, amqp_queue: AmqpQueue
) -> None:
    amqp_queue.channel.queue_unbind(amqp_queue.queue, amqp_queue.exchange, "#")
    amqp_queue.channel.queue_bind(amqp_queue.queue, amqp_queue.exchange, "job.completed")
    events, messages = batch_of(30)
    unroutable = outgoing(envelope(99, "job.failed"), [SECRET])

    results = pool.publish("amqp", amqp_queue.url, [*messages[:15], unroutable, *messages[15:]])

    outcomes = [result.outcome.result for result in results]
    # The one message no queue takes fails on its own; the rest of the batch is confirmed.
    assert outcomes == ["delivered"] * 15 + ["failed"] + ["delivered"] * 15
    ids = [properties.message_id for properties, _body in amqp_queue.messages()]
    assert sorted(ids) == sorted(event["id"] for event in events)


def test_a_batch_whose_kept_connection_died_is_published_again_on_a_new_one(
    pool: BrokerPool,
) -> None:
    name = unique("mh-test-")
    url = f"{REDIS}?stream={name}"
    admin = redis.Redis.from_url(REDIS)
    try:
        first_events, first = batch_of(10)
        assert {r.outcome.result for r in pool.publish("redis", url, first)} == {"delivered"}
        for client in admin.client_list():
            if client.get("name") == "motionhook":
                admin.client_kill_filter(_id=client["id"])
        events, messages = batch_of(10)
        results = pool.publish("redis", url, messages)
        entries = redis_entries(REDIS, name)
    finally:
        admin.delete(name)
        admin.close()

    assert {result.outcome.result for result in results} == {"delivered"}, results
    assert len(entries) == 20  # nothing lost, nothing twice
    for event, (headers, body) in zip([*first_events, *events], entries, strict=True):
        check(event, headers, body)


# -- connections: one per destination, reused, replaced when it dies --------------------


def test_one_connection_per_destination_is_reused_and_replaced_after_it_dies(
    pool: BrokerPool,
) -> None:
    name = unique("mh-test-")
    url = f"{REDIS}?stream={name}"
    admin = redis.Redis.from_url(REDIS)

    def ours() -> list[dict[str, Any]]:
        clients: list[dict[str, Any]] = admin.client_list()
        return [c for c in clients if c.get("name") == "motionhook" and c.get("cmd") == "xadd"]

    try:
        for number in range(20):
            assert (
                send(pool, "redis", url, envelope(number), secrets=[SECRET]).outcome.result
                == "delivered"
            )
        (connection,) = ours()
        admin.client_kill_filter(_id=connection["id"])

        after = send(pool, "redis", url, envelope(99), secrets=[SECRET])
        (replacement,) = ours()
    finally:
        admin.delete(name)
        admin.close()
    # The dead connection was noticed and replaced within the same attempt.
    assert after.outcome.result == "delivered", after
    assert replacement["id"] != connection["id"]


def test_a_publisher_idle_for_long_is_closed_when_another_opens(
    pool: BrokerPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pool.publisher("redis", f"{REDIS}?stream=a")
    first.last_used -= brokers.IDLE_CLOSE_SECONDS + 1
    closed: list[bool] = []
    monkeypatch.setattr(first, "close", lambda: closed.append(True))

    second = pool.publisher("redis", f"{REDIS}?stream=b")

    assert closed == [True]
    assert pool.publisher("redis", f"{REDIS}?stream=b") is second
    assert pool.publisher("redis", f"{REDIS}?stream=a") is not first


# -- the policy: retry, failed, permanent ------------------------------------------------


def test_unreachable_brokers_are_retried(pool: BrokerPool) -> None:
    port = free_port()  # nothing listens there
    urls = {
        "amqp": f"amqp://guest:guest@127.0.0.1:{port}/?exchange=x",
        "nats": f"nats://127.0.0.1:{port}/some.subject",
        "redis": f"redis://127.0.0.1:{port}/0?stream=x",
    }
    for kind, url in urls.items():
        result = send(pool, kind, url, envelope(), secrets=[SECRET])
        assert result.outcome.result == "retry", (kind, result)
        assert result.error


def test_wrong_amqp_password_is_permanent_and_never_shown(pool: BrokerPool) -> None:
    password = "wrong-" + unique("")
    result = send(
        pool,
        "amqp",
        f"amqp://guest:{password}@127.0.0.1:5672/?exchange=x",
        envelope(),
        secrets=[SECRET],
    )

    assert result.outcome.result == "permanent"
    assert "authentication failed" in result.outcome.reason
    assert password not in repr(result)


def test_missing_exchange_stream_and_queue_are_permanent(aws_pool: BrokerPool, moto: str) -> None:
    missing = unique("missing-")
    cases = {
        "amqp": (f"{RABBITMQ}?exchange={missing}", "does not exist"),
        "nats": (f"{NATS}/{missing}.events", "no JetStream stream"),
        "sqs": (f"{moto}/123456789012/{missing}", "does not exist"),
        "eventbridge": (f"eventbridge://{missing}?region=us-east-1", "does not exist"),
    }
    for kind, (url, words) in cases.items():
        result = send(aws_pool, kind, url, envelope(), secrets=[SECRET])
        assert result.outcome.result == "permanent", (kind, result)
        assert words in result.outcome.reason, (kind, result.outcome.reason)


def test_redis_key_of_another_type_is_permanent(pool: BrokerPool) -> None:
    name = unique("mh-test-")
    admin = redis.Redis.from_url(REDIS)
    admin.set(name, "not a stream")
    try:
        result = send(pool, "redis", f"{REDIS}?stream={name}", envelope(), secrets=[SECRET])
    finally:
        admin.delete(name)
        admin.close()
    assert result.outcome.result == "permanent"
    assert "is not a stream" in result.outcome.reason


def test_wrong_redis_and_nats_passwords_are_permanent(
    pool: BrokerPool, servers: list[Server], tmp_path: Path
) -> None:
    (tmp_path / "redis").mkdir()
    (tmp_path / "nats").mkdir()
    guarded_redis = redis_server(tmp_path / "redis", password="right-password").start()
    guarded_nats = nats_server(tmp_path / "nats", user="motion", password="right-password").start()
    servers += [guarded_redis, guarded_nats]
    urls = {
        "redis": f"redis://:wrong-password@127.0.0.1:{guarded_redis.port}/0?stream=s",
        "nats": f"nats://motion:wrong-password@127.0.0.1:{guarded_nats.port}/s.events",
    }
    for kind, url in urls.items():
        result = send(pool, kind, url, envelope(), secrets=[SECRET])
        assert result.outcome.result == "permanent", (kind, result)
        assert "authentication failed" in result.outcome.reason
        assert "wrong-password" not in repr(result)


def test_private_broker_hosts_are_refused_unless_allowed(tmp_path: Path) -> None:
    name = unique("mh-test-")
    url = f"{REDIS}?stream={name}"
    guarded = make_pool(tmp_path, ALLOW_PRIVATE_TARGETS=False)
    allowed = make_pool(
        tmp_path,
        ALLOW_PRIVATE_TARGETS=False,
        DESTINATION_ALLOWED_HOSTS="broker.internal,127.0.0.1:6379",
    )
    try:
        refused = send(guarded, "redis", url, envelope(), secrets=[SECRET])
        admitted = send(allowed, "redis", url, envelope(), secrets=[SECRET])
    finally:
        guarded.close()
        allowed.close()
        redis.Redis.from_url(REDIS).delete(name)
    assert refused.outcome.result == "failed"
    assert "loopback" in refused.outcome.reason
    assert "MOTIONHOOK_DESTINATION_ALLOWED_HOSTS" in refused.outcome.reason
    assert admitted.outcome.result == "delivered"


# -- a broker restarted mid-stream loses nothing ------------------------------------------


def publish_until_delivered(
    pool: BrokerPool, kind: str, url: str, events: list[dict[str, Any]], restart: Server
) -> list[str]:
    """Publish every event, restarting the server halfway; retry each until delivered
    (as the schedule would). Return the outcome of each attempt."""
    outcomes = []
    for number, event in enumerate(events):
        if number == len(events) // 2:
            restart.stop()
            down = send(pool, kind, url, event, secrets=[SECRET])
            outcomes.append(down.outcome.result)
            restart.start()
        for _attempt in range(20):
            result = send(pool, kind, url, event, secrets=[SECRET])
            outcomes.append(result.outcome.result)
            if result.outcome.result == "delivered":
                break
            assert result.outcome.result == "retry", result
    return outcomes


def test_redis_restarted_mid_stream_loses_nothing(
    pool: BrokerPool, servers: list[Server], tmp_path: Path
) -> None:
    server = redis_server(tmp_path).start()
    servers.append(server)
    url = f"redis://127.0.0.1:{server.port}/0?stream=events"
    events = [envelope(number) for number in range(40)]

    outcomes = publish_until_delivered(pool, "redis", url, events, server)

    assert "retry" in outcomes  # the publish while it was down
    entries = redis_entries(f"redis://127.0.0.1:{server.port}/0", "events")
    assert [headers["webhook-id"] for headers, _ in entries] == [e["id"] for e in events]


def test_nats_restarted_mid_stream_loses_nothing_and_dedupes(
    pool: BrokerPool, servers: list[Server], tmp_path: Path
) -> None:
    server = nats_server(tmp_path).start()
    servers.append(server)
    stream = NatsStream(server=f"nats://127.0.0.1:{server.port}").create()
    events = [envelope(number) for number in range(40)]

    outcomes = publish_until_delivered(pool, "nats", stream.url(), events, server)

    assert "retry" in outcomes
    ids = [headers["webhook-id"] for headers, _ in stream.messages()]
    assert ids == [event["id"] for event in events]  # each once: JetStream dropped copies
