"""Logs, request ids, log context and Sentry for the web and worker processes.

- Logs are JSON, one line per event, on stdout. Every line carries the context
  bound with :func:`bind` (request id, job id / track id, subscription id,
  delivery id) and passes through :func:`redact`, so bearer tokens, callback
  ``sig`` values, ``whsec_`` secrets, the ModelsLab key and configured secrets
  never reach a log line.
- Each request gets an id: the client's ``X-Request-ID`` when it is sane, else a
  new one; it is echoed in the response and bound to the log context.
- Sentry starts only when ``SENTRY_DSN`` is set, from :func:`init_app` or the
  worker command, never at import time. Its ``before_send`` tags the event with
  the log context and scrubs the same secrets from the whole event.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pythonjsonlogger.json import JsonFormatter as _BaseJsonFormatter

from service.config import SIMULATOR_API_KEY

if TYPE_CHECKING:
    from flask import Flask

    from service.config import Settings

REDACTED = "[redacted]"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# URL variables of our routes that name a resource worth tagging logs and errors with.
_VIEW_ARG_CONTEXT = {
    "track_id": ("job_id", "track_id"),
    "job_id": ("job_id", "track_id"),
    "subscription_id": ("subscription_id",),
    "delivery_id": ("delivery_id",),
}
# Keys whose values are secret wherever they appear (log extras, Sentry event data).
_SENSITIVE_KEY = re.compile(
    r"^(authorization|proxy[-_]authorization|cookie|set[-_]cookie|x[-_]api[-_]key|"
    r"key|api[-_]?key|.*[-_]key|secret|.*[-_]secrets?|secrets?[-_].*|tokens?|.*[-_]tokens?|"
    r"password|passwd|sig|signature|webhook[-_]signature|dsn|sentry[-_]dsn)$",
    re.IGNORECASE,
)
# Keys that end like secrets but are not (storage keys of media, idempotency keys, ...).
_SAFE_KEYS = frozenset({"image_key", "idempotency_key", "media_key", "storage_key", "sort_key"})
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(basic\s+)[A-Za-z0-9+/=]{8,}"), r"\1" + REDACTED),
    (re.compile(r"(?i)((?:^|[?&;\s])sig=)[^&\s\"'#<>]+"), r"\1" + REDACTED),
    (re.compile(r"whsec_[A-Za-z0-9+/=_-]+"), "whsec_" + REDACTED),
    (re.compile(r"(?i)(\"(?:key|api_?key|secret|token|sig)\"\s*:\s*\")[^\"]*"), r"\1" + REDACTED),
    (re.compile(r"(?i)('(?:key|api_?key|secret|token|sig)'\s*:\s*')[^']*"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b((?:api_?key|secret|token|password)=)[^&\s\"']+"), r"\1" + REDACTED),
    # Slack and Discord webhook URLs are credentials as a whole (subscription targets).
    (re.compile(r"(?i)(hooks\.slack\.com/)[^\s\"'<>]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)(/api(?:/v\d+)?/webhooks/)[^\s\"'<>]+"), r"\1" + REDACTED),
)
# Every pattern above matches only text that contains one of these (lowercased).
_PATTERN_WORDS = (
    "bearer",
    "basic",
    "sig",
    "whsec_",
    "key",
    "secret",
    "token",
    "password",
    "hooks.slack.com",
    "/webhooks/",
)
MIN_SECRET_LENGTH = 6

_context: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "motionhook_log_context", default=None
)
_request_secrets: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "motionhook_request_secrets", default=()
)
# Longest first, so a secret containing another is replaced whole; rebuilt on register.
_known_secrets: tuple[str, ...] = ()
_component = "web"


def set_component(component: str) -> None:
    """Name this process (``web`` or ``worker``) in every log line and Sentry event."""
    global _component
    _component = component


# -- context -------------------------------------------------------------------


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` to the log and error context for the duration of the block."""
    values = {**(_context.get() or {}), **{k: str(v) for k, v in fields.items() if v is not None}}
    token = _context.set(values)
    try:
        yield
    finally:
        _context.reset(token)


# -- redaction -----------------------------------------------------------------


def register_secrets(*values: str | None) -> None:
    """Remember secret values so that they are redacted wherever they appear."""
    global _known_secrets
    added = {value for value in values if value and len(value) >= MIN_SECRET_LENGTH}
    _known_secrets = _longest_first({*_known_secrets, *added})


def register_settings_secrets(settings: Settings) -> None:
    modelslab_key: str | None = settings.modelslab_api_key
    if modelslab_key == SIMULATOR_API_KEY:
        modelslab_key = None
    register_secrets(
        *settings.api_tokens,
        *settings.admin_tokens,
        settings.callback_secret,
        settings.callback_secret_previous,
        settings.webhook_secret,
        modelslab_key,
        settings.metrics_token,
    )


def redact(text: str) -> str:
    """Replace every secret this process knows of, and secret-looking patterns, in ``text``."""
    request_secrets = _request_secrets.get()
    secrets = (
        _longest_first({*_known_secrets, *request_secrets}) if request_secrets else _known_secrets
    )
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    # Most strings (ids, times, messages) hold none of the words every pattern needs:
    # checking for those words first is much cheaper than running the patterns.
    lowered = text.lower()
    if any(word in lowered for word in _PATTERN_WORDS):
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
    return text


def _longest_first(secrets: set[str]) -> tuple[str, ...]:
    return tuple(sorted(secrets, key=len, reverse=True))


def is_sensitive_key(key: object) -> bool:
    return isinstance(key, str) and _is_sensitive_name(key)


@functools.lru_cache(maxsize=1024)
def _is_sensitive_name(key: str) -> bool:
    # Cached: log records and events repeat the same few dozen field names.
    return key.lower() not in _SAFE_KEYS and bool(_SENSITIVE_KEY.match(key))


def scrub(value: Any, depth: int = 0) -> Any:
    """Return ``value`` with secret keys blanked and every string redacted, recursively."""
    if depth > 30:
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {
            key: (
                REDACTED
                if is_sensitive_key(key) and item not in (None, "")
                else scrub(item, depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(item, depth + 1) for item in value]
    return value


# -- logging -------------------------------------------------------------------


class RedactionFilter(logging.Filter):
    """Redact the message, its arguments and any extra fields of a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and not isinstance(record.args, Mapping):
            try:
                record.msg = record.getMessage()
                record.args = ()
            except (TypeError, ValueError):
                pass
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        for key, value in list(record.__dict__.items()):
            if key in _RECORD_ATTRS:
                continue
            if is_sensitive_key(key) and value not in (None, ""):
                setattr(record, key, REDACTED)
            elif isinstance(value, str | Mapping | list | tuple):
                setattr(record, key, scrub(value))
        return True


_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}


class JsonFormatter(_BaseJsonFormatter):
    """One JSON object per line: time, level, logger, message, context, extras."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", "time")
        super().__init__("%(levelname)s %(name)s %(message)s", **kwargs)

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["component"] = _component
        log_data["pid"] = record.process
        for key, value in (_context.get() or {}).items():
            log_data.setdefault(key, value)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        scrubbed: dict[str, Any] = scrub(log_data)
        return scrubbed


class AccessLogFormatter(JsonFormatter):
    """gunicorn's access log as JSON; the query string is redacted (it may hold ``sig``)."""

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        atoms: Mapping[str, Any] = record.args if isinstance(record.args, Mapping) else {}
        super().add_fields(log_data, record, message_dict)
        query = str(atoms.get("q") or "")
        duration_us = atoms.get("D")
        duration_ms = round(duration_us / 1000, 2) if isinstance(duration_us, int) else None
        log_data.update(
            {
                "message": "request",
                "method": atoms.get("m"),
                "path": atoms.get("U"),
                "query": redact(query) if query and query != "-" else None,
                "status": _int(atoms.get("s")),
                "bytes": _int(atoms.get("B")),
                "duration_ms": duration_ms,
                "remote_addr": atoms.get("h"),
                "forwarded_for": _dash_none(atoms.get("{x-forwarded-for}i")),
                "user_agent": _dash_none(atoms.get("a")),
                "request_id": _dash_none(atoms.get("{x-request-id}o")),
            }
        )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _dash_none(value: Any) -> Any:
    return None if value in (None, "-") else value


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes to whatever ``sys.stdout`` is now, with redaction."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.addFilter(RedactionFilter())

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        """The stream is always the current ``sys.stdout``."""


def configure_logging(settings: Settings, component: str | None = None) -> None:
    """Send JSON logs to stdout (once per process) and remember the secrets to redact."""
    if component:
        set_component(component)
    register_settings_secrets(settings)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, StdoutHandler)), None)
    if handler is None:
        handler = StdoutHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    # Our loggers speak at the configured level; libraries keep their WARNING default.
    logging.getLogger("motionhook").setLevel(settings.log_level)


# -- Sentry --------------------------------------------------------------------


def before_send(event: dict[str, Any], _hint: dict[str, Any]) -> dict[str, Any]:
    """Tag the event with the log context, then scrub secrets from all of it."""
    tags = event.setdefault("tags", {})
    if isinstance(tags, dict):
        for key, value in (_context.get() or {}).items():
            tags.setdefault(key, value)
        tags.setdefault("component", _component)
    scrubbed: dict[str, Any] = scrub(event)
    return scrubbed


def init_sentry(settings: Settings, component: str | None = None, *, web: bool = False) -> bool:
    """Start Sentry when ``SENTRY_DSN`` is set; return whether it is on.

    ``web`` adds the Flask integration. Elsewhere (the worker) Sentry does not
    probe for frameworks: its Flask probe alone would import Flask into a
    process that serves no requests.
    """
    if component:
        set_component(component)
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations import Integration

    integrations: list[Integration] = []
    if web:
        from sentry_sdk.integrations.flask import FlaskIntegration

        integrations.append(FlaskIntegration())
    register_settings_secrets(settings)
    client = sentry_sdk.get_client()
    if not (client.is_active() and client.dsn == settings.sentry_dsn):
        sentry_sdk.init(
            dsn=settings.sentry_dsn,
            environment=settings.sentry_environment or settings.env,
            traces_sample_rate=settings.sentry_traces_sample_rate,
            send_default_pii=False,
            max_request_body_size="small",
            integrations=integrations,
            auto_enabling_integrations=web,
            before_send=before_send,  # type: ignore[arg-type]
            before_send_transaction=before_send,  # type: ignore[arg-type]
        )
    sentry_sdk.get_global_scope().set_tag("component", _component)
    return True


def flush_all(timeout: float = 2.0) -> None:
    """Flush Sentry's queue and the log handlers (before ``os._exit``)."""
    import sentry_sdk

    if sentry_sdk.get_client().is_active():
        sentry_sdk.flush(timeout=timeout)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


# -- wiring --------------------------------------------------------------------


def init_app(app: Flask, settings: Settings) -> None:
    """Attach JSON logging, request ids, log context, HTTP metrics and Sentry to ``app``."""
    from flask import Response, g, request

    from service.metrics import record_http

    configure_logging(settings)
    init_sentry(settings, web=True)

    def start_request() -> None:
        g.motionhook_started = time.perf_counter()
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        context = {"request_id": request_id}
        for arg, value in (request.view_args or {}).items():
            for name in _VIEW_ARG_CONTEXT.get(arg, ()):
                context[name] = str(value)
        _context.set(context)
        secrets = [request.args.get("sig", "")]
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme:
            secrets.append(credential.strip())
        _request_secrets.set(tuple(s for s in secrets if len(s) >= MIN_SECRET_LENGTH))

    def finish_request(response: Response) -> Response:
        request_id = (_context.get() or {}).get("request_id")
        if request_id:
            response.headers.setdefault(REQUEST_ID_HEADER, request_id)
        started = g.get("motionhook_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            record_http(request.method, route, response.status_code, time.perf_counter() - started)
        return response

    def end_request(_error: BaseException | None) -> None:
        _context.set({})
        _request_secrets.set(())

    app.before_request(start_request)
    app.after_request(finish_request)
    app.teardown_request(end_request)
