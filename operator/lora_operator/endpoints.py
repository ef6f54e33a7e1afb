"""Which S3 endpoints jobs may name (pure): spec.storage.endpoint + the operator's allow-list →
allowed, or the reason it is not.

The operator reads each running job's progress.json from the job's endpoint with the job's
Secret, from inside the cluster network; without a check, anyone who may create a job could make
it send requests to internal addresses (a cloud metadata service, the API server). So a job whose
endpoint is refused fails with reason EndpointNotAllowed before any pod is created, and the
operator never sends it a request.

Allow-list entries (`--allowed-endpoints`, LORA_OPERATOR_ALLOWED_ENDPOINTS, chart value
config.allowedEndpoints), each a host pattern with an optional port (`:9000`, `:*` = any):
  `*`                     any host (the default)
  `*.example.com`         any name under example.com (never an IP address)
  `minio.minio.svc:9000`  one host name (case-insensitive, a trailing dot ignored)
  `10.0.0.7`, `[fd00::7]` one IP address
  `10.0.0.0/8`, `[fd00::/8]:9000`   an IP network

Some addresses are refused unless an entry names them specifically: loopback (127.0.0.0/8, ::1,
`localhost`), link-local and cloud metadata (169.254.0.0/16, fe80::/10, fd00:ec2::254,
100.100.100.200, `metadata.google.internal`, ...), the unspecified address (0.0.0.0), and the API
server (`kubernetes.default.svc`, and the address the operator itself talks to). A wildcard never
admits them; an entry with that very address does (`127.0.0.1` for a dev cluster's S3), or a
network inside the refused range (`127.0.0.0/8`); the API server only with its exact port.

Host names are judged as written: nothing is resolved here. A name that resolves to an internal
address (or changes its answer: DNS rebinding) is out of scope of this check; where that matters,
list the stores by name instead of `*` and restrict the operator's egress with a NetworkPolicy.
IP addresses are read the way the system resolver reads them (`2130706433`, `0x7f.1` and
`::ffff:169.254.169.254` are what they point at), so spelling an address differently does not
get past the check.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

ENDPOINT_NOT_ALLOWED = "EndpointNotAllowed"
DEFAULT_ALLOWED = ("*",)
FIELD = "spec.storage.endpoint"
SETTING = "--allowed-endpoints / LORA_OPERATOR_ALLOWED_ENDPOINTS / chart value config.allowedEndpoints"

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses a wildcard never admits: (network, what it is).
REFUSED_NETWORKS: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), what) for net, what in (
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "the EC2 metadata service"),
        ("100.100.100.200/32", "the Alibaba Cloud metadata service"),
        ("0.0.0.0/8", "unspecified (it reaches the operator's own host)"),
        ("::/128", "unspecified (it reaches the operator's own host)"),
    )
)
REFUSED_NAMES = {
    "localhost": "loopback",
    "metadata": "a cloud metadata service",
    "metadata.google.internal": "the GCE metadata service",
    "metadata.goog": "the GCE metadata service",
    "instance-data": "the EC2 metadata service",
    "instance-data.ec2.internal": "the EC2 metadata service",
}
API_SERVER = "the Kubernetes API server"
API_SERVER_NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc")
_LEGACY_IPV4 = re.compile(r"[0-9a-fx.]+")  # what inet_aton (and so getaddrinfo) reads as IPv4
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PORT = re.compile(r"(?P<host>.*?)(?::(?P<port>\d{1,5}|\*))?")


class RuleError(ValueError):
    """An allow-list entry that cannot be read; the message names it and shows the forms."""


@dataclass(frozen=True)
class Rule:
    """One allow-list entry: a host pattern and a port (None: any)."""

    text: str
    port: int | None
    any_host: bool = False
    suffix: str = ""  # `*.example.com` → ".example.com"
    name: str = ""
    network: Network | None = None  # an address is a /32 or /128 network

    def admits_port(self, port: int) -> bool:
        return self.port is None or self.port == port


@dataclass(frozen=True)
class Endpoint:
    """Where a request to the endpoint goes: host name or address, and port."""

    host: str
    ip: IP | None
    port: int


def _canonical_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def parse_ip(host: str) -> IP | None:
    """The address a literal host names, as the resolver reads it (no DNS); None for a name."""
    host = host.split("%", 1)[0]  # an IPv6 zone id
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _LEGACY_IPV4.fullmatch(host):
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))  # 2130706433, 0x7f.1, 010.0.0.1
        except OSError:
            return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:  # an IPv6-only cluster's gateway forwards it to the embedded IPv4 address
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


@lru_cache(maxsize=1024)
def parse_rule(text: str) -> Rule:
    """One allow-list entry; RuleError says what is wrong and the forms that work."""
    raw = text.strip()
    forms = "write *, *.example.com, host, host:9000, 10.0.0.7, [fd00::7]:9000 or 10.0.0.0/8"
    if not raw or any(c.isspace() for c in raw) or "://" in raw or "@" in raw:
        raise RuleError(f"allowed endpoint {text!r} is not a host pattern: {forms}")
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not sep or (rest and port_text is None):
            raise RuleError(f"allowed endpoint {text!r}: unclosed [ or text after ]: {forms}")
    elif raw.count(":") > 1:  # a bare IPv6 address or network: no port
        host, port_text = raw, None
    else:
        m = _PORT.fullmatch(raw)
        assert m is not None
        host, port_text = m.group("host"), m.group("port")
        if ":" in host:
            raise RuleError(f"allowed endpoint {text!r}: the port must be a number or *: {forms}")
    port: int | None = None
    if port_text not in (None, "*"):
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RuleError(f"allowed endpoint {text!r}: port {port_text!r} is not in 1-65535: {forms}")
        port = int(port_text)
    host = _canonical_name(host) if host.strip() != "*." else "*.?"
    if host == "*":
        return Rule(raw, port, any_host=True)
    if host.startswith("*."):
        suffix = host[1:]
        if "*" in suffix or "?" in suffix or len(suffix) < 2:
            raise RuleError(f"allowed endpoint {text!r}: only a leading *. is a wildcard: {forms}")
        return Rule(raw, port, suffix=suffix)
    if "*" in host or not host:
        raise RuleError(f"allowed endpoint {text!r}: only a leading *. is a wildcard: {forms}")
    if "/" in host:
        try:
            return Rule(raw, port, network=ipaddress.ip_network(host, strict=False))
        except ValueError:
            raise RuleError(f"allowed endpoint {text!r}: {host!r} is not an IP network: {forms}") from None
    ip = parse_ip(host)
    if ip is not None:
        return Rule(raw, port, network=ipaddress.ip_network(ip))
    return Rule(raw, port, name=host)


def parse_endpoint(endpoint: str | None, region: str | None = None) -> Endpoint | str:
    """Where requests to the endpoint go, or why it cannot be read. Unset means AWS S3 in the region."""
    if not endpoint:
        return Endpoint(f"s3.{_canonical_name(region or '') or 'us-east-1'}.amazonaws.com", None, 443)
    if any(ord(c) <= 32 or ord(c) >= 127 for c in endpoint):
        return "it has spaces or non-ASCII characters; write it as http://host:port"
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        return f"it is not a URL ({exc}); write it as http://host:port"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "it is not an http:// or https:// URL with a host; write it as http://host:port"
    if "@" in parts.netloc:
        return "it carries user information (user@); put the keys in the Secret, not the URL"
    host = _canonical_name(parts.hostname)
    return Endpoint(host, parse_ip(host), port or (443 if parts.scheme == "https" else 80))


def _api_server(endpoint: Endpoint, api_servers: Sequence[str]) -> bool:
    """Whether the endpoint is the API server: the well-known service names, or a given URL/host:port."""
    if endpoint.host in API_SERVER_NAMES or endpoint.host.startswith("kubernetes.default.svc."):
        return True
    for server in api_servers:
        parsed = parse_endpoint(server if "://" in server else f"https://{server}")
        if isinstance(parsed, Endpoint) and parsed.port == endpoint.port and (
            parsed.host == endpoint.host or (parsed.ip is not None and parsed.ip == endpoint.ip)
        ):
            return True
    return False


def sensitive(endpoint: Endpoint, api_servers: Sequence[str] = ()) -> tuple[str, Network | None] | None:
    """What makes an endpoint one a wildcard never admits: (what it is, its refused network), or None."""
    if _api_server(endpoint, api_servers):
        return API_SERVER, None
    if endpoint.ip is not None:
        for network, what in REFUSED_NETWORKS:
            if endpoint.ip.version == network.version and endpoint.ip in network:
                return what, network
        return None
    if endpoint.host.endswith(".localhost"):
        return "loopback", None
    what = REFUSED_NAMES.get(endpoint.host)
    return (what, None) if what else None


def _admits(rule: Rule, endpoint: Endpoint, refused: tuple[str, Network | None] | None) -> bool:
    if not rule.admits_port(endpoint.port):
        return False
    if refused is not None:
        what, network = refused
        if what == API_SERVER and rule.port is None:
            return False  # only an entry with the API server's very port admits it
        if rule.name:
            return rule.name == endpoint.host
        if rule.network is not None and endpoint.ip is not None and rule.network.version == endpoint.ip.version:
            if rule.network.num_addresses == 1:
                return endpoint.ip in rule.network
            return network is not None and rule.network.subnet_of(network) and endpoint.ip in rule.network  # type: ignore[arg-type]
        return False
    if rule.any_host:
        return True
    if rule.suffix:
        return endpoint.ip is None and endpoint.host.endswith(rule.suffix)
    if rule.name:
        return endpoint.ip is None and rule.name == endpoint.host
    if rule.network is not None and endpoint.ip is not None:
        return rule.network.version == endpoint.ip.version and endpoint.ip in rule.network
    return False


def endpoint_refusal(endpoint: str | None, region: str | None, allowed: Sequence[str],
                     api_servers: Sequence[str] = ()) -> str | None:
    """None when jobs may use the endpoint; else the status message (field, value, why, fix).

    `allowed`: the allow-list entries (empty: the default, `*`); `api_servers`: the API server's
    own URLs or host:port, refused unless an entry names them with their port."""
    rules = [parse_rule(text) for text in (allowed or DEFAULT_ALLOWED)]
    shown = re.sub(r"//[^/]*@", "//***@", endpoint) if endpoint else f"unset (AWS S3 in {region or 'us-east-1'})"
    fix = (f"use an S3 endpoint the operator allows ({', '.join(r.text for r in rules)[:300]}), or ask its "
           f"administrator to add this one ({SETTING})")
    parsed = parse_endpoint(endpoint, region)
    if isinstance(parsed, str):
        return f"{FIELD} {shown!r} is not allowed: {parsed}"
    refused = sensitive(parsed, api_servers)
    if any(_admits(rule, parsed, refused) for rule in rules):
        return None
    address = parsed.ip or parsed.host
    where = f"[{address}]:{parsed.port}" if ":" in str(address) else f"{address}:{parsed.port}"
    if refused is not None:
        naming = "naming it with its port" if refused[0] == API_SERVER else "naming it"
        return f"{FIELD} {shown!r} is not allowed: {where} is {refused[0]}, which only an entry {naming} admits; {fix}"
    return f"{FIELD} {shown!r} is not allowed: {where} matches no allowed endpoint; {fix}"
