"""AMQP 0-9-1 (RabbitMQ) destinations with pika: persistent messages, publisher confirms.

One ``BlockingConnection`` and one confirm-mode channel per destination. pika's
blocking connection is not thread-safe, so publishes to one destination take turns
(a confirm on loopback takes a fraction of a millisecond). Messages are published
``mandatory``: a message no queue is bound for comes back and the attempt fails
(the subscription stays, since a topic exchange may simply have no taker for that
event type); a missing exchange, refused login or refused vhost is permanent.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import NoReturn

import pika
from pika import exceptions as amqp
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from service.notifiers.brokers import CONTENT_TYPE, Answer, Outgoing, Publisher
from service.notifiers.policy import Outcome

CONNECTION_NAME = "motionhook"
PERSISTENT = pika.DeliveryMode.Persistent
# Reply codes of a broker closing the channel or connection (AMQP 0-9-1 constants).
ACCESS_REFUSED, NOT_FOUND, NOT_ALLOWED = 403, 404, 530


def _timed_out() -> NoReturn:
    raise TimeoutError("the broker did not confirm in time")


class AmqpPublisher(Publisher):
    """Publishes to one exchange of one RabbitMQ virtual host."""

    _connection: BlockingConnection | None = None
    _channel: BlockingChannel | None = None

    def publish(self, message: Outgoing, timeout: float) -> Answer:
        with self._lock:  # one thread at a time on a pika connection
            return super().publish(message, timeout)

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
            # No heartbeats: a blocking connection only answers them while in use, so an
            # idle one would be closed by the broker. Publishes carry their own timeout.
            heartbeat=0,
            client_properties={"connection_name": CONNECTION_NAME},
        )
        self._connection = BlockingConnection(parameters)
        self._channel = None

    def _open_channel(self) -> BlockingChannel:
        assert self._connection is not None
        channel = self._connection.channel()
        channel.confirm_delivery()
        if self.destination.exchange:
            # Fails with 404 (permanent) when the exchange does not exist.
            channel.exchange_declare(self.destination.exchange, passive=True)
        return channel

    def _close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(amqp.AMQPError, OSError):
                connection.close()

    def _send(self, message: Outgoing, timeout: float) -> Answer:
        assert self._connection is not None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._open_channel()
        dest = self.destination
        routing_key = dest.routing_key or message.event_type
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=message.event_id,
            timestamp=int(message.headers["webhook-timestamp"]),
            type=message.event_type,
            app_id=CONNECTION_NAME,
            headers=dict(message.headers),
        )
        timer = self._connection.call_later(timeout, _timed_out)
        try:
            self._channel.basic_publish(
                dest.exchange, routing_key, message.body, properties, mandatory=True
            )
        except amqp.ChannelClosed:
            self._channel = None
            raise
        finally:
            if self._connection is not None and self._connection.is_open:
                self._connection.remove_timeout(timer)
        return Answer(f"confirmed: exchange {dest.exchange!r}, routing key {routing_key!r}")

    def is_stale(self, error: Exception) -> bool:
        return isinstance(
            error,
            amqp.StreamLostError
            | amqp.ConnectionWrongStateError
            | amqp.ChannelWrongStateError
            | amqp.ConnectionClosedByBroker,
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
        if isinstance(error, amqp.ConnectionClosedByBroker) and _refused(error):
            return Outcome("permanent", f"the broker refused the connection: {error.reply_text}")
        if isinstance(error, amqp.UnroutableError):
            key = dest.routing_key or "the event type"
            return Outcome("failed", f"unroutable: no queue is bound for routing key {key}")
        if isinstance(error, amqp.NackError):
            return Outcome("retry", "the broker rejected the message (nack)")
        if isinstance(error, amqp.AMQPConnectionError):
            return Outcome("retry", f"could not connect ({type(error).__name__})")
        if isinstance(error, amqp.AMQPError):
            return Outcome("retry", f"AMQP error ({type(error).__name__})")
        return None


def _refused(error: Exception) -> bool:
    return isinstance(error, amqp.ConnectionClosedByBroker) and error.reply_code in (
        ACCESS_REFUSED,
        NOT_ALLOWED,
    )
