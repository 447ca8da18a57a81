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
