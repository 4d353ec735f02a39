"""Destination URLs of the event-driven subscription kinds, parsed and masked.

A destination URL says where a broker lives and where on it events go:

- ``amqp[s]://user:pass@host:5672/vhost?exchange=NAME&routing_key=KEY``
- ``nats://[user:pass@|token@]host:4222/SUBJECT`` (``tls://`` for TLS)
- ``redis[s]://[user:pass@]host:6379/0?stream=NAME&maxlen=N``
- ``sqs``: the queue URL, ``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME[.fifo]``
- ``eventbridge://BUS?region=R``

:func:`parse_destination` is pure (no I/O) and raises ``ValueError`` with a message
a client can act on; :func:`mask_destination_url` is the URL as responses show it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

BROKER_KINDS = ("amqp", "nats", "redis", "sqs", "eventbridge")
MASK = "***"

SCHEMES = {
    "amqp": ("amqp", "amqps"),
    "nats": ("nats", "tls"),
    "redis": ("redis", "rediss"),
    "sqs": ("https", "http"),
    "eventbridge": ("eventbridge",),
}
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "nats": 4222, "tls": 4222, "redis": 6379}
DEFAULT_PORTS["rediss"] = 6379
TLS_SCHEMES = frozenset({"amqps", "tls", "rediss"})
QUERY_PARAMETERS = {
    "amqp": ("exchange", "routing_key"),
    "nats": (),
    "redis": ("stream", "maxlen"),
    "sqs": ("region",),
    "eventbridge": ("region",),
}

# NATS subjects: dot-separated tokens, no wildcards (a publish names one subject).
_SUBJECT = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+)*$")
_AMQP_NAME = re.compile(r"^[A-Za-z0-9_.:-]{0,255}$")
_BUS = re.compile(r"^[A-Za-z0-9._/-]{1,256}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_SQS_HOST = re.compile(
    r"^(?:sqs\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?|([a-z0-9-]+)\.queue\.amazonaws\.com)$"
)
_QUEUE_PATH = re.compile(r"^/(\d{12})/([A-Za-z0-9_-]{1,80}(?:\.fifo)?)$")


@dataclass(frozen=True)
class Destination:
    """One parsed destination URL; ``password`` (or a NATS token) is the only secret."""

    kind: str
    scheme: str
    host: str = ""
    port: int = 0
    username: str | None = None
    password: str | None = None
    # amqp: virtual host; nats: subject; redis: database; sqs: queue URL; eventbridge: bus.
    path: str = ""
    exchange: str = ""
    routing_key: str | None = None
    stream: str = ""
    maxlen: int | None = None
    region: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme in TLS_SCHEMES

    @property
    def fifo(self) -> bool:
        return self.kind == "sqs" and self.path.endswith(".fifo")

    @property
    def origin(self) -> str:
        """``scheme://host:port`` (or the bus / queue name): what errors may name."""
        if self.kind == "eventbridge":
            return f"eventbridge bus {self.path}"
        if self.kind == "sqs":
            return f"queue {self.path.rsplit('/', 1)[-1]}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _single(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ValueError(f"url: query parameter {name} is given more than once")
    return values[0]


def parse_destination(kind: str, url: str) -> Destination:
    """Parse ``url`` for a subscription of ``kind``; ValueError names what is wrong."""
    if kind not in BROKER_KINDS:
        raise ValueError(f"kind {kind!r} is not a broker destination")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ValueError("url is not a valid URL (check the host and port)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES[kind]:
        raise ValueError(
            f"a {kind} url must start with " + " or ".join(f"{s}://" for s in SCHEMES[kind])
        )
    if parts.fragment:
        raise ValueError("url must not have a #fragment")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - set(QUERY_PARAMETERS[kind]))
    if unknown:
        allowed = ", ".join(QUERY_PARAMETERS[kind]) or "none"
        raise ValueError(f"url has unknown query parameter {unknown[0]} (allowed: {allowed})")
    host = parts.hostname or ""
    if not host:
        raise ValueError(f"a {kind} url must name a host")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password == MASK or username == MASK:
        raise ValueError(f"url holds the masked credential {MASK}; send the real one")
    base = Destination(
        kind=kind,
        scheme=scheme,
        host=host,
        port=port or DEFAULT_PORTS.get(scheme, 0),
        username=username,
        password=password,
    )
    if kind == "amqp":
        return _amqp(base, parts.path, query)
    if kind == "nats":
        return _nats(base, parts.path)
    if kind == "redis":
        return _redis(base, parts.path, query)
    if kind == "sqs":
        return _sqs(base, url.strip(), parts.path, query)
    return _eventbridge(base, parts.netloc + parts.path, query)


def _replace(base: Destination, **values: object) -> Destination:
    fields = {**base.__dict__, **values}
    return Destination(**fields)  # type: ignore[arg-type]


def _amqp(base: Destination, path: str, query: dict[str, list[str]]) -> Destination:
    exchange = _single(query, "exchange")
    if exchange is None:
        raise ValueError("an amqp url needs ?exchange=NAME (empty for the default exchange)")
    if not _AMQP_NAME.match(exchange):
        raise ValueError("url: exchange must be at most 255 letters, digits, or - _ . :")
    routing_key = _single(query, "routing_key")
    if routing_key is not None and len(routing_key.encode()) > 255:
        raise ValueError("url: routing_key must be at most 255 bytes")
    if not exchange and not routing_key:
        raise ValueError("url: the default exchange needs routing_key=QUEUE")
    vhost = unquote(path[1:]) if path not in ("", "/") else "/"
    return _replace(base, path=vhost, exchange=exchange, routing_key=routing_key or None)


def _nats(base: Destination, path: str) -> Destination:
    subject = unquote(path[1:]) if path else ""
    if not _SUBJECT.match(subject):
        raise ValueError(
            "a nats url needs a subject as its path (nats://host:4222/SUBJECT), "
            "dot-separated, without spaces or wildcards"
        )
    return _replace(base, path=subject)


def _redis(base: Destination, path: str, query: dict[str, list[str]]) -> Destination:
    database = path[1:] if path else ""
    if database and not database.isdigit():
        raise ValueError("url: the redis database (the path) must be a number")
    stream = _single(query, "stream")
    if not stream:
        raise ValueError("a redis url needs ?stream=NAME")
    if len(stream) > 1024:
        raise ValueError("url: stream must be at most 1024 characters")
    raw = _single(query, "maxlen")
    maxlen = None
    if raw is not None:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError("url: maxlen must be a positive whole number")
        maxlen = int(raw)
    return _replace(base, path=database or "0", stream=stream, maxlen=maxlen)


def _region(query: dict[str, list[str]], found: str | None = None) -> str | None:
    region = _single(query, "region") or found
    if region is not None and not _REGION.match(region):
        raise ValueError("url: region must look like us-east-1")
    return region


def _sqs(base: Destination, url: str, path: str, query: dict[str, list[str]]) -> Destination:
    if base.username or base.password:
        raise ValueError("an sqs queue url carries no credentials (boto3's chain provides them)")
    if not _QUEUE_PATH.match(path):
        raise ValueError(
            "an sqs url is the queue URL: https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
        )
    host = _SQS_HOST.match(base.host)
    region = _region(query, (host.group(1) or host.group(2)) if host else None)
    queue_url = urlunsplit((base.scheme, urlsplit(url).netloc, path, "", ""))
    return _replace(base, path=queue_url, region=region)


def _eventbridge(base: Destination, bus: str, query: dict[str, list[str]]) -> Destination:
    if base.username or base.password or base.port:
        raise ValueError("an eventbridge url is eventbridge://BUS?region=R")
    if not _BUS.match(bus):
        raise ValueError("url: the event bus name may hold letters, digits and . _ - /")
    return _replace(base, host="", path=bus, region=_region(query))


def mask_destination_url(kind: str, url: str) -> str:
    """``url`` with its password (or NATS token) shown as ``***``; other URLs unchanged."""
    if kind not in BROKER_KINDS:
        return url
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return MASK
    if user is None and password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    if password is not None:
        userinfo = f"{quote(unquote(user or ''), safe='')}:{MASK}"
    elif kind == "nats":
        userinfo = MASK  # nats://TOKEN@host: the user part is the token
    else:
        return url
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, ""))
