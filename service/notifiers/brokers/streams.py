"""Redis Streams destinations with redis-py: ``XADD`` with approximate ``MAXLEN`` trimming.

Each entry holds the envelope in ``body`` beside the ``webhook-id``,
``webhook-timestamp``, ``webhook-signature`` and ``event-type`` fields; the entry id
Redis returns is the success. One connection per destination (a blocking pool of
one, shared by the delivery threads); a batch of deliveries is one pipeline, one
round trip, each entry answered on its own. Redis has no
server-side de-duplication: a consumer skips entries whose ``webhook-id`` it has
already processed. A stream is created by its first entry, as ``XADD`` does; a key
of another type, a refused login or a missing permission is permanent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import redis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.notifiers.brokers import Answer, Outgoing, Publisher
from service.notifiers.policy import Outcome

CLIENT_NAME = "motionhook"
AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM")


class RedisPublisher(Publisher):
    """Appends to one stream of one Redis database."""

    _client: redis.Redis | None = None

    def _open(self, timeout: float) -> None:
        dest = self.destination
        connection_class = redis.SSLConnection if dest.tls else redis.Connection
        pool = redis.BlockingConnectionPool(  # type: ignore[no-untyped-call]
            max_connections=1,
            timeout=timeout,
            connection_class=connection_class,
            host=self.address(),
            port=dest.port,
            db=int(dest.path),
            username=dest.username,
            password=dest.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # The delivery policy retries; redis-py's own retries would only add delay.
            retry=Retry(NoBackoff(), 0),
            client_name=CLIENT_NAME,
        )
        client = redis.Redis.from_pool(pool)  # the client owns the pool: close() closes it
        try:
            client.ping()  # log in now, so a refused login is told apart from later errors
        except redis_errors.RedisError:
            client.close()
            raise
        self._client = client

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(redis_errors.RedisError, OSError):
                client.close()

    def _send_all(self, messages: Sequence[Outgoing], timeout: float) -> list[Answer | Exception]:
        assert self._client is not None
        stream = self.destination.stream
        with self._client.pipeline(transaction=False) as pipeline:
            for message in messages:
                fields: dict[Any, Any] = {"body": message.body, **message.headers}
                pipeline.xadd(stream, fields, maxlen=self.destination.maxlen, approximate=True)
            try:
                entries = pipeline.execute(raise_on_error=False)
            except redis_errors.RedisError as exc:
                return [exc] * len(messages)
        return [_answer(stream, entry) for entry in entries]

    def is_stale(self, error: Exception) -> bool:
        return isinstance(error, redis_errors.ConnectionError) and not isinstance(
            error, redis_errors.AuthenticationError | redis_errors.AuthorizationError
        )

    def classify(self, error: Exception) -> Outcome | None:
        text = str(error)
        if isinstance(
            error,
            redis_errors.AuthenticationError
            | redis_errors.AuthorizationError
            | redis_errors.AuthenticationWrongNumberOfArgsError
            | redis_errors.NoPermissionError,
        ) or text.startswith(AUTH_REPLIES):
            return Outcome("permanent", f"authentication failed: {text[:120]}")
        if isinstance(error, redis_errors.ResponseError) and text.startswith("WRONGTYPE"):
            return Outcome("permanent", f"key {self.destination.stream!r} is not a stream")
        if isinstance(error, redis_errors.BusyLoadingError | redis_errors.ReadOnlyError):
            return Outcome("retry", f"redis is not accepting writes: {text[:120]}")
        if isinstance(error, redis_errors.TimeoutError):
            return Outcome("retry", "timed out waiting for redis")
        if isinstance(error, redis_errors.ConnectionError):
            return Outcome("retry", f"connection error: {text[:120]}")
        if isinstance(error, redis_errors.ResponseError):
            return Outcome("failed", f"redis answered: {text[:120]}")
        if isinstance(error, redis_errors.RedisError):
            return Outcome("retry", f"redis error ({type(error).__name__})")
        return None


def _answer(stream: str, entry: Any) -> Answer | Exception:
    """The entry id XADD returned, or the error it met (``raise_on_error=False``)."""
    if isinstance(entry, Exception):
        return entry
    entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
    return Answer(f"XADD {stream}: entry {entry_id}")
