"""``/dashboard``: jobs, deliveries and subscriptions in the browser, updating live.

Server-rendered Jinja pages and one small script, no build step. Signing in takes
an API token in a POST form (never a URL); the session cookie (HttpOnly,
SameSite=Strict, Secure behind https) keeps only the token's SHA-256, checked
against the configured tokens on every request, so a revoked token signs the
browser out. Every form carries a CSRF token (flask-wtf). Live updates come from
the same event streams as ``/v1/events/stream``, authenticated by the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any, TypeVar

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from marshmallow import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as BaseResponse

from schemas.jobs import EVENT_TYPES, JobCreateSchema
from schemas.subscriptions import KINDS, SubscriptionCreateSchema
from schemas.upstream import SUPPORTED_MODELS
from service.api.events import stream_events, stream_job_events
from service.bearer import token_hash
from service.downloads import store_upload
from service.eventlog import START, read_after
from service.extension import services
from service.jobs import create_job, job_resource, list_jobs
from service.models import Delivery, Job, Subscription, new_id
from service.outbound import TargetRefused
from service.projects import ADMIN, READ, Principal, resolve_token, resolve_token_hash
from service.subscriptions import (
    SIGNED_KINDS,
    MissingExtra,
    SubscriptionLimitReached,
    check_destination,
    create_subscription,
    get_delivery,
    list_deliveries,
    recover_failed,
    retry_delivery,
    rotate_secret,
    send_test_event,
    subscription_resource,
    update_subscription,
)

SESSION_KEY = "token_sha256"
SENT_FORMS_KEY = "sent_forms"
SENT_FORMS_KEPT = 50
PAGE = 50
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' http: https: "
    "data:; media-src 'self' http: https:; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'"
)
FORM_FIELDS = ("prompt", "model_id", "num_frames")

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
)
JOB_FORM = JobCreateSchema(only=("prompt", "model_id", "num_frames"))
SUBSCRIPTION_FORM = SubscriptionCreateSchema()
View = TypeVar("View", bound=Callable[..., Any])


def init_app(app: Flask) -> None:
    """Session settings for the dashboard, then its blueprint."""
    settings = app.extensions["motionhook"].settings
    if not app.secret_key:
        # Derived, so no new secret is needed; rotating the callback secret signs users out.
        app.secret_key = hmac.new(
            settings.callback_secret.encode(), b"motionhook dashboard session", hashlib.sha256
        ).hexdigest()
    app.config.update(
        SESSION_COOKIE_NAME="motionhook_dashboard",
        SESSION_COOKIE_PATH="/dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        WTF_CSRF_TIME_LIMIT=None,  # tied to the session instead
    )
    app.register_blueprint(bp)
    app.add_url_rule("/", "home", home)


def home() -> BaseResponse:
    """``/``: whoever opens the server's address in a browser lands on the dashboard."""
    return redirect(url_for("dashboard.jobs"))


def principal() -> Principal | None:
    """Whom the session speaks for: it holds the token's hash, resolved on every request."""
    if "dashboard_principal" not in g:
        digest = session.get(SESSION_KEY)
        settings = services().settings
        found = (
            resolve_token_hash(
                services().db,
                digest,
                api_tokens=settings.api_tokens,
                admin_tokens=settings.admin_tokens,
            )
            if isinstance(digest, str)
            else None
        )
        g.dashboard_principal = found if found is not None and found.scope != ADMIN else None
    current: Principal | None = g.dashboard_principal
    return current


def signed_in() -> bool:
    return principal() is not None


def project() -> str:
    current = principal()
    assert current is not None and current.project_id is not None, "login_required first"
    return current.project_id


def login_required(view: View) -> View:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        current = principal()
        if current is None:
            if request.method == "GET" and not request.path.endswith("/stream"):
                return redirect(url_for("dashboard.login"))
            abort(401)
        if current.scope == READ and request.method != "GET":
            abort(403, description="this token has the read scope; changes need a write token")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@bp.before_request
def check_csrf() -> None:
    if request.method == "POST":
        try:
            validate_csrf(request.form.get("csrf_token"))
        except (CSRFError, ValidationError, ValueError) as exc:
            abort(400, description=f"CSRF check failed: {exc}; reload the page and try again")


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@bp.app_context_processor
def template_globals() -> dict[str, Any]:
    return {"csrf_token": generate_csrf, "signed_in": signed_in, "form_id": new_form_id}


def new_form_id() -> str:
    return secrets.token_urlsafe(12)


def once_per_form(view: View) -> View:
    """Run a POST view once per rendered form: a reload that posts the form again (its answer
    shows a new secret, so it cannot redirect) changes nothing a second time."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        form_id = request.form.get("form_id", "")
        sent: list[str] = session.get(SENT_FORMS_KEY, [])
        if form_id in sent:
            flash("That form was sent already; nothing was done again.", "notice")
            return redirect(url_for("dashboard.subscriptions"), 303)
        if form_id:
            session[SENT_FORMS_KEY] = [*sent, form_id][-SENT_FORMS_KEPT:]
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _page(template: str, status: int = 200, **context: Any) -> tuple[str, int]:
    return render_template(template, **context), status


# -- signing in ----------------------------------------------------------


@bp.get("/login")
def login() -> Any:
    return _page("dashboard/login.html")


@bp.post("/login")
def login_submit() -> Any:
    token = request.form.get("token", "").strip()
    settings = services().settings
    found = resolve_token(
        services().db, token, api_tokens=settings.api_tokens, admin_tokens=settings.admin_tokens
    )
    if found is None:
        return _page("dashboard/login.html", 401, error="That token is not valid.")
    if found.scope == ADMIN:
        return _page(
            "dashboard/login.html", 403, error="Admin tokens own no project: use a project's token."
        )
    session.clear()
    session[SESSION_KEY] = token_hash(token)
    return redirect(url_for("dashboard.jobs"))


@bp.post("/logout")
def logout() -> BaseResponse:
    session.clear()
    return redirect(url_for("dashboard.login"))


# -- jobs ------------------------------------------------------------------


@bp.get("/")
@login_required
def jobs() -> Any:
    svc = services()
    with svc.db.transaction() as db_session:
        rows, _cursor = list_jobs(db_session, project(), status=None, limit=PAGE, cursor=None)
        items = [job_resource(job, svc.media_url) for job in rows]
    return _page("dashboard/jobs.html", jobs=items, models=SUPPORTED_MODELS)


@bp.post("/jobs")
@login_required
def submit_job() -> Any:
    svc = services()
    upload = request.files.get("image")
    form = {name: request.form[name] for name in FORM_FIELDS if request.form.get(name)}
    try:
        params: dict[str, Any] = JOB_FORM.load(form)
        if upload is None or not upload.filename:
            raise ValidationError("choose an image file", "image")
        job_id = new_id("job")
        stored = store_upload(svc.storage, job_id, upload.read(), svc.settings.max_upload_bytes)
    except (ValidationError, ValueError) as exc:
        return _error_on_jobs(exc)
    with svc.db.transaction() as db_session:
        create_job(
            db_session,
            svc.db,
            {**params, "image_key": stored.key},
            project_id=project(),
            job_id=job_id,
        )
    return redirect(url_for("dashboard.job", job_id=job_id))


def _error_on_jobs(exc: Exception) -> Any:
    message = _message(exc)
    svc = services()
    with svc.db.transaction() as db_session:
        rows, _cursor = list_jobs(db_session, project(), status=None, limit=PAGE, cursor=None)
        items = [job_resource(job, svc.media_url) for job in rows]
    return _page("dashboard/jobs.html", 422, jobs=items, models=SUPPORTED_MODELS, error=message)


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError) and isinstance(exc.messages, dict):
        return "; ".join(
            f"{field}: {' '.join(map(str, errs))}" for field, errs in exc.messages.items()
        )
    return str(exc)


@bp.get("/jobs/<string:job_id>")
@login_required
def job(job_id: str) -> Any:
    svc = services()
    with svc.db.transaction() as db_session:
        resource = job_resource(_owned_job(db_session, job_id), svc.media_url)
        timeline = read_after(db_session, START, limit=200, job_id=job_id).events
    return _page(
        "dashboard/job.html", job=resource, timeline=timeline, deliveries=_deliveries(job_id)
    )


def _owned_job(db_session: Session, job_id: str) -> Job:
    found = db_session.get(Job, job_id)
    if found is None or found.project_id != project():
        abort(404)
    return found


@bp.get("/events/stream")
@login_required
def events_stream() -> Response:
    return stream_events(project(), event_type=None, job_id=None)


@bp.get("/jobs/<string:job_id>/stream")
@login_required
def job_stream(job_id: str) -> Response:
    with services().db.transaction() as db_session:
        _owned_job(db_session, job_id)
    return stream_job_events(project(), job_id)


# -- deliveries -------------------------------------------------------------


@bp.get("/deliveries")
@login_required
def deliveries() -> Any:
    return _page("dashboard/deliveries.html", deliveries=_deliveries(None))


@bp.get("/deliveries/table")
@login_required
def deliveries_table() -> Any:
    """The deliveries table alone (optionally one job's): pages refresh it while one is pending."""
    items = _deliveries(request.args.get("job_id") or None)
    return _page("dashboard/_deliveries.html", deliveries=items)


def _deliveries(job_id: str | None) -> list[dict[str, Any]]:
    with services().db.transaction() as db_session:
        items, _cursor = list_deliveries(
            db_session, project(), filters={"job_id": job_id}, limit=PAGE, cursor=None
        )
    return items


@bp.get("/deliveries/<string:delivery_id>")
@login_required
def delivery(delivery_id: str) -> Any:
    resource = _delivery(delivery_id)
    if request.args.get("format") == "json":
        return resource  # the page's script polls this while the delivery is pending
    return _page("dashboard/delivery.html", delivery=resource)


def _delivery(delivery_id: str) -> dict[str, Any]:
    with services().db.transaction() as db_session:
        resource = get_delivery(db_session, project(), delivery_id)
    if resource is None:
        abort(404)
    return resource


@bp.post("/deliveries/<string:delivery_id>/retry")
@login_required
def retry(delivery_id: str) -> Any:
    svc = services()
    with svc.db.transaction() as db_session:
        found = db_session.get(Delivery, delivery_id, with_for_update=True)
        if found is None or found.project_id != project():
            abort(404)
        if found.subscription_id and not _enabled(db_session, found.subscription_id):
            return _page(
                "dashboard/delivery.html",
                409,
                delivery=get_delivery(db_session, project(), delivery_id),
                error="The subscription is disabled; enable it first.",
            )
        retry_delivery(db_session, svc.db, found)
    return redirect(url_for("dashboard.delivery", delivery_id=delivery_id))


def _enabled(db_session: Session, subscription_id: str) -> bool:
    sub = db_session.get(Subscription, subscription_id)
    return sub is None or sub.enabled


# -- subscriptions ----------------------------------------------------------


def _subscriptions_page(status: int = 200, **context: Any) -> Any:
    with services().db.transaction() as db_session:
        subs = db_session.scalars(
            select(Subscription)
            .where(Subscription.project_id == project())
            .order_by(Subscription.created_at.desc(), Subscription.id)
        )
        items = [subscription_resource(sub) for sub in subs]
    return _page(
        "dashboard/subscriptions.html",
        status,
        subscriptions=items,
        kinds=KINDS,
        signed_kinds=SIGNED_KINDS,
        event_types=EVENT_TYPES,
        **context,
    )


@bp.get("/subscriptions")
@login_required
def subscriptions() -> Any:
    return _subscriptions_page()


@bp.post("/subscriptions")
@login_required
@once_per_form
def create() -> Any:
    form = {
        "kind": request.form.get("kind", ""),
        "url": request.form.get("url", ""),
        "events": request.form.getlist("events") or list(EVENT_TYPES),
        "description": request.form.get("description", ""),
    }
    try:
        params = SUBSCRIPTION_FORM.load(form)
        check_destination(params["kind"], params["url"], services().settings)
    except (ValidationError, TargetRefused, MissingExtra) as exc:
        return _subscriptions_page(422, error=_message(exc))
    settings = services().settings
    try:
        with services().db.transaction() as db_session:
            sub = create_subscription(
                db_session, project(), params, limit=settings.max_subscriptions_per_project
            )
            shown = subscription_resource(sub, secret=sub.secret)
    except SubscriptionLimitReached as exc:
        return _subscriptions_page(409, error=str(exc))
    # Slack and Discord subscriptions have no signing secret to show.
    return _subscriptions_page(
        201, notice="Subscription created.", secret_of=shown if "secret" in shown else None
    )


def _with_subscription(
    subscription_id: str, action: Callable[[Session, Subscription], dict[str, Any]]
) -> Any:
    svc = services()
    with svc.db.transaction() as db_session:
        sub = db_session.get(Subscription, subscription_id)
        if sub is None or sub.project_id != project():
            abort(404)
        context = action(db_session, sub)
    if "secret_of" in context:
        return _subscriptions_page(**context)  # the new secret is in this answer only
    return _back_to_subscriptions(**context)


def _back_to_subscriptions(*, notice: str | None = None, error: str | None = None) -> BaseResponse:
    """Post/redirect/get: reloading the page afterwards does not repeat the action."""
    if error is not None:
        flash(error, "error")
    if notice is not None:
        flash(notice, "notice")
    return redirect(url_for("dashboard.subscriptions"), 303)


@bp.post("/subscriptions/<string:subscription_id>/test")
@login_required
def test(subscription_id: str) -> Any:
    def send(db_session: Session, sub: Subscription) -> dict[str, Any]:
        if not sub.enabled:
            return {"error": "The subscription is disabled; enable it first."}
        _event, sent = send_test_event(db_session, services().db, sub)
        return {"notice": f"test.ping queued as delivery {sent.id}."}

    return _with_subscription(subscription_id, send)


@bp.post("/subscriptions/<string:subscription_id>/rotate")
@login_required
@once_per_form
def rotate(subscription_id: str) -> Any:
    def new_secret(_db_session: Session, sub: Subscription) -> dict[str, Any]:
        if sub.kind not in SIGNED_KINDS:
            return {"error": f"{sub.kind} subscriptions have no signing secret."}
        secret = rotate_secret(sub)
        return {
            "notice": "New secret issued; the old one keeps signing for 24 hours.",
            "secret_of": subscription_resource(sub, secret=secret),
        }

    return _with_subscription(subscription_id, new_secret)


@bp.post("/subscriptions/<string:subscription_id>/enabled")
@login_required
def toggle(subscription_id: str) -> Any:
    enable = request.form.get("enabled") == "1"

    def switch(_db_session: Session, sub: Subscription) -> dict[str, Any]:
        update_subscription(sub, {"enabled": enable})
        return {"notice": "Subscription enabled." if enable else "Subscription disabled."}

    return _with_subscription(subscription_id, switch)


@bp.post("/subscriptions/<string:subscription_id>/recover")
@login_required
def recover(subscription_id: str) -> Any:
    try:
        since = datetime.fromisoformat(request.form.get("since", "")).replace(tzinfo=UTC)
    except ValueError:
        return _back_to_subscriptions(error="since: give a date and time")

    def replay(db_session: Session, sub: Subscription) -> dict[str, Any]:
        if not sub.enabled:
            return {"error": "The subscription is disabled; enable it first."}
        count = recover_failed(db_session, services().db, sub, since)
        return {"notice": f"{count} failed deliveries queued again."}

    return _with_subscription(subscription_id, replay)
