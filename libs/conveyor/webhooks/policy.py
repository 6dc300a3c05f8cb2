"""Where a webhook may go: the destination policy that keeps notify from being an SSRF proxy.

A callback URL comes from whoever submitted the task, so notify treats it as hostile (the OWASP
SSRF guidance): only `http`/`https`; the host is resolved here, every address it resolves to is
checked, and the connection is made to a checked address only (`Destination.addresses`), never
to a name resolved again later, so a DNS answer that changes between check and connect (DNS
rebinding) cannot steer it. Refused by default: loopback, private (RFC 1918), link-local (the
cloud metadata address 169.254.169.254 among them), shared/CGNAT (100.64.0.0/10), multicast,
broadcast, unspecified, reserved and documentation ranges, IPv6 unique-local, link-local and
site-local, and every IPv6 form that embeds an IPv4 address (mapped, compatible, NAT64, 6to4,
Teredo) is judged by the IPv4 address inside. Odd spellings (`127.1`, `2130706434`,
`0x7f000003`, `[::ffff:127.0.0.2]`) resolve to the address they mean, and that is what is judged.

Deployments that call internal receivers list them in an allowlist: networks (`10.1.0.0/16`,
`127.0.0.1/32`) and host names (`hooks.internal`, or `*.svc.cluster.local` for a domain and its
subdomains). An address inside an allowed network, or any address of an allowed host, passes.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from conveyor.errors import PermanentError, RetryableError

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]
# Longer URLs are refused: no receiver needs one, and they end up in timelines and spans.
MAX_URL_CHARS = 2048

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# Ranges refused by default, with the reason a refusal names. Order matters only for naming.
_REFUSED: tuple[tuple[Network, str], ...] = (
    (_V4("0.0.0.0/8"), "unspecified"),
    (_V4("127.0.0.0/8"), "loopback"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("169.254.0.0/16"), "link-local (cloud metadata)"),
    (_V4("100.64.0.0/10"), "shared address space (CGNAT)"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
    (_V4("192.0.0.0/24"), "IETF protocol assignments"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V6("::/128"), "unspecified"),
    (_V6("::1/128"), "loopback"),
    (_V6("fc00::/7"), "unique-local"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "site-local"),
    (_V6("ff00::/8"), "multicast"),
    (_V6("2001::/32"), "Teredo"),
    (_V6("::/96"), "IPv4-compatible"),
    (_V6("100::/64"), "discard-only"),
)
_NAT64 = _V6("64:ff9b::/96")


class DestinationRefusedError(PermanentError):
    """The callback URL is not a destination the policy allows: no retry changes that."""


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked callback URL: where to connect (addresses) and what to ask for (host, target)."""

    scheme: str
    host: str  # as the URL names it (IDNA ASCII, no brackets): Host header and TLS SNI
    port: int
    target: str  # path and query, the request line's target
    addresses: tuple[str, ...]  # checked addresses, tried in order
    userinfo: str | None = None

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def redact(url: str) -> str:
    """`url` without userinfo, query or fragment: what logs, spans and errors may show."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for a TCP connection (the OS resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class DestinationPolicy:
    """Checks callback URLs against the default refusals and the deployment's allowlist."""

    def __init__(self, allow: Iterable[str] = (), *, resolver: Resolver = system_resolver) -> None:
        networks: list[Network] = []
        hosts: list[str] = []
        for entry in (e.strip() for e in allow):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.append(_host_pattern(entry))
        self.networks = tuple(networks)
        self.hosts = tuple(hosts)
        self.resolver = resolver

    def check(self, url: str) -> Destination:
        """The checked destination of `url`; raise `DestinationRefusedError` (permanent) or
        `RetryableError` when the name does not resolve now."""
        scheme, host, port, target, userinfo = _parse(url)
        try:
            resolved = self.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise RetryableError(f"webhook host {host} did not resolve: {exc}") from exc
        if not resolved:
            raise RetryableError(f"webhook host {host} resolved to no address")
        allowed_host = self._host_allowed(host)
        passed: list[str] = []
        refusals: list[str] = []
        for text in resolved:
            address = _effective(ipaddress.ip_address(text.split("%", 1)[0]))
            reason = None if allowed_host else self.refusal(address)
            if reason is None:
                passed.append(str(address))
            else:
                refusals.append(f"{address} is {reason}")
        if not passed:
            raise DestinationRefusedError(
                f"webhook destination {redact(url)} refused: {refusals[0]} "
                "(allow it with CONVEYOR_WEBHOOK_ALLOW)"
            )
        # Only checked addresses are connected to, so a mixed answer (one public, one internal
        # address) cannot reach the internal one.
        return Destination(scheme, host, port, target, tuple(dict.fromkeys(passed)), userinfo)

    def refusal(self, address: IP) -> str | None:
        """Why `address` is refused (a short category), or None if it may be called."""
        if any(address in net for net in self.networks if net.version == address.version):
            return None
        for net, reason in _REFUSED:
            if net.version == address.version and address in net:
                return reason
        if not address.is_global:
            return "not globally routable"
        return None

    def _host_allowed(self, host: str) -> bool:
        for pattern in self.hosts:
            if pattern.startswith("*."):
                if host == pattern[2:] or host.endswith(pattern[1:]):
                    return True
            elif host == pattern:
                return True
        return False


def _host_pattern(entry: str) -> str:
    pattern = entry.lower().rstrip(".")
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name or "/" in name or ":" in name or " " in name:
        raise ValueError(f"webhook allowlist entry {entry!r} is neither a network nor a host name")
    return pattern


def _parse(url: str) -> tuple[str, str, int, str, str | None]:
    if len(url) > MAX_URL_CHARS:
        raise DestinationRefusedError(f"webhook URL is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DestinationRefusedError(f"webhook URL {redact(url)} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DestinationRefusedError(f"webhook URL scheme {scheme!r} refused: http or https only")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise DestinationRefusedError(f"webhook URL {redact(url)} has no host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host.lower()
    except UnicodeError:
        host = " "  # refused just below
    if any(c in host for c in " \t\r\n\\"):
        raise DestinationRefusedError(f"webhook host of {redact(url)} is not a valid name")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    userinfo = parts.netloc.rpartition("@")[0] or None
    return scheme, host, port or (443 if scheme == "https" else 80), target, userinfo


def _effective(address: IP) -> IP:
    """The IPv4 address an IPv6 form embeds (mapped, NAT64, 6to4), else `address` itself.

    Such a form reaches that IPv4 host, so it is judged, and connected to, as that host.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def literal_resolver(host: str, port: int) -> list[str]:
    """Addresses of `host` without asking DNS: an address literal in any spelling the OS accepts
    (`127.1`, `2130706434`), and `localhost` / `*.localhost` (always loopback, RFC 6761); any
    other name raises `socket.gaierror` (an OSError), so the policy leaves it undecided."""
    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1", "::1"]
    flags = socket.AI_NUMERICHOST
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def edge_refusal(url: str, allow: Iterable[str] = ()) -> str | None:
    """Why the gateway refuses `url` at submit time, or None.

    The edge judges what needs no DNS: the URL's form and scheme, address literals and
    `localhost`. A host name is left to notify, which resolves it when it sends and connects
    to the checked addresses only (a name's answer at submit time proves nothing later, and
    resolving there would make a slow resolver slow down every POST).
    """
    try:
        DestinationPolicy(allow, resolver=literal_resolver).check(url)
    except DestinationRefusedError as exc:
        return str(exc)
    except RetryableError:
        return None  # a name: notify judges its addresses when it delivers
    return None


def parse_allow(value: object) -> object:
    """The `webhook_allow` setting's entries from a JSON list or a comma/space separated string,
    checked (a bad entry fails at start, not at the first webhook); anything else as is."""
    if isinstance(value, str) and value.strip().startswith("["):
        value = json.loads(value)
    if isinstance(value, (str, list, tuple)):
        entries = allow_entries(value)
        DestinationPolicy(entries)
        return entries
    return value


def allow_entries(raw: str | Sequence[str]) -> list[str]:
    """The allowlist from its setting: a JSON list, or a comma/space separated string."""
    if isinstance(raw, str):
        return [e for e in raw.replace(",", " ").split() if e]
    return [e.strip() for e in raw if e.strip()]
