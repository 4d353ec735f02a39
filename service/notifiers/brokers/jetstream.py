"""NATS JetStream destinations with nats-py: publish with ``Nats-Msg-Id``, the PubAck as success.

nats-py is asyncio-only: each destination's client runs on an event loop in a
thread of its own, and delivery threads hand it publishes, so concurrent publishes
share one connection, and a batch of deliveries is published at once: its
acknowledgements arrive pipelined. The client
reconnects by itself after the server goes away; a publish meanwhile times out and
is retried on the schedule, and the stream's duplicate window drops the copy if the
first one got through after all. No stream capturing the subject, or a refused
login, is permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import nats
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.js import errors as js_errors
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

from service.notifiers.brokers import Answer, Outgoing, Publisher
from service.notifiers.policy import Outcome

T = TypeVar("T")
CLIENT_NAME = "motionhook"
RECONNECT_WAIT = 0.5
MSG_ID = "Nats-Msg-Id"
UNAVAILABLE = 503


class NatsPublisher(Publisher):
    """Publishes to one subject of one NATS server, through JetStream."""

    _client: Client | None = None
    _jetstream: JetStreamContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats {self.destination.origin}", daemon=True
        )
        self._thread.start()
        # What nats-py reported last: its connect retries until the timeout, and the
        # reason (connection refused, say) is only ever given to this callback.
        self._last_error: Exception | None = None

    async def _remember(self, error: Exception) -> None:
        # A refused login is followed by the server closing the socket: keep the login.
        if not _refused_login(self._last_error):
            self._last_error = error

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coroutine`` on the client's loop; it must time out by itself by ``timeout``."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout + 1.0)
        except TimeoutError:
            future.cancel()
            raise

    def _open(self, timeout: float) -> None:
        dest = self.destination
        host = self.address()
        host = f"[{host}]" if ":" in host else host
        token = dest.username if dest.password is None else None
        self._last_error = None
        try:
            self._client = self._run(
                _within(
                    timeout,
                    nats.connect(
                        servers=[f"{dest.scheme}://{host}:{dest.port}"],
                        name=CLIENT_NAME,
                        user=None if token else dest.username,
                        password=dest.password,
                        token=token,
                        tls=ssl.create_default_context() if dest.tls else None,
                        tls_hostname=dest.host if dest.tls else None,
                        connect_timeout=max(1, int(timeout)),
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=RECONNECT_WAIT,
                        error_cb=self._remember,
                    ),
                ),
                timeout,
            )
        except TimeoutError:
            # A refused connection or login is a better reason than the timeout.
            if isinstance(self._last_error, OSError | nats_errors.Error):
                raise self._last_error from None
            raise
        self._jetstream = self._client.jetstream(timeout=timeout)

    def _close(self) -> None:
        client, self._client, self._jetstream = self._client, None, None
        if client is not None:
            with contextlib.suppress(nats_errors.Error, TimeoutError, OSError):
                self._run(_within(5.0, client.close()), 5.0)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(_cancel_others(), self._loop).result(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def _send_all(self, messages: Sequence[Outgoing], timeout: float) -> list[Answer | Exception]:
        jetstream = self._jetstream
        assert jetstream is not None
        subject = self.destination.path

        async def publish_all() -> list[PubAck | BaseException]:
            return await asyncio.gather(
                *(
                    jetstream.publish(
                        subject,
                        message.body,
                        timeout=timeout,
                        headers={**message.headers, MSG_ID: message.event_id},
                    )
                    for message in messages
                ),
                return_exceptions=True,
            )

        return [_answer(ack) for ack in self._run(publish_all(), timeout)]

    def is_stale(self, error: Exception) -> bool:
        return isinstance(error, nats_errors.ConnectionClosedError)

    def classify(self, error: Exception) -> Outcome | None:
        if isinstance(error, js_errors.NoStreamResponseError):
            return Outcome(
                "permanent", f"no JetStream stream captures subject {self.destination.path!r}"
            )
        if isinstance(error, js_errors.APIError):
            answer = f"JetStream answered {error.code}: {error.description}"
            if (error.code or 0) >= UNAVAILABLE:
                return Outcome("retry", answer)
            return Outcome("failed", answer)
        if isinstance(error, nats_errors.Error):
            if _refused_login(error):
                return Outcome("permanent", "authentication failed: the server refused the login")
            return Outcome("retry", f"NATS error ({type(error).__name__})")
        return None


def _answer(ack: PubAck | BaseException) -> Answer | Exception:
    if isinstance(ack, Exception):
        return ack
    if isinstance(ack, BaseException):
        raise ack  # cancelled: the worker is stopping
    duplicate = " (duplicate: already in the stream)" if ack.duplicate else ""
    return Answer(f"PubAck: stream {ack.stream}, sequence {ack.seq}{duplicate}")


def _refused_login(error: Exception | None) -> bool:
    text = str(error).lower()
    return isinstance(error, nats_errors.Error) and (
        "authorization violation" in text or "authentication" in text
    )


async def _cancel_others() -> None:
    """Cancel what the closed client left running on its loop (its subscriptions' readers)."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


async def _within(timeout: float, coroutine: Coroutine[Any, Any, T]) -> T:
    """``coroutine``, cancelled after ``timeout`` seconds (nats-py's connect retries on)."""
    return await asyncio.wait_for(coroutine, timeout)
