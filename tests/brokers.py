"""Real brokers for destination tests: the machine's RabbitMQ, NATS and Redis, private
instances started on free ports (for restarts and passwords), a moto server, and
consumers that read back what motionhook published.

Every test uses names of its own (exchange, stream, subject, queue), so runs in
parallel never see each other's messages.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import nats
import pika
import pytest
import redis
import standardwebhooks

from service.devstack import free_port, wait_until

RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"
NATS = "nats://127.0.0.1:4222"
REDIS = "redis://127.0.0.1:6379/0"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START = 20.0


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Server:
    """A broker process of the test's own on a free loopback port; stop and start at will."""

    argv: list[str]
    port: int
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        with self.log.open("ab") as handle:
            self.popen = subprocess.Popen(self.argv, stdout=handle, stderr=subprocess.STDOUT)
        wait_until(lambda: listening(self.port), timeout=START, message=f"{self.argv[0]} up")
        return self

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)
        wait_until(lambda: not listening(self.port), timeout=START, message="port closed")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def redis_server(directory: Path, password: str | None = None) -> Server:
    """A Redis that keeps every acknowledged write on disk (appendfsync always)."""
    port = free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory)]
    if password:
        argv += ["--requirepass", password]
    return Server(argv, port, directory / "redis.log")


def nats_server(directory: Path, user: str | None = None, password: str | None = None) -> Server:
    """A NATS server with JetStream storing streams in ``directory``."""
    port = free_port()
    argv = ["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(directory)]
    if user and password:
        argv += ["--user", user, "--pass", password]
    return Server(argv, port, directory / "nats.log")


def moto_server(directory: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return Server(argv, port, directory / "moto.log")


def verify(secret: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """Check the Standard Webhooks signature the way a consumer would; return the event."""
    event: dict[str, Any] = standardwebhooks.Webhook(secret).verify(body, headers)
    assert headers["webhook-id"] == event["id"]
    assert headers["event-type"] == event["type"]
    return event


# -- consumers -------------------------------------------------------------------------


@dataclass
class AmqpQueue:
    """A topic exchange of the test's own, with a queue bound to every routing key."""

    exchange: str = field(default_factory=lambda: unique("mh-test-"))

    def __post_init__(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(self.exchange, exchange_type="topic")
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, self.exchange, "#")

    @property
    def url(self) -> str:
        return f"{RABBITMQ}?exchange={self.exchange}"

    def messages(self) -> list[tuple[Any, bytes]]:
        """Everything queued so far, as (properties, body), acknowledged."""
        found = []
        while True:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))

    def close(self) -> None:
        self.channel.exchange_delete(self.exchange)
        self.connection.close()


@dataclass
class NatsStream:
    """A JetStream stream of the test's own capturing ``<prefix>.>``."""

    server: str = NATS
    user: str | None = None
    password: str | None = None
    name: str = field(default_factory=lambda: unique("MH_TEST_"))

    @property
    def subject(self) -> str:
        return f"{self.name.lower()}.events"

    def url(self) -> str:
        credentials = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{credentials}{self.server.removeprefix('nats://')}/{self.subject}"

    def _call(self, action: str) -> Any:
        async def run() -> Any:
            client = await nats.connect(self.server, user=self.user, password=self.password)
            try:
                stream = client.jetstream()
                if action == "create":
                    await stream.add_stream(name=self.name, subjects=[f"{self.name.lower()}.>"])
                    return None
                if action == "delete":
                    await stream.delete_stream(self.name)
                    return None
                info = await stream.stream_info(self.name)
                return [
                    await stream.get_msg(self.name, seq)
                    for seq in range(info.state.first_seq, info.state.last_seq + 1)
                    if info.state.messages
                ]
            finally:
                await client.close()

        return asyncio.run(run())

    def create(self) -> NatsStream:
        self._call("create")
        return self

    def messages(self) -> list[tuple[dict[str, str], bytes]]:
        return [(dict(msg.headers or {}), msg.data or b"") for msg in self._call("messages")]

    def delete(self) -> None:
        self._call("delete")


def redis_entries(url: str, stream: str) -> list[tuple[dict[str, str], bytes]]:
    """Every entry of a stream, as (fields other than body, body)."""
    client = redis.Redis.from_url(url)
    try:
        entries = []
        for _entry_id, fields in client.xrange(stream):
            decoded = {key.decode(): value for key, value in fields.items()}
            body = decoded.pop("body")
            entries.append(({key: value.decode() for key, value in decoded.items()}, body))
        return entries
    finally:
        client.close()


def aws_client(service: str, endpoint: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client(service, endpoint_url=endpoint)  # type: ignore[call-overload]


def sqs_messages(client: Any, queue_url: str) -> list[tuple[dict[str, str], bytes]]:
    """Receive (and delete) every message now in the queue."""
    found = []
    while True:
        answer = client.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            WaitTimeSeconds=0,
        )
        messages = answer.get("Messages", [])
        if not messages:
            return found
        for message in messages:
            attributes = {
                name: value["StringValue"]
                for name, value in message.get("MessageAttributes", {}).items()
            }
            found.append((attributes, message["Body"].encode()))
            client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
