"""SSRF-safe outbound HTTP: target URL validation and the one pooled session per process.

Two layers guard every outbound request (subscriptions, per-job webhooks and
downloads of upstream outputs):

1. :func:`validate_target_url` runs when a URL is accepted (API validation): http(s)
   only, and every address the host resolves to must be public.
2. :func:`make_session` returns a ``requests`` session built on ``requests-hardened``:
   at connect time the host is resolved once, the resolved address is checked and
   the connection is pinned to it, so a DNS answer that changes between validation
   and delivery (DNS rebinding) cannot reach a private address. Redirects are never
   followed and every request has a timeout.

A refusal at connect time raises :class:`TargetRefused` from ``session.request``.
``TargetRefused`` is a ``ValueError`` and also a ``requests.RequestException``
(through ``requests.exceptions.InvalidURL``), so code that catches either sees it.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests_hardened import Config, HTTPSession
from requests_hardened.ip_filter import EXTRA_BLOCKED_NET_RANGES, InvalidIPAddress
from requests_hardened.ip_filter_adapter import IPFilterAdapter

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = frozenset({"http", "https"})
MAX_URL_LENGTH = 2048
# (connect, read) seconds, used when a caller passes no timeout.
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)
DEFAULT_USER_AGENT = "motionhook/0.1"

CLOUD_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, DigitalOcean, ...
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("168.63.129.16"),  # Azure WireServer (a public-range address)
    }
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT


class TargetRefused(requests.exceptions.InvalidURL):
    """An outbound URL is not allowed; the message says why in user-facing words.

    It is a ``ValueError`` (validation) and a ``requests.RequestException``
    (raised from ``session.request`` when the connect-time filter refuses a host).
    Messages never contain the URL itself, so they cannot leak tokens.
    """


def address_category(address: IPAddress) -> str | None:
    """Return why an address must not be contacted ("loopback", ...), or None if public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 6:
        # Drop any zone (fe80::1%eth0) so set and network membership work.
        address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
    if address in CLOUD_METADATA_ADDRESSES:
        return "cloud metadata"
    checks: tuple[tuple[bool, str], ...] = (
        (address.is_loopback, "loopback"),
        (address.is_unspecified, "unspecified"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address in SHARED_ADDRESS_SPACE, "shared"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (any(address in net for net in EXTRA_BLOCKED_NET_RANGES), "reserved"),
        (not address.is_global, "non-public"),
    )
    for blocked, category in checks:
        if blocked:
            return category
    return None


def _refusal(address: IPAddress) -> TargetRefused | None:
    """Return the exception refusing ``address``, or None when it is public."""
    category = address_category(address)
    if category is None:
        return None
    article = "an" if category[0] in "aeiou" else "a"
    return TargetRefused(f"url resolves to {article} {category} address ({address})")


def validate_target_url(url: str, *, allow_private: bool) -> None:
    """Raise TargetRefused unless ``url`` is an http(s) URL whose host resolves to public IPs.

    With ``allow_private`` (development and tests) only the shape of the URL is
    checked and no DNS lookup is made.
    """
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"url must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise TargetRefused("url is not a valid URL") from None
    try:
        port = parts.port
    except ValueError:
        raise TargetRefused("url has an invalid port") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise TargetRefused("url must use http or https")
    host = parts.hostname
    if not host:
        raise TargetRefused("url must include a host")
    if allow_private:
        return
    if port is None:
        port = 443 if parts.scheme.lower() == "https" else 80
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise TargetRefused("url host does not resolve") from None
    if not infos:
        raise TargetRefused("url host does not resolve")
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]))
        except ValueError:
            raise TargetRefused("url host resolves to an unsupported address") from None
        refusal = _refusal(address)
        if refusal is not None:
            raise refusal


class _GuardedAdapter(IPFilterAdapter):  # type: ignore[misc]
    """requests-hardened's pinning IP filter with a pool size and motionhook's address rules."""

    def __init__(self, *, is_https: bool, hosts: int, per_host: int) -> None:
        super().__init__(is_https_proto=is_https, allow_loopback=False)
        self.init_poolmanager(hosts, per_host, block=True)

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Resolve, check and pin the host, raising TargetRefused for forbidden addresses."""
        try:
            host_params, pool_kwargs = super().build_connection_pool_key_attributes(
                request, verify, cert
            )
        except InvalidIPAddress as exc:
            address = ipaddress.ip_address(str(exc.args[0]))
            refusal = _refusal(address) or TargetRefused(
                f"url resolves to a private address ({address})"
            )
            refusal.request = request
            raise refusal from None
        # requests-hardened's filter is narrower than ours (e.g. 192.0.0.8 on older
        # Pythons); apply the same rule as validate_target_url to the pinned address.
        pinned = ipaddress.ip_address(str(host_params["host"]).strip("[]"))
        late_refusal = _refusal(pinned)
        if late_refusal is not None:
            late_refusal.request = request
            raise late_refusal
        return host_params, pool_kwargs

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: dict[str, str] | None = None,
        cert: str | tuple[str, str] | None = None,
    ) -> Any:
        """Return the pinned connection pool, re-raising TargetRefused unwrapped."""
        try:
            return super().get_connection_with_tls_context(
                request, verify, proxies=proxies, cert=cert
            )
        except requests.exceptions.InvalidURL as exc:
            # requests wraps any ValueError from the pool key in InvalidURL(exc).
            if exc.args and isinstance(exc.args[0], TargetRefused):
                raise exc.args[0] from None
            raise


def make_session(
    *,
    allow_private: bool,
    per_host: int = 16,
    hosts: int = 64,
    user_agent: str = DEFAULT_USER_AGENT,
    default_timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> requests.Session:
    """Return a pooled session that never follows redirects and refuses private targets.

    At most ``per_host`` connections are open to one host at a time: a thread that
    finds them all busy waits for one (``pool_block``) rather than opening more, so
    a burst of deliveries to one receiver never becomes dozens of simultaneous
    connections. Pools of up to ``hosts`` hosts are kept.

    Connect-time refusals raise :class:`TargetRefused`. Environment proxies and
    ``.netrc`` are ignored (``trust_env = False``): a proxy would connect on our
    behalf and bypass the address filter.
    """
    config = Config(
        ip_filter_enable=not allow_private,
        ip_filter_allow_loopback_ips=False,
        never_redirect=True,
        default_timeout=default_timeout,
    )
    session: requests.Session = HTTPSession(config)
    session.trust_env = False
    session.headers["User-Agent"] = user_agent
    for prefix, is_https in (("http://", False), ("https://", True)):
        adapter: HTTPAdapter
        if allow_private:
            adapter = HTTPAdapter(pool_connections=hosts, pool_maxsize=per_host, pool_block=True)
        else:
            adapter = _GuardedAdapter(is_https=is_https, hosts=hosts, per_host=per_host)
        session.mount(prefix, adapter)
    return session
