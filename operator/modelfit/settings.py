"""What the cluster admin decides for every tenant: flags of ``modelfit run`` and the chart's values. Pure.

A ModelDeployment is a tenant's input; these settings are not, so they bound what a spec may ask for:
the node directories a hostPath cache may use, the networks the operator's header reads (and, with
``network_policy``, the model's pods) may reach, and the images its pods run.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Never a cache root, whatever the admin says: the node's own system directories.
FORBIDDEN_ROOTS = ("/", "/etc", "/proc", "/sys", "/dev", "/boot", "/bin", "/sbin", "/usr", "/lib", "/root", "/run")

# The backends a server image is set for (render.IMAGES holds their defaults).
BACKENDS = ("cpu", "cuda", "rocm", "vulkan")

# An image reference as the container runtimes parse it (distribution's reference grammar): an optional
# registry host[:port], lowercase path components, then a tag and/or a sha256 digest.
_HOST_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# a host is told from a path by a dot, a port or its name (``library/ubuntu`` is Docker Hub's path)
_HOST = rf"(?:(?:{_HOST_PART}(?:\.{_HOST_PART})+|\[[0-9a-fA-F:]+\])(?::[0-9]+)?|{_HOST_PART}:[0-9]+|localhost)"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(
    rf"(?P<name>(?:{_HOST}/)?{_PATH_PART}(?:/{_PATH_PART})*)(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
REF_FORMS = "REPO:TAG, REPO@sha256:<64 hex> or REPO:TAG@sha256:<64 hex>"
_REGISTRY_PREFIX = re.compile(rf"{_HOST}(?:/{_PATH_PART})*")  # a registry host, optionally a path under it
# label key (an optional DNS subdomain prefix, a name) = label value
_LABEL_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = re.compile(rf"(?:{_LABEL_NAME})?")


def _is_host(part: str) -> bool:
    """Whether an image name's first component is a registry host (else the name is Docker Hub's)."""
    return "." in part or ":" in part or part == "localhost" or part.startswith("[")


def image_name(ref: str) -> str | None:
    """The repository of an image reference, registry included as the runtime resolves it (``ubuntu:24.04`` is
    ``docker.io/library/ubuntu``), or None when ``ref`` is not a reference."""
    m = IMAGE_REF.fullmatch(ref)
    if m is None:
        return None
    name = m["name"]
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    return name if _is_host(first) else f"docker.io/{name}"


def pinned(ref: str) -> bool:
    """Whether the reference names its content by digest (a tag can be moved, a digest cannot)."""
    m = IMAGE_REF.fullmatch(ref)
    return m is not None and m["digest"] is not None


def admin_ref(ref: str, what: str) -> str:
    """``ref`` when it is a reference with a tag or a digest (an admin's image never means an implicit latest)."""
    m = IMAGE_REF.fullmatch(ref)
    if m is None or (m["tag"] is None and m["digest"] is None):
        raise ValueError(f"{what} {ref!r} is not an image reference of the form {REF_FORMS}")
    return ref


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
    downloader_image: str | None = None  # the init containers' image (None: render.DOWNLOADER_IMAGE); never a tenant's
    server_images: tuple[tuple[str, str], ...] = ()  # (backend, image): llama-server's, else render.IMAGES[backend]
    require_image_digest: bool = False  # every image a model's pods run must be pinned by digest
    allowed_image_registries: tuple[str, ...] = ()  # registries (or paths under one) of spec.image (none: any)
    network_policy: bool = False  # a NetworkPolicy per model (see render.network_policy)
    picker_image: str | None = None  # the endpoint picker's image (None: routing.PICKER_IMAGE); never a tenant's
    edge_image: str | None = None  # the standalone Envoy's image (None: routing.EDGE_IMAGE); never a tenant's
    network_policy_ingress_namespaces: tuple[str, ...] = ()  # "key=value": namespaces whose pods may reach models
    operator_namespace: str | None = None  # where the operator runs (POD_NAMESPACE): it reads the pickers' metrics
    gateway_namespace: str | None = Field(  # the shared gateway's namespace: its pods reach every model
        default=None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
    )

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

    @field_validator("downloader_image", "picker_image", "edge_image")
    @classmethod
    def _admin_images(cls, ref: str | None, info: ValidationInfo) -> str | None:
        what = {"downloader_image": "downloader image", "picker_image": "picker image", "edge_image": "edge image"}
        return None if ref is None else admin_ref(ref, what[str(info.field_name)])

    @field_validator("server_images")
    @classmethod
    def _servers(cls, pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        seen: set[str] = set()
        for backend, ref in pairs:
            if backend not in BACKENDS:
                raise ValueError(f"server image {backend}={ref}: the backend is one of {', '.join(BACKENDS)}")
            if backend in seen:
                raise ValueError(f"server image for {backend} is given twice")
            seen.add(backend)
            admin_ref(ref, f"server image {backend}")
        return pairs

    @field_validator("allowed_image_registries")
    @classmethod
    def _registries(cls, prefixes: tuple[str, ...]) -> tuple[str, ...]:
        for prefix in prefixes:
            if not _REGISTRY_PREFIX.fullmatch(prefix.rstrip("/")):
                raise ValueError(
                    f"allowed image registry {prefix!r} is not a registry host, optionally with a repository "
                    "path (registry.example.com, registry.example.com:5000/team, docker.io/library)"
                )
        return tuple(p.rstrip("/") for p in prefixes)

    @field_validator("network_policy_ingress_namespaces")
    @classmethod
    def _namespace_labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        for label in labels:
            key, eq, value = label.partition("=")
            if not eq or not _LABEL_KEY.fullmatch(key) or len(key.rpartition("/")[2]) > 63:
                raise ValueError(f"network policy ingress namespace label {label!r} is not key=value")
            if not _LABEL_VALUE.fullmatch(value):
                raise ValueError(f"network policy ingress namespace label {label!r}: {value!r} is not a label value")
        return labels

    @model_validator(mode="after")
    def _pinned_downloader(self) -> Settings:
        if self.require_image_digest and not (self.downloader_image and pinned(self.downloader_image)):
            raise ValueError(
                "require image digest: the downloader image must be pinned too; give it as REPO@sha256:<64 hex> "
                "(--downloader-image, chart value images.downloader): the default is a tag"
            )
        return self

    def server_image(self, backend: str) -> str | None:
        """The admin's llama-server image for ``backend``, or None (the default)."""
        return next((ref for b, ref in self.server_images if b == backend), None)

    def registry_allowed(self, ref: str) -> bool:
        """Whether ``ref`` comes from an allowed registry (or repository path under one); any does when none is
        set. Whole path components match: ``registry.example.com`` does not admit ``registry.example.com.evil``."""
        name = image_name(ref)
        if name is None:
            return False
        allowed = self.allowed_image_registries
        return not allowed or any(name == p or name.startswith(f"{p}/") for p in allowed)


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
