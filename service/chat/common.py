"""What the Slack and Discord apps share: refusals, abuse limits and making the job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests
from limits import RateLimitItem, parse
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from service.capacity import finds_no_slot, queue_position
from service.chat.replies import DISCORD_REPLY
from service.config import ConfigError, Settings
from service.downloads import store_upload
from service.events import add_delivery
from service.extension import Services
from service.jobs import create_job
from service.models import new_id
from service.projects import find_project

MAX_PROMPT = 1000
# Seconds for downloading the image: the chat wants its answer within 3 s.
DOWNLOAD_TIMEOUT = 2.0


class BadSignature(Exception):
    """The request is not signed by the chat platform with the configured key or secret."""


class ChatRefusal(Exception):
    """A request from a chat that is answered with a friendly message, and makes no job."""


@dataclass
class ChatGate:
    """The abuse limits of a public bot: the allow-list and a budget per chat user."""

    allowed: frozenset[str]
    limit: RateLimitItem
    storage: Storage
    limiter: MovingWindowRateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = MovingWindowRateLimiter(self.storage)

    @classmethod
    def from_settings(cls, settings: Settings) -> ChatGate:
        storage = storage_from_string(settings.ratelimit_storage_url)
        if not isinstance(storage, Storage):
            raise ConfigError(
                "MOTIONHOOK_RATELIMIT_STORAGE_URL: the chat limit needs a sync storage"
            )
        return cls(
            allowed=frozenset(settings.chat_allowed),
            limit=parse(settings.chat_rate_limit),
            storage=storage,
        )

    def admit(self, kind: str, workspace: str | None, user: str) -> None:
        """Raise ChatRefusal unless this workspace may ask and this user has budget left."""
        if self.allowed and (workspace or "") not in self.allowed:
            raise ChatRefusal("this server or workspace is not allowed to use this app")
        if not self.limiter.hit(self.limit, "chat", kind, user):
            raise ChatRefusal(
                f"you have asked for {self.limit.amount} videos per "
                f"{self.limit.multiples} {self.limit.GRANULARITY.name}; please wait a little"
            )


def fetch_image(
    session: requests.Session,
    url: str,
    *,
    origin: str,
    max_bytes: int,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> bytes:
    """Download the image a chat user pointed at (``origin`` names its host in refusals)."""
    try:
        with session.get(url, timeout=timeout, stream=True, headers=headers) as response:
            if response.status_code != 200:
                raise ChatRefusal(f"image: {origin} answered {response.status_code} for it")
            body = response.raw.read(max_bytes + 1, decode_content=True)
    except requests.RequestException:
        raise ChatRefusal(f"image: could not be downloaded from {origin}") from None
    if len(body) > max_bytes:
        raise ChatRefusal(f"image: larger than {max_bytes} bytes")
    return bytes(body)


def queue_chat_job(
    services: Services,
    gate: ChatGate,
    http: requests.Session,
    *,
    source: dict[str, Any],
    image_url: str,
    origin: str,
    params: dict[str, Any],
    reply: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> int | None:
    """Admit the chat user, download and store the image, queue the job; its queue position.

    Chat links to images expire (Discord's CDN) or need a token (Slack's files), so
    the image is stored like an upload rather than passed on by URL.
    """
    gate.admit(source["kind"], source["workspace"], source["user"])
    image = fetch_image(
        http,
        image_url,
        origin=origin,
        max_bytes=services.settings.max_upload_bytes,
        timeout=DOWNLOAD_TIMEOUT,
        headers=headers,
    )
    return submit_chat_job(services, source=source, image=image, params=params, reply=reply)


def submit_chat_job(
    services: Services,
    *,
    source: dict[str, Any],
    image: bytes,
    params: dict[str, Any],
    reply: dict[str, Any],
) -> int | None:
    """Store the image like an upload and queue an ordinary job; return its queue position."""
    settings = services.settings
    job_id = new_id("job")
    with services.db.transaction() as session:
        project = find_project(session, settings.chat_project)
        if project is None:
            raise ChatRefusal(f"this app's project {settings.chat_project!r} does not exist")
        try:
            stored = store_upload(services.storage, job_id, image, settings.max_upload_bytes)
        except ValueError as exc:
            raise ChatRefusal(str(exc)) from None
        job = create_job(
            session,
            services.db,
            {**params, "image_key": stored.key},
            project_id=project.id,
            job_id=job_id,
            source=source,
        )
        job.chat_reply = reply
        position = queue_position(session, job)
        if (
            position is not None
            and reply["kind"] == DISCORD_REPLY
            and finds_no_slot(session, project, position, settings.modelslab_max_queued)
        ):
            # Discord's deferred answer says "thinking…" until edited: while the job waits
            # for a slot, one edit says where it is (Slack's acknowledgement already does).
            add_delivery(
                session,
                None,
                project_id=project.id,
                kind=DISCORD_REPLY,
                subscription_id=None,
                target_url=None,
                job_id=job.id,
            )
        return position
