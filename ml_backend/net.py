"""SSRF-safe HTTP for images: `UrlGuard` decides whether a URL may be fetched (the labeling tool's host, hosts in
PRELABEL_ALLOWED_HOSTS, or a public address the tool redirected to, e.g. a cloud presign), resolving the host and
classifying its addresses before connecting and again at every redirect hop; `PinnedBackend` then connects only to
the addresses that were checked (no DNS rebinding in between). `redact` keeps secrets out of logs and messages."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpcore
import httpx

from .errors import ImageBlockedError

NEVER_THE_TOOL = ("link-local", "multicast", "unspecified")  # cloud metadata lives at link-local addresses
SECRET_PARAMS = ("sig", "signature", "token", "key", "credential", "password", "secret", "auth", "session")


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, lower-case host, port) of a URL; the default port for http(s)."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def redact(url: str) -> str:
    """A URL safe for logs and error bodies: no userinfo, values of signature/token-like query parameters masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.scheme not in ("http", "https"):
        return url
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode(
        [(k, "***" if any(s in k.lower() for s in SECRET_PARAMS) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="/*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class _RedactUrls(logging.Filter):
    """httpx logs every request's URL at INFO: presigned signatures and userinfo must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactUrls())

Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address the host resolves to (the connection may go to any of them)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def address_kind(address: str) -> str | None:
    """None for a public (global) address, else what it is: loopback, link-local, private, ..."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for attr in ("unspecified", "loopback", "link_local", "private", "multicast", "reserved"):
        if getattr(ip, f"is_{attr}"):
            return attr.replace("_", "-")
    return None if ip.is_global else "non-public"


class UrlGuard:
    """Decides whether a URL may be fetched, by host name and by the classes of the addresses it resolves to.

    Allowed: the labeling tool's origin (`set_tool`; or the same port on the same addresses); hosts in `allowed`
    (exact names, `*.suffix`, IPs, CIDRs); with `*` in `allowed`, any host whose addresses are all public; a hop that
    a response of the tool redirected to (e.g. a cloud presign), when its addresses are all public. `tool` names the
    tool in messages."""

    def __init__(self, allowed: list[str], resolver: Resolver = resolve, tool: str = "Label Studio"):
        self.tool = tool
        self.resolver = resolver
        self.any_public = "*" in allowed
        self.names: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (a.strip().lower() for a in allowed if a.strip() != "*"):
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                if entry.startswith("*."):
                    self.suffixes.append(entry[1:])
                else:
                    self.names.add(entry)
        self.tool_origin: tuple[str, str, int | None] | None = None
        self._tool_addresses: frozenset[str] | None = None
        self._pins: dict[tuple[str, int], list[str]] = {}  # (host, port) -> the addresses a check accepted

    def pinned(self, host: str, port: int) -> list[str]:
        """The addresses last checked for `host`: connections go there, never to a fresh DNS answer."""
        return self._pins.get((host.lower(), port), [])

    def set_tool(self, url: str | None) -> None:
        self.tool_origin = origin(url) if url else None
        self._tool_addresses = None

    def is_tool(self, url: str) -> bool:
        return self.tool_origin is not None and origin(url) == self.tool_origin

    def _tool_address_set(self) -> frozenset[str]:
        """The tool's addresses, resolved once."""
        if self._tool_addresses is None and self.tool_origin:
            scheme, host, port = self.tool_origin
            port = port or (443 if scheme == "https" else 80)
            try:
                self._tool_addresses = frozenset(self.resolver(host, port))
            except OSError:
                return frozenset()
            self._pins[(host, port)] = sorted(self._tool_addresses)
        return self._tool_addresses or frozenset()

    def _explicitly_allowed(self, host: str, addresses) -> bool:
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
        return bool(ips and self.networks) and all(any(ip in n for n in self.networks if ip.version == n.version) for ip in ips)

    def refusal(self, url: str, redirected_by_tool: bool = False) -> str | None:
        """Why `url` must not be fetched, or None when it may."""
        parts = urlsplit(url)
        scheme, host, port = origin(url)
        if scheme not in ("http", "https") or not host:
            return f"only http(s) URLs with a host are fetched, not {scheme or 'no scheme'!r}"
        if self.is_tool(url):
            # a tool address given by an unauthenticated request must not reach cloud metadata endpoints
            odd = [(a, k) for a in self._tool_address_set() if (k := address_kind(a)) in NEVER_THE_TOOL]
            if odd and not self._explicitly_allowed(host, self._tool_address_set()):
                return f"the {self.tool} host {host} resolves to {odd[0][0]}, a {odd[0][1]} address"
            return None
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return None
        port = port or (443 if scheme == "https" else 80)
        try:
            addresses = self.resolver(host, port)
        except OSError as exc:
            return f"host {host} does not resolve ({exc})"
        if not addresses:
            return f"host {host} does not resolve"
        self._pins[(host, port)] = list(addresses)  # only used when this check lets the URL through
        if self._explicitly_allowed(host, addresses):
            return None
        tool_machine = set(map(_same_machine, self._tool_address_set()))
        if self.tool_origin and port == self.tool_origin[2] and set(map(_same_machine, addresses)) <= tool_machine:
            return None  # the tool under another name (localhost for 127.0.0.1)
        kinds = [(a, address_kind(a)) for a in addresses]
        private = [(a, k) for a, k in kinds if k]
        if private:
            address, kind = private[0]
            return f"{host} resolves to {address}, a {kind} address that is not {self.tool}'s"
        if self.any_public or redirected_by_tool:
            return None
        where = f"the {self.tool} host ({self.tool_origin[1]})" if self.tool_origin else f"the {self.tool} host"
        return f"{parts.hostname} is neither {where} nor in PRELABEL_ALLOWED_HOSTS"

    def check(self, url: str, source: str, redirect: bool = False, redirected_by_tool: bool = False) -> None:
        """Raises ImageBlockedError naming the URL and the reason."""
        reason = self.refusal(url, redirected_by_tool)
        if reason:
            hop = ", a redirect" if redirect else ""
            raise ImageBlockedError(
                f"image {redact(source)} ({redact(url)}{hop}) could not be fetched: refused, {reason}; images are "
                f"fetched only from the {self.tool} host, PRELABEL_ALLOWED_HOSTS and cloud presign redirects"
            )


class PinnedBackend(httpcore.SyncBackend):
    """Opens TCP connections to the addresses the guard checked for the host (no second DNS lookup, so no DNS
    rebinding between the check and the connection); TLS still verifies the certificate for the host name."""

    def __init__(self, guard: UrlGuard):
        self.guard = guard

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = self.guard.pinned(host, port) or [host]  # hosts allowed by name are not resolved by the guard
        error: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error


def _same_machine(address: str) -> str:
    """Loopback addresses all name this machine."""
    return "loopback" if address_kind(address) == "loopback" else address.split("%", 1)[0]
