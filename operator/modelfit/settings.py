"""What the cluster admin decides for every tenant: flags of ``modelfit run`` and the chart's values. Pure.

A ModelDeployment is a tenant's input; these settings are not, so they bound what a spec may ask for:
the node directories a hostPath cache may use and the networks the operator's header reads may reach.
"""

from __future__ import annotations

import ipaddress
import posixpath

from pydantic import BaseModel, ConfigDict, field_validator

# Never a cache root, whatever the admin says: the node's own system directories.
FORBIDDEN_ROOTS = ("/", "/etc", "/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/usr", "/lib", "/root", "/run")


def normal_dir(path: str) -> str | None:
    """``path`` as one absolute directory with no ``.``, ``..`` or empty parts (a trailing slash dropped), or None."""
    if not path.startswith("/") or "\x00" in path:
        return None
    parts = path.rstrip("/").split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        return None
    return "/" + "/".join(parts)


class Settings(BaseModel):
    """The operator's settings (``modelfit run`` flags; the chart renders them from values)."""

    model_config = ConfigDict(frozen=True)

    host_path_roots: tuple[str, ...] = ()  # node directories a spec's hostPath cache may name (none: no hostPath)
    allow_networks: tuple[str, ...] = ()  # CIDRs header reads may reach although they are refused by default
    deny_networks: tuple[str, ...] = ()  # more CIDRs header reads refuse (the cluster's pod and service ranges)
    # (see ``refused_address``: a spec's URL is the tenant's choice, the operator pod's network is not theirs)

    @field_validator("host_path_roots")
    @classmethod
    def _roots(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for root in roots:
            norm = normal_dir(root)
            if norm is None:
                raise ValueError(f"host path root {root!r} is not an absolute directory without '.' or '..' parts")
            if norm in FORBIDDEN_ROOTS or (posixpath.dirname(norm) == "/" and norm in ("/var", "/home", "/tmp")):
                raise ValueError(f"host path root {root!r} is a system directory; use a directory of its own")
            out.append(norm)
        return tuple(dict.fromkeys(out))

    @field_validator("allow_networks", "deny_networks")
    @classmethod
    def _networks(cls, nets: tuple[str, ...]) -> tuple[str, ...]:
        for net in nets:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return nets


DEFAULT = Settings()

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused unless allowed: the operator pod's own host, the cloud metadata endpoints (169.254.169.254 and the
# like) and "any address" (0.0.0.0 connects to the local host). Private ranges are not: internal mirrors live there.
REFUSED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("127.0.0.0/8"), "loopback"),
    (ipaddress.ip_network("::1/128"), "loopback"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local"),
    (ipaddress.ip_network("fe80::/10"), "link-local"),
    (ipaddress.ip_network("0.0.0.0/8"), "unspecified"),
    (ipaddress.ip_network("::/128"), "unspecified"),
)


def _longest(ip: Address, nets: tuple[str, ...]) -> tuple[int, str]:
    """The prefix length and text of the most specific of ``nets`` holding ``ip`` ((-1, "") when none does)."""
    best = (-1, "")
    for text in nets:
        net = ipaddress.ip_network(text, strict=False)
        if ip in net and net.prefixlen > best[0]:
            best = (net.prefixlen, text)
    return best


def refused_address(ip: Address, settings: Settings = DEFAULT) -> str | None:
    """Why the operator may not connect to ``ip`` ("link-local", "in the denied network 10.96.0.0/12"), or None.

    An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged as its IPv4 address. REFUSED_NETWORKS are
    refused unless an ``allow_networks`` entry holds the address; ``deny_networks`` are refused unless a more
    specific ``allow_networks`` entry holds it (deny 10.0.0.0/8, allow the mirror's 10.1.2.0/24).
    """
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    addr: Address = ip if mapped is None else mapped
    allowed, _ = _longest(addr, settings.allow_networks)
    denied, deny = _longest(addr, settings.deny_networks)
    if denied >= 0 and denied >= allowed:
        return f"in the denied network {deny}"
    if allowed >= 0:
        return None
    for net, what in REFUSED_NETWORKS:
        if addr in net:
            return what
    return None
