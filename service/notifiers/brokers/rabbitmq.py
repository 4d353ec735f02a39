"""AMQP 0-9-1 (RabbitMQ) destinations with pika: persistent messages, publisher confirms.

One connection and one confirm-mode channel per destination, driven by pika's
asynchronous ``SelectConnection`` on an I/O thread of its own (which also answers
heartbeats). Delivery threads hand it publishes and wait for their confirm, so
many publishes are in flight at once and the broker confirms them in batches: a
persistent message on a durable queue is confirmed after an fsync, and waiting for
each one in turn would cap a destination at a few hundred messages a second.

Messages are published ``mandatory``: one that no queue is bound for comes back and
the attempt fails (the subscription stays: a topic exchange may simply have no
taker for that event type). A missing exchange, a refused login or a refused
virtual host is permanent.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import pika
from pika import exceptions as amqp
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.spec import Basic

from service.notifiers.brokers import CONTENT_TYPE, Answer, Outgoing, Publisher
from service.notifiers.policy import Outcome

CONNECTION_NAME = "motionhook"
PERSISTENT = pika.DeliveryMode.Persistent
# Reply codes of a broker closing the channel or connection (AMQP 0-9-1 constants).
ACCESS_REFUSED, NOT_FOUND, NOT_ALLOWED = 403, 404, 530
CLOSE_WAIT = 5.0


class Unroutable(Exception):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class Nacked(Exception):
    """The broker could not take responsibility for the message (Basic.Nack)."""


class AmqpPublisher(Publisher):
    """Publishes to one exchange of one RabbitMQ virtual host."""

    _connection: SelectConnection | None = None
    _thread: threading.Thread | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Touched on the I/O thread only: the open channel, the next delivery tag and
        # the publishes waiting for their confirm (tag -> event id, future).
        self._channel: Channel | None = None
        self._tag = 0
        self._pending: dict[int, tuple[str, Future[None]]] = {}
        self._returned: set[str] = set()

    # -- connecting (caller's thread, waiting for the I/O thread) -------------------------

    def _open(self, timeout: float) -> None:
        dest = self.destination
        ssl_options = None
        if dest.tls:
            ssl_options = pika.SSLOptions(ssl.create_default_context(), server_hostname=dest.host)
        parameters = pika.ConnectionParameters(
            host=self.address(),
            port=dest.port,
            virtual_host=dest.path,
            credentials=pika.PlainCredentials(dest.username or "guest", dest.password or "guest"),
            ssl_options=ssl_options,
            connection_attempts=1,
            socket_timeout=timeout,
            stack_timeout=timeout,
            blocked_connection_timeout=timeout,
            client_properties={"connection_name": CONNECTION_NAME},
        )
        ready = threading.Event()
        failure: list[BaseException] = []

        def fail(error: BaseException) -> None:
            if not ready.is_set():
                failure.append(error)
                ready.set()

        def on_open(connection: SelectConnection) -> None:
            connection.channel(on_open_callback=on_channel)

        def on_channel(channel: Channel) -> None:
            channel.add_on_close_callback(self._on_channel_closed(fail))
            channel.add_on_return_callback(self._on_return)
            channel.confirm_delivery(self._on_confirm, callback=lambda _frame: confirming(channel))

        def confirming(channel: Channel) -> None:
            self._channel, self._tag = channel, 0
            if dest.exchange:
                # The broker closes the channel with 404 when the exchange does not exist.
                channel.exchange_declare(
                    dest.exchange, passive=True, callback=lambda _f: ready.set()
                )
            else:
                ready.set()

        def on_closed(connection: SelectConnection, reason: Exception) -> None:
            self._fail_pending(reason)
            self._channel = None
            fail(reason)
            connection.ioloop.stop()

        connection = SelectConnection(
            parameters,
            on_open_callback=on_open,
            on_open_error_callback=lambda connection, error: on_closed(connection, error),
            on_close_callback=on_closed,
        )
        thread = threading.Thread(
            target=connection.ioloop.start, name=f"amqp {dest.origin}", daemon=True
        )
        thread.start()
        self._connection, self._thread = connection, thread
        if not ready.wait(timeout):
            self._close()
            raise TimeoutError("the broker did not open a channel in time")
        if failure:
            self._close()
            raise failure[0]

    def _close(self) -> None:
        connection, thread = self._connection, self._thread
        self._connection = self._thread = None
        if connection is None or thread is None:
            return

        def close() -> None:
            if connection.is_open:
                connection.close()
            elif connection.is_closed:
                connection.ioloop.stop()

        with contextlib.suppress(amqp.AMQPError, RuntimeError):
            connection.ioloop.add_callback_threadsafe(close)
        thread.join(CLOSE_WAIT)

    # -- publishing ---------------------------------------------------------------------

    def _send_all(self, messages: Sequence[Outgoing], timeout: float) -> list[Answer | Exception]:
        connection = self._connection
        if connection is None or not connection.is_open:
            return [amqp.ConnectionWrongStateError("the connection is closed")] * len(messages)
        publishes: list[tuple[Outgoing, str, Future[None]]] = [
            (message, self.destination.routing_key or message.event_type, Future())
            for message in messages
        ]
        connection.ioloop.add_callback_threadsafe(functools.partial(self._publish_all, publishes))
        deadline = time.monotonic() + timeout
        exchange = self.destination.exchange
        results: list[Answer | Exception] = []
        for _message, routing_key, confirmed in publishes:
            try:
                confirmed.result(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                results.append(TimeoutError("the broker did not confirm in time"))
            except Exception as exc:
                results.append(exc)
            else:
                results.append(
                    Answer(f"confirmed: exchange {exchange!r}, routing key {routing_key!r}")
                )
        return results

    def _publish_all(self, publishes: list[tuple[Outgoing, str, Future[None]]]) -> None:
        """On the I/O thread: publish a batch, each message waiting for its own confirm."""
        for message, routing_key, confirmed in publishes:
            self._publish_now(message, routing_key, confirmed)

    def _publish_now(self, message: Outgoing, routing_key: str, confirmed: Future[None]) -> None:
        """On the I/O thread: publish, and remember the future under its delivery tag."""
        channel = self._channel
        if channel is None or not channel.is_open:
            confirmed.set_exception(amqp.ChannelWrongStateError("the channel is closed"))
            return
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=message.event_id,
            timestamp=int(message.headers["webhook-timestamp"]),
            type=message.event_type,
            app_id=CONNECTION_NAME,
            headers=dict(message.headers),
        )
        try:
            channel.basic_publish(
                self.destination.exchange, routing_key, message.body, properties, mandatory=True
            )
        except amqp.AMQPError as exc:
            confirmed.set_exception(exc)
            return
        self._tag += 1
        self._pending[self._tag] = (message.event_id, confirmed)

    def _on_confirm(self, frame: Any) -> None:
        """On the I/O thread: Basic.Ack or Basic.Nack for one tag, or all up to it."""
        method = frame.method
        tags = (
            [tag for tag in self._pending if tag <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            found = self._pending.pop(tag, None)
            if found is None:
                continue
            event_id, confirmed = found
            if isinstance(method, Basic.Nack):
                confirmed.set_exception(Nacked())
            elif event_id in self._returned:
                self._returned.discard(event_id)
                confirmed.set_exception(Unroutable())
            else:
                confirmed.set_result(None)

    def _on_return(self, _channel: Channel, _method: Any, properties: Any, _body: bytes) -> None:
        # A returned message is followed by its ack; the ack then fails the publish.
        self._returned.add(properties.message_id)

    def _on_channel_closed(self, fail: Any) -> Any:
        def closed(_channel: Channel, reason: Exception) -> None:
            # A closed channel (404 on a deleted exchange, say) ends the connection too:
            # the next publish reconnects, and the passive declare gives the verdict.
            self._channel = None
            self._fail_pending(reason)
            fail(reason)
            connection = self._connection
            if connection is not None and connection.is_open:
                connection.close()

        return closed

    def _fail_pending(self, reason: Exception) -> None:
        pending, self._pending = self._pending, {}
        self._returned.clear()
        for _event_id, confirmed in pending.values():
            if not confirmed.done():
                confirmed.set_exception(reason)

    # -- the policy ---------------------------------------------------------------------

    def is_stale(self, error: Exception) -> bool:
        return isinstance(
            error,
            amqp.ConnectionClosed
            | amqp.StreamLostError
            | amqp.ConnectionWrongStateError
            | amqp.ChannelWrongStateError
            | amqp.ChannelClosed,
        ) and not _refused(error)

    def classify(self, error: Exception) -> Outcome | None:
        dest = self.destination
        if isinstance(error, amqp.ProbableAuthenticationError | amqp.AuthenticationError):
            return Outcome("permanent", "authentication failed: the broker refused the login")
        if isinstance(error, amqp.ProbableAccessDeniedError):
            return Outcome("permanent", f"access to virtual host {dest.path!r} refused")
        if isinstance(error, amqp.ChannelClosedByBroker):
            if error.reply_code == NOT_FOUND:
                return Outcome("permanent", f"exchange {dest.exchange!r} does not exist")
            if error.reply_code == ACCESS_REFUSED:
                return Outcome("permanent", f"access refused: {error.reply_text}")
            return Outcome("retry", f"the broker closed the channel: {error.reply_text}")
        if _refused(error):
            assert isinstance(error, amqp.ConnectionClosedByBroker)
            return Outcome("permanent", f"the broker refused the connection: {error.reply_text}")
        if isinstance(error, Unroutable):
            key = dest.routing_key or "the event type"
            return Outcome("failed", f"unroutable: no queue is bound for routing key {key}")
        if isinstance(error, Nacked):
            return Outcome("retry", "the broker rejected the message (nack)")
        if isinstance(error, amqp.AMQPConnectionError | amqp.ConnectionClosed):
            return Outcome("retry", f"could not connect ({type(error).__name__})")
        if isinstance(error, amqp.AMQPError):
            return Outcome("retry", f"AMQP error ({type(error).__name__})")
        return None


def _refused(error: Exception) -> bool:
    return isinstance(error, amqp.ConnectionClosedByBroker) and error.reply_code in (
        ACCESS_REFUSED,
        NOT_ALLOWED,
    )
