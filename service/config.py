"""Configuration: defaults, then ``MOTIONHOOK_*`` environment, then a test mapping.

:func:`load_config` gathers the raw values (web keeps them in Flask's ``app.config``);
:class:`Settings` is the typed, validated view the rest of the code (web, worker,
CLI) reads. Nothing here imports Flask: the worker runs without it.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "MOTIONHOOK_"
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DEFAULT_RETRY_SCHEDULE = "5,300,1800,7200,18000,36000,36000"
PRODUCTION = "production"
# The ModelsLab key when none is configured (the simulator takes any): not a secret.
SIMULATOR_API_KEY = "simulator"

DEFAULTS: dict[str, Any] = {
    "ENV": "development",
    "DATABASE_URL": None,
    "DATABASE_LISTEN_URL": None,
    "POLL_INTERVAL": 1,
    "PUBLIC_URL": "http://127.0.0.1:8000",
    "API_TOKENS": None,
    "ADMIN_TOKENS": None,
    "MAX_SUBSCRIPTIONS_PER_PROJECT": 100,
    "CALLBACK_SECRET": None,
    "CALLBACK_SECRET_PREVIOUS": None,
    "WEBHOOK_SECRET": None,
    "MODELSLAB_API_KEY": None,
    "MODELSLAB_BASE_URL": "https://modelslab.com/api/v6",
    "STORAGE_URL": None,
    "S3_ENDPOINT_URL": None,
    "MEDIA_PUBLIC_BASE_URL": None,
    "ALLOW_PRIVATE_TARGETS": None,
    "DESTINATION_ALLOWED_HOSTS": None,
    "AWS_ENDPOINT_URL": None,
    "RETRY_SCHEDULE": DEFAULT_RETRY_SCHEDULE,
    "DELIVERY_TIMEOUT": 15,
    "DISABLE_AFTER": 5 * 24 * 3600,
    "CALLBACK_GRACE": 600,
    "JOB_TIMEOUT": 7200,
    "QUEUE_TIMEOUT": 24 * 3600,
    "MODELSLAB_MAX_QUEUED": 5,
    "MEDIA_URL_TTL": 7 * 24 * 3600,
    "UPSTREAM_TIMEOUT": 30,
    "MAX_UPLOAD_BYTES": 10 * 1024 * 1024,
    "MAX_CALLBACKS_PER_JOB": 50,
    "MAX_OUTPUT_BYTES": 200 * 1024 * 1024,
    "DOWNLOAD_DEADLINE": 900,
    "DOWNLOAD_TIMEOUT": 300,
    "DELIVERY_THREADS": 64,
    "DELIVERY_CONNECTIONS_PER_HOST": 16,
    "TASK_THREADS": 4,
    "TASK_LEASE": 120,
    "DELIVERY_LEASE": None,
    "SHUTDOWN_GRACE": 25,
    "RATELIMIT": "600/minute",
    "RATELIMIT_STORAGE_URL": "memory://",
    "LOG_LEVEL": "INFO",
    "METRICS_TOKEN": None,
    "METRICS_PUBLIC": None,
    "WORKER_METRICS_PORT": None,
    "WORKER_METRICS_HOST": "0.0.0.0",
    "DISCORD_APPLICATION_ID": None,
    "DISCORD_PUBLIC_KEY": None,
    "DISCORD_BOT_TOKEN": None,
    "DISCORD_API_URL": "https://discord.com/api/v10",
    "SLACK_SIGNING_SECRET": None,
    "SLACK_BOT_TOKEN": None,
    "SLACK_API_URL": "https://slack.com/api",
    "CHAT_PROJECT": "default",
    "CHAT_RATE_LIMIT": "10/hour",
    "CHAT_ALLOWED": None,
    "STREAMS_MAX": 100,
    "STREAM_HEARTBEAT": 15,
    # Unprefixed, as Sentry names them; read from the environment when not in the mapping.
    "SENTRY_DSN": None,
    "SENTRY_ENVIRONMENT": None,
    "SENTRY_TRACES_SAMPLE_RATE": None,
}

SENTRY_KEYS = ("SENTRY_DSN", "SENTRY_ENVIRONMENT", "SENTRY_TRACES_SAMPLE_RATE")


class ConfigError(RuntimeError):
    """Raised when the configuration cannot run; the message names what is missing."""


def load_config(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """``DEFAULTS``, then every ``MOTIONHOOK_*`` variable of ``environ``, then ``overrides``.

    A variable's value is read as JSON when it parses (``8``, ``true``), else kept
    as the string, as Flask's ``from_prefixed_env`` does.
    """
    config = dict(DEFAULTS)
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX):
            try:
                value: Any = json.loads(raw)
            except ValueError:
                value = raw
            config[name.removeprefix(ENV_PREFIX)] = value
    config.update(overrides or {})
    return config


def instance_path() -> Path:
    """Where development secrets, SQLite and local media live (``MOTIONHOOK_INSTANCE_PATH``)."""
    return Path(os.environ.get("MOTIONHOOK_INSTANCE_PATH") or Path.cwd() / "instance").absolute()


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _as_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


def parse_duration(value: Any, *, unit_required: bool = False, positive: bool = False) -> float:
    """Seconds from a number or from text such as ``45``, ``45s``, ``90m``, ``12h``, ``2w``.

    ``unit_required`` refuses a bare number (``--older-than 30`` would be ambiguous);
    ``positive`` refuses zero. Negative and non-finite values are always refused.
    """
    text = str(value).strip().lower()
    match = DURATION.fullmatch(text) if not isinstance(value, bool) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif match is not None and (match.group(2) or not unit_required):
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    else:
        example = "30d, 12h, 90m, 45s or 2w" if unit_required else "45, 90m, 12h or 30d"
        raise ValueError(f"{text!r} is not a duration such as {example}")
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        raise ValueError(f"{text!r} must be {'longer than zero' if positive else 'zero or more'}")
    return seconds


def _as_count(name: str, value: Any) -> int:
    """A whole number of zero or more, naming the variable when it is not."""
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"MOTIONHOOK_{name} must be a whole number, got {value!r}") from None
    if count < 0:
        raise ConfigError(f"MOTIONHOOK_{name} must be zero or more, got {count}")
    return count


def _as_seconds(name: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"MOTIONHOOK_{name}: {exc}") from None


def parse_retry_schedule(value: Any) -> tuple[float, ...]:
    """Parse ``5,300,1800`` into seconds, naming the bad item when one is not a number."""
    if isinstance(value, list | tuple):
        items = [str(item) for item in value]
    else:
        items = [str(value)] if isinstance(value, int | float) else str(value).split(",")
    if [item.strip() for item in items] == [""]:
        raise ConfigError("MOTIONHOOK_RETRY_SCHEDULE is empty")
    schedule = []
    for position, item in enumerate(items, start=1):
        try:
            seconds = float(item)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(
                f"MOTIONHOOK_RETRY_SCHEDULE item {position} ({item.strip()!r}) is not a "
                "non-negative number of seconds"
            )
        schedule.append(seconds)
    return tuple(schedule)


def _instance_secret(instance: Path, name: str, value: str) -> str:
    """Return a development secret kept in ``instance/``, storing ``value`` on first use.

    The file appears complete and 0600 in one step (written under a private name,
    then hard-linked into place), so no process ever reads it half-written or
    world-readable; when two processes race, both use the one that was linked first.
    """
    path = instance / name
    if path.exists():
        return path.read_text().strip()
    instance.mkdir(parents=True, exist_ok=True)
    partial = instance / f".{name}.{secrets.token_hex(8)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value)
    try:
        os.link(partial, path)
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        partial.unlink()
    return value


def _new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Settings:
    """Typed configuration shared by the web app, the worker and the CLI."""

    env: str
    instance_path: Path
    database_url: str
    database_listen_url: str | None = field(repr=False)
    poll_interval: float
    public_url: str
    api_tokens: tuple[str, ...] = field(repr=False)
    admin_tokens: tuple[str, ...] = field(repr=False)
    max_subscriptions_per_project: int
    callback_secret: str = field(repr=False)
    callback_secret_previous: str | None = field(repr=False)
    webhook_secret: str = field(repr=False)
    modelslab_api_key: str = field(repr=False)
    modelslab_base_url: str
    storage_url: str
    s3_endpoint_url: str | None
    media_public_base_url: str | None
    allow_private_targets: bool
    destination_allowed_hosts: tuple[str, ...]
    aws_endpoint_url: str | None
    retry_schedule: tuple[float, ...]
    delivery_timeout: float
    disable_after: float
    callback_grace: float
    job_timeout: float
    queue_timeout: float
    modelslab_max_queued: int
    media_url_ttl: float
    upstream_timeout: float
    max_upload_bytes: int
    max_callbacks_per_job: int
    max_output_bytes: int
    download_deadline: float
    download_timeout: float
    delivery_threads: int
    delivery_connections_per_host: int
    task_threads: int
    task_lease: float
    delivery_lease: float
    shutdown_grace: float
    ratelimit: str
    ratelimit_storage_url: str
    log_level: str
    metrics_token: str | None = field(default=None, repr=False)
    # Production serves /metrics only with the token, or when explicitly opened.
    metrics_public: bool = False
    worker_metrics_port: int | None = None
    worker_metrics_host: str = "0.0.0.0"
    discord_application_id: str | None = None
    discord_public_key: str | None = None
    discord_bot_token: str | None = field(default=None, repr=False)
    discord_api_url: str = "https://discord.com/api/v10"
    slack_signing_secret: str | None = field(default=None, repr=False)
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_api_url: str = "https://slack.com/api"
    chat_project: str = "default"
    chat_rate_limit: str = "10/hour"
    # Workspace and guild ids allowed to use the chat apps; empty: all.
    chat_allowed: tuple[str, ...] = ()
    streams_max: int = 100
    stream_heartbeat: float = 15.0
    sentry_dsn: str | None = field(default=None, repr=False)
    sentry_environment: str | None = None
    sentry_traces_sample_rate: float = 0.0

    @property
    def production(self) -> bool:
        return self.env == PRODUCTION

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None) -> Settings:
        """The settings of this process: defaults, environment, then ``overrides``."""
        return cls.from_mapping(load_config(overrides), instance_path())

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], instance_path: Path) -> Settings:
        """Build settings from a flat mapping of ``DEFAULTS`` keys, validating production."""
        env = str(config.get("ENV") or "development").lower()
        production = env == PRODUCTION
        if production:
            missing = [
                f"MOTIONHOOK_{name}"
                for name in ("CALLBACK_SECRET", "DATABASE_URL")
                if not config.get(name)
            ]
            if not config.get("API_TOKENS") and not config.get("ADMIN_TOKENS"):
                # Tokens may all live in the database, but someone must be able to make them.
                missing.insert(1, "MOTIONHOOK_API_TOKENS (or MOTIONHOOK_ADMIN_TOKENS)")
            if missing:
                raise ConfigError("production refuses to start without " + ", ".join(missing))
            if str(config["DATABASE_URL"]).startswith("sqlite") and not _as_bool(
                config.get("ALLOW_SQLITE_IN_PRODUCTION", False)
            ):
                raise ConfigError(
                    "production refuses SQLite as MOTIONHOOK_DATABASE_URL; use PostgreSQL "
                    "or set MOTIONHOOK_ALLOW_SQLITE_IN_PRODUCTION=1"
                )
        database_url = config.get("DATABASE_URL") or f"sqlite:///{instance_path / 'motionhook.db'}"
        tokens = _as_list(config.get("API_TOKENS")) or (
            _instance_secret(instance_path, "api_token", "mh_" + secrets.token_urlsafe(32)),
        )
        allow_private = config.get("ALLOW_PRIVATE_TARGETS")
        poll_interval = _as_seconds("POLL_INTERVAL", config["POLL_INTERVAL"])
        if poll_interval <= 0:
            raise ConfigError("MOTIONHOOK_POLL_INTERVAL must be more than 0 seconds")
        schedule = parse_retry_schedule(config.get("RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE))
        return cls(
            env=env,
            instance_path=instance_path,
            database_url=str(database_url),
            database_listen_url=config.get("DATABASE_LISTEN_URL") or None,
            poll_interval=poll_interval,
            public_url=str(config["PUBLIC_URL"]).rstrip("/"),
            api_tokens=tokens,
            admin_tokens=_as_list(config.get("ADMIN_TOKENS")),
            max_subscriptions_per_project=int(config["MAX_SUBSCRIPTIONS_PER_PROJECT"]),
            callback_secret=str(
                config.get("CALLBACK_SECRET")
                or _instance_secret(instance_path, "callback_secret", secrets.token_urlsafe(32))
            ),
            callback_secret_previous=config.get("CALLBACK_SECRET_PREVIOUS") or None,
            webhook_secret=str(
                config.get("WEBHOOK_SECRET")
                or _instance_secret(instance_path, "webhook_secret", _new_webhook_secret())
            ),
            modelslab_api_key=str(config.get("MODELSLAB_API_KEY") or SIMULATOR_API_KEY),
            modelslab_base_url=str(config["MODELSLAB_BASE_URL"]).rstrip("/"),
            storage_url=str(config.get("STORAGE_URL") or f"file://{instance_path / 'media'}"),
            s3_endpoint_url=config.get("S3_ENDPOINT_URL") or None,
            media_public_base_url=config.get("MEDIA_PUBLIC_BASE_URL") or None,
            allow_private_targets=(
                not production if allow_private is None else _as_bool(allow_private)
            ),
            destination_allowed_hosts=tuple(
                host.lower() for host in _as_list(config.get("DESTINATION_ALLOWED_HOSTS"))
            ),
            aws_endpoint_url=config.get("AWS_ENDPOINT_URL") or None,
            retry_schedule=schedule,
            delivery_timeout=_as_seconds("DELIVERY_TIMEOUT", config["DELIVERY_TIMEOUT"]),
            disable_after=_as_seconds("DISABLE_AFTER", config["DISABLE_AFTER"]),
            callback_grace=_as_seconds("CALLBACK_GRACE", config["CALLBACK_GRACE"]),
            job_timeout=_as_seconds("JOB_TIMEOUT", config["JOB_TIMEOUT"]),
            queue_timeout=_as_seconds("QUEUE_TIMEOUT", config["QUEUE_TIMEOUT"]),
            modelslab_max_queued=_as_count("MODELSLAB_MAX_QUEUED", config["MODELSLAB_MAX_QUEUED"]),
            media_url_ttl=_as_seconds("MEDIA_URL_TTL", config["MEDIA_URL_TTL"]),
            upstream_timeout=_as_seconds("UPSTREAM_TIMEOUT", config["UPSTREAM_TIMEOUT"]),
            max_upload_bytes=int(config["MAX_UPLOAD_BYTES"]),
            max_callbacks_per_job=int(config["MAX_CALLBACKS_PER_JOB"]),
            max_output_bytes=int(config["MAX_OUTPUT_BYTES"]),
            download_deadline=_as_seconds("DOWNLOAD_DEADLINE", config["DOWNLOAD_DEADLINE"]),
            download_timeout=_as_seconds("DOWNLOAD_TIMEOUT", config["DOWNLOAD_TIMEOUT"]),
            delivery_threads=int(config["DELIVERY_THREADS"]),
            delivery_connections_per_host=int(config["DELIVERY_CONNECTIONS_PER_HOST"]),
            task_threads=int(config["TASK_THREADS"]),
            task_lease=_as_seconds("TASK_LEASE", config["TASK_LEASE"]),
            delivery_lease=_as_seconds(
                "DELIVERY_LEASE",
                config.get("DELIVERY_LEASE")
                or 2 * _as_seconds("DELIVERY_TIMEOUT", config["DELIVERY_TIMEOUT"]) + 10,
            ),
            shutdown_grace=_as_seconds("SHUTDOWN_GRACE", config["SHUTDOWN_GRACE"]),
            ratelimit=str(config["RATELIMIT"]),
            ratelimit_storage_url=str(config["RATELIMIT_STORAGE_URL"]),
            log_level=str(config["LOG_LEVEL"]).upper(),
            metrics_token=config.get("METRICS_TOKEN") or None,
            metrics_public=(
                not production
                if config.get("METRICS_PUBLIC") is None
                else _as_bool(config["METRICS_PUBLIC"])
            ),
            worker_metrics_port=(
                int(config["WORKER_METRICS_PORT"]) if config.get("WORKER_METRICS_PORT") else None
            ),
            worker_metrics_host=str(config.get("WORKER_METRICS_HOST") or "0.0.0.0"),
            discord_application_id=config.get("DISCORD_APPLICATION_ID") or None,
            discord_public_key=config.get("DISCORD_PUBLIC_KEY") or None,
            discord_bot_token=config.get("DISCORD_BOT_TOKEN") or None,
            discord_api_url=str(config["DISCORD_API_URL"]).rstrip("/"),
            slack_signing_secret=config.get("SLACK_SIGNING_SECRET") or None,
            slack_bot_token=config.get("SLACK_BOT_TOKEN") or None,
            slack_api_url=str(config["SLACK_API_URL"]).rstrip("/"),
            chat_project=str(config.get("CHAT_PROJECT") or "default"),
            chat_rate_limit=str(config.get("CHAT_RATE_LIMIT") or "10/hour"),
            chat_allowed=_as_list(config.get("CHAT_ALLOWED")),
            streams_max=int(config["STREAMS_MAX"]),
            stream_heartbeat=_as_seconds("STREAM_HEARTBEAT", config["STREAM_HEARTBEAT"]),
            **_sentry_settings(config),
        )


def _sentry_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``SENTRY_*`` from the mapping, else from the (unprefixed) environment."""
    values = {key: config.get(key) or os.environ.get(key) or None for key in SENTRY_KEYS}
    rate = values["SENTRY_TRACES_SAMPLE_RATE"]
    try:
        traces = float(rate) if rate is not None else 0.0
    except ValueError:
        raise ConfigError(f"SENTRY_TRACES_SAMPLE_RATE must be a number, got {rate!r}") from None
    return {
        "sentry_dsn": values["SENTRY_DSN"],
        "sentry_environment": values["SENTRY_ENVIRONMENT"],
        "sentry_traces_sample_rate": traces,
    }
