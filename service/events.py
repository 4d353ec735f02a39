"""Events and their fan-out: one event row, one delivery per interested target.

Everything here runs inside the caller's transaction, so the state change, its
event and the deliveries it causes commit together or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import Database
from service.models import Delivery, Event, Subscription, new_id, utcnow

if TYPE_CHECKING:
    from service.models import Job

WEBHOOK = "webhook"


def new_event(
    session: Session,
    event_type: str,
    data: dict[str, Any],
    *,
    job_id: str | None,
    project_id: str,
) -> Event:
    now = utcnow()
    event_id = new_id("evt")
    payload = {
        "id": event_id,
        "type": event_type,
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    event = Event(
        id=event_id,
        project_id=project_id,
        type=event_type,
        job_id=job_id,
        created_at=now,
        payload=payload,
    )
    session.add(event)
    return event


def add_delivery(
    session: Session,
    event: Event | None,
    *,
    kind: str,
    subscription_id: str | None,
    target_url: str | None,
    job_id: str | None,
    project_id: str | None = None,
) -> Delivery:
    """Queue a delivery of ``event``, in the event's project; without an event, a chat
    reply of the job's own in ``project_id`` (the Discord "queued" edit, see
    ``service.chat.replies.QUEUED``)."""
    owner = event.project_id if event is not None else project_id
    if owner is None:
        raise ValueError("a delivery without an event needs its project_id")
    now = utcnow()
    delivery = Delivery(
        id=new_id("dlv"),
        project_id=owner,
        event=event,
        subscription_id=subscription_id,
        job_id=job_id,
        kind=kind,
        target_url=target_url,
        status="pending",
        attempt_count=0,
        due_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(delivery)
    return delivery


def matching_subscriptions(
    session: Session, project_id: str, event_type: str
) -> list[Subscription]:
    """The project's enabled subscriptions whose event filter admits ``event_type``."""
    enabled = session.scalars(
        select(Subscription).where(
            Subscription.project_id == project_id, Subscription.enabled.is_(True)
        )
    )
    return [sub for sub in enabled if not sub.events or event_type in sub.events]


def emit_job_event(
    session: Session, db: Database, event_type: str, job: Job, data: dict[str, Any]
) -> Event:
    """Record a job event, a delivery per matching subscription of its project and its webhook."""
    event = new_event(session, event_type, data, job_id=job.id, project_id=job.project_id)
    for sub in matching_subscriptions(session, job.project_id, event_type):
        add_delivery(
            session, event, kind=sub.kind, subscription_id=sub.id, target_url=None, job_id=job.id
        )
    if job.webhook_url and (not job.webhook_events or event_type in job.webhook_events):
        add_delivery(
            session,
            event,
            kind=WEBHOOK,
            subscription_id=None,
            target_url=job.webhook_url,
            job_id=job.id,
        )
    if job.chat_reply:
        # A chat job's progress and result go back to the chat it came from.
        add_delivery(
            session,
            event,
            kind=job.chat_reply["kind"],
            subscription_id=None,
            target_url=None,
            job_id=job.id,
        )
    db.notify(session)
    return event
