"""``/v1/subscriptions``: Slack, Discord and signed-webhook fan-out targets."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.subscriptions import (
    RecoverResultSchema,
    RecoverSchema,
    SubscriptionCreateSchema,
    SubscriptionListSchema,
    SubscriptionSchema,
    SubscriptionUpdateSchema,
    TestSentSchema,
)
from service.api.auth import client_project, owned, require_client
from service.api.errors import abort
from service.extension import services
from service.models import Subscription
from service.outbound import TargetRefused, validate_target_url
from service.subscriptions import (
    WEBHOOK,
    SubscriptionLimitReached,
    create_subscription,
    recover_failed,
    rotate_secret,
    send_test_event,
    subscription_resource,
    update_subscription,
)

blp = Blueprint(
    "subscriptions",
    __name__,
    url_prefix="/v1/subscriptions",
    description="Where events are delivered: Slack, Discord or signed webhooks",
)
blp.before_request(require_client)
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


def check_target(url: str) -> None:
    """Refuse URLs that resolve to private, loopback, link-local or metadata addresses."""
    try:
        validate_target_url(url, allow_private=services().settings.allow_private_targets)
    except TargetRefused as exc:
        abort(422, message=f"url: {exc}", errors={"json": {"url": [str(exc)]}})


def load_subscription(session: Session, subscription_id: str) -> Subscription:
    return owned(session, Subscription, subscription_id, "subscription")


@blp.post("")
@blp.doc(security=SECURITY)
@blp.arguments(SubscriptionCreateSchema)
@blp.response(201, SubscriptionSchema)
def create(params: dict[str, Any]) -> dict[str, Any]:
    """Subscribe a target to events; webhook targets get their signing secret once."""
    check_target(params["url"])
    svc = services()
    with svc.db.transaction() as session:
        try:
            sub = create_subscription(
                session,
                client_project(),
                params,
                limit=svc.settings.max_subscriptions_per_project,
            )
        except SubscriptionLimitReached as exc:
            abort(409, message=str(exc))
        return subscription_resource(sub, secret=sub.secret, full_url=True)


@blp.get("")
@blp.doc(security=SECURITY)
@blp.response(200, SubscriptionListSchema)
def list_all() -> dict[str, Any]:
    """List subscriptions, newest first."""
    with services().db.transaction() as session:
        subs = session.scalars(
            select(Subscription)
            .where(Subscription.project_id == client_project())
            .order_by(Subscription.created_at.desc(), Subscription.id)
        )
        return {"items": [subscription_resource(sub) for sub in subs]}


@blp.get("/<string:subscription_id>")
@blp.doc(security=SECURITY)
@blp.response(200, SubscriptionSchema)
def get(subscription_id: str) -> dict[str, Any]:
    """Return one subscription (without its secret)."""
    with services().db.transaction() as session:
        return subscription_resource(load_subscription(session, subscription_id))


@blp.patch("/<string:subscription_id>")
@blp.doc(security=SECURITY)
@blp.arguments(SubscriptionUpdateSchema)
@blp.response(200, SubscriptionSchema)
def patch(changes: dict[str, Any], subscription_id: str) -> dict[str, Any]:
    """Change url, events, description or enabled."""
    if "url" in changes:
        check_target(changes["url"])
    with services().db.transaction() as session:
        sub = load_subscription(session, subscription_id)
        update_subscription(sub, changes)
        return subscription_resource(sub)


@blp.delete("/<string:subscription_id>")
@blp.doc(security=SECURITY)
@blp.response(204)
def delete(subscription_id: str) -> None:
    """Delete a subscription and its deliveries."""
    with services().db.transaction() as session:
        session.delete(load_subscription(session, subscription_id))


@blp.post("/<string:subscription_id>/rotate-secret")
@blp.doc(security=SECURITY)
@blp.response(200, SubscriptionSchema)
def rotate(subscription_id: str) -> dict[str, Any]:
    """Issue a new signing secret; the old one keeps signing alongside for 24 hours."""
    with services().db.transaction() as session:
        sub = load_subscription(session, subscription_id)
        if sub.kind != WEBHOOK:
            abort(409, message=f"kind {sub.kind} subscriptions have no signing secret")
        secret = rotate_secret(sub)
        return subscription_resource(sub, secret=secret)


@blp.post("/<string:subscription_id>/test")
@blp.doc(security=SECURITY)
@blp.response(202, TestSentSchema)
def test(subscription_id: str) -> dict[str, Any]:
    """Send a ``test.ping`` event to this subscription."""
    svc = services()
    with svc.db.transaction() as session:
        sub = load_subscription(session, subscription_id)
        if not sub.enabled:
            abort(409, message="subscription is disabled; enable it first")
        event, delivery = send_test_event(session, svc.db, sub)
        return {"event_id": event.id, "delivery_id": delivery.id}


@blp.post("/<string:subscription_id>/recover")
@blp.doc(security=SECURITY)
@blp.arguments(RecoverSchema)
@blp.response(202, RecoverResultSchema)
def recover(params: dict[str, Any], subscription_id: str) -> dict[str, Any]:
    """Queue again every failed delivery of this subscription since a time."""
    svc = services()
    with svc.db.transaction() as session:
        sub = load_subscription(session, subscription_id)
        if not sub.enabled:
            abort(409, message="subscription is disabled; enable it first")
        return {"recovered": recover_failed(session, svc.db, sub, params["since"])}
