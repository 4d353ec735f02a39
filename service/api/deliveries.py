"""``/v1/deliveries``: every attempt to tell a target about an event."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint

from schemas.subscriptions import DeliveryListArgs, DeliveryPageSchema, DeliverySchema
from service.api.auth import client_project, owned, require_client
from service.api.errors import abort
from service.extension import services
from service.models import Delivery, Subscription
from service.subscriptions import get_delivery, list_deliveries, retry_delivery

blp = Blueprint(
    "deliveries",
    __name__,
    url_prefix="/v1/deliveries",
    description="Delivery log, with every attempt",
)
blp.before_request(require_client)
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]


@blp.get("")
@blp.doc(security=SECURITY)
@blp.arguments(DeliveryListArgs, location="query")
@blp.response(200, DeliveryPageSchema)
def list_all(args: dict[str, Any]) -> dict[str, Any]:
    """List deliveries, newest first, filtered by subscription, job or status."""
    with services().db.transaction() as session:
        try:
            items, next_cursor = list_deliveries(
                session,
                client_project(),
                filters=args,
                limit=args["limit"],
                cursor=args.get("cursor"),
            )
        except ValueError as exc:
            abort(422, message=f"cursor: {exc}", errors={"query": {"cursor": [str(exc)]}})
        return {"items": items, "next_cursor": next_cursor}


@blp.get("/<string:delivery_id>")
@blp.doc(security=SECURITY)
@blp.response(200, DeliverySchema)
def get(delivery_id: str) -> dict[str, Any]:
    """Return one delivery with every attempt."""
    with services().db.transaction() as session:
        resource = get_delivery(session, client_project(), delivery_id)
        if resource is None:
            abort(404, message=f"delivery {delivery_id} not found")
        return resource


@blp.post("/<string:delivery_id>/retry")
@blp.doc(security=SECURITY)
@blp.response(202, DeliverySchema)
def retry(delivery_id: str) -> dict[str, Any]:
    """Send this delivery again now."""
    svc = services()
    with svc.db.transaction() as session:
        delivery = owned(session, Delivery, delivery_id, "delivery", lock=True)
        if delivery.subscription_id:
            sub = session.get(Subscription, delivery.subscription_id)
            if sub is not None and not sub.enabled:
                abort(409, message="subscription is disabled; enable it first")
        retry_delivery(session, svc.db, delivery)
    with svc.db.transaction() as session:
        resource = get_delivery(session, delivery.project_id, delivery_id)
        assert resource is not None
        return resource
