"""Egress of the operator's header reads (issue 17, item 3): the addresses a tenant's URL may make the operator
pod connect to (never loopback, link-local or "any address" unless the admin allows them, never the admin's
denied networks), checked on the address each connection really uses and on every redirect hop; and where a
token may go (https only, to the host its source implies, never across a redirect to another origin).

Servers run on 127.0.0.1 and answer http and https on one port (tests/local_tls.py); reads that should reach
them are made with 127.0.0.0/8 allowed, as the e2e operator runs.
"""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hostile_gguf import llama
from local_tls import DualProtocol, client_context, make_cert, server_context
from modelfit import gguf_reader, sources
from modelfit.api import ModelDeploymentSpec
from modelfit.gguf_reader import EgressRefused, GGUFError, read_gguf
from modelfit.kube import path_for
from modelfit.reconciler import OperatorState, reconcile
from modelfit.settings import Settings, refused_address
from modelfit.sources import Sources, egress_rule, load_facts, token_refused
from test_handlers import CPU_LARGE, LOG, FakeKube, md

TOKEN = "hf_egressTOKEN"
LOCAL = Settings(allow_networks=("127.0.0.0/8",))  # as the e2e operator: its model servers are on loopback
MODEL = llama()


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# ---- the rule: settings.refused_address (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("169.254.0.1", "link-local"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::a9fe:a9fe%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
    ],
)
def test_loopback_link_local_and_unspecified_are_refused_by_default(address: str, why: str) -> None:
    assert refused_address(ip(address)) == why


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "172.16.5.4", "192.168.1.10", "8.8.8.8", "2001:db8::1", "fd00::1", "::ffff:10.1.2.3"]
)
def test_private_and_public_addresses_are_not_refused_by_default(address: str) -> None:
    assert refused_address(ip(address)) is None  # internal mirrors live in the private ranges


def test_an_allowed_network_lifts_the_default_refusal_for_it_only() -> None:
    assert refused_address(ip("127.0.0.1"), LOCAL) is None
    assert refused_address(ip("::ffff:127.0.0.1"), LOCAL) is None  # judged as the IPv4 address it maps
    assert refused_address(ip("::1"), LOCAL) == "loopback"
    assert refused_address(ip("169.254.169.254"), LOCAL) == "link-local"


def test_denied_networks_are_refused_unless_a_more_specific_allow_holds_the_address() -> None:
    s = Settings(deny_networks=("10.96.0.0/12", "fd00::/8"), allow_networks=("10.96.5.0/24", "10.0.0.0/8"))
    assert refused_address(ip("10.100.0.1"), s) == "in the denied network 10.96.0.0/12"
    assert refused_address(ip("::ffff:10.100.0.1"), s) == "in the denied network 10.96.0.0/12"
    assert refused_address(ip("fd00::5"), s) == "in the denied network fd00::/8"
    assert refused_address(ip("10.96.5.7"), s) is None  # the mirror's /24 inside the denied /12
    assert refused_address(ip("10.1.0.1"), s) is None  # allowed /8, outside the denied /12
    same = Settings(deny_networks=("10.0.0.0/8",), allow_networks=("10.0.0.0/8",))
    assert refused_address(ip("10.0.0.1"), same) == "in the denied network 10.0.0.0/8"  # a tie: deny


def test_bad_networks_are_refused_when_the_settings_are_made() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        Settings(deny_networks=("10.0.0.0/33",))


# ---- a local server answering http and https on one port ------------------------------------------------


@dataclass
class Served:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    seen: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # (path, Host, Authorization)


class _Server(DualProtocol, http.server.ThreadingHTTPServer):
    daemon_threads = True
    served: Served


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, head: bool) -> None:
        st: Served = self.server.served  # type: ignore[attr-defined]
        st.seen.append((self.path, self.headers.get("Host"), self.headers.get("Authorization")))
        if self.path in st.redirects:
            self.send_response(302)
            self.send_header("Location", st.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng:
            a, b = rng.removeprefix("bytes=").split("-")
            start, end = int(a), min(int(b), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not head:
            self.wfile.write(data[start : end + 1])

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)


@dataclass
class Site:
    port: int
    served: Served

    def url(self, path: str, scheme: str = "https", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def trust(pem: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header reads trust the test certificate (and only it)."""
    monkeypatch.setattr(gguf_reader, "TLS_CONTEXT", client_context(pem))


def _site(pem: Path) -> Iterator[Site]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.tls, srv.served = server_context(pem), Served(files={"/m.gguf": MODEL})
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield Site(srv.server_address[1], srv.served)
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def site(pem: Path, trust: None) -> Iterator[Site]:
    yield from _site(pem)


@pytest.fixture
def other(pem: Path, trust: None) -> Iterator[Site]:
    yield from _site(pem)


def read(url: str, settings: Settings | None = LOCAL, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return read_gguf(url, headers, 5.0, 5.0, egress_rule(settings))


def test_the_servers_answer_both_schemes_on_one_port(site: Site) -> None:
    for scheme in ("http", "https"):
        assert read(site.url("/m.gguf", scheme)).architecture == "llama"


# ---- refused addresses: literal, any spelling, by name, after a redirect ---------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_loopback_url_is_refused_by_default_and_nothing_is_sent(site: Site, scheme: str) -> None:
    with pytest.raises(EgressRefused) as exc:
        read(site.url("/m.gguf", scheme), Settings())
    assert str(exc.value) == (
        f"{site.url('/m.gguf', scheme)}: refused: 127.0.0.1 is loopback; an admin can allow it with --allow-network"
    )
    assert site.served.seen == []
    assert read(site.url("/m.gguf", scheme), None).architecture == "llama"  # no rule: the command line's reads


def test_the_metadata_endpoint_is_refused_before_any_connection() -> None:
    with pytest.raises(EgressRefused, match=r"refused: 169\.254\.169\.254 is link-local; an admin can allow"):
        read("http://169.254.169.254/latest/meta-data/m.gguf", Settings())
    with pytest.raises(EgressRefused, match=r"refused: fe80::a9fe:a9fe is link-local"):
        read("http://[fe80::a9fe:a9fe]/m.gguf", Settings())
    with pytest.raises(EgressRefused, match=r"refused: 0\.0\.0\.0 is unspecified"):
        read("http://0.0.0.0:1/m.gguf", LOCAL)  # 0.0.0.0 would connect to this host


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "017700000001", "127.1", "0177.0.0.1", "0x7f.1"])
def test_every_spelling_of_loopback_is_refused(site: Site, host: str) -> None:
    url = site.url("/m.gguf", "http", host)
    assert read(url, None).architecture == "llama"  # the spelling does reach 127.0.0.1
    site.served.seen.clear()
    with pytest.raises(EgressRefused, match=rf"refused: {host} resolves to 127\.0\.0\.1, which is loopback"):
        read(url, Settings())
    assert site.served.seen == []


def test_the_mapped_ipv6_spelling_is_refused() -> None:
    with pytest.raises(EgressRefused, match=r"refused: ::ffff:127.0.0.1 is loopback"):
        read("http://[::ffff:127.0.0.1]:1/m.gguf", Settings())


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the header reads resolve to the given addresses (every lookup counted under "lookups")."""
    names: dict[str, list[str]] = {"lookups": []}
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host not in names:
            return real(host, port, *args, **kw)
        names["lookups"].append(host)
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in names[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return names


def test_a_name_resolving_to_loopback_is_refused(site: Site, dns: dict[str, list[str]]) -> None:
    dns["models.example"] = ["127.0.0.1"]
    with pytest.raises(EgressRefused, match=r"refused: models\.example resolves to 127\.0\.0\.1, which is loopback"):
        read(site.url("/m.gguf", "http", "models.example"), Settings())
    assert site.served.seen == []


def test_a_name_with_one_refused_address_among_others_is_refused(dns: dict[str, list[str]]) -> None:
    dns["mixed.example"] = ["10.0.0.5", "169.254.169.254"]
    with pytest.raises(EgressRefused, match=r"mixed\.example resolves to 169\.254\.169\.254, which is link-local"):
        read("http://mixed.example/m.gguf", Settings())


def test_the_connection_goes_to_the_address_checked_under_the_url_s_host_name(
    site: Site, dns: dict[str, list[str]]
) -> None:
    """One lookup per connection, the one checked: a rebinding name server gets no second question. The Host
    header and TLS (SNI, the certificate's name) are the URL's host name's."""
    dns["localhost"] = ["127.0.0.1"]
    header = read(site.url("/m.gguf", "https", "localhost"))
    assert header.architecture == "llama"
    assert len(dns["lookups"]) == len(site.served.seen) >= 1
    assert {host for _, host, _ in site.served.seen} == {f"localhost:{site.port}"}
    dns["lookups"].clear()
    dns["evil.example"] = ["127.0.0.1"]  # a name the certificate does not hold, at an allowed address
    with pytest.raises(GGUFError, match=r"cannot fetch \(.*CERTIFICATE_VERIFY_FAILED.*Hostname mismatch"):
        read(site.url("/m.gguf", "https", "evil.example"))


def test_a_redirect_to_a_refused_address_is_refused(site: Site, dns: dict[str, list[str]]) -> None:
    site.served.redirects["/meta"] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(EgressRefused, match=r"/meta: refused: 169\.254\.169\.254 is link-local"):
        read(site.url("/meta"))
    dns["rebound.example"] = ["::1"]
    site.served.redirects["/named"] = "http://rebound.example/m.gguf"
    with pytest.raises(EgressRefused, match=r"rebound\.example resolves to ::1, which is loopback"):
        read(site.url("/named"))


def test_a_redirect_to_another_scheme_is_refused(site: Site) -> None:
    site.served.redirects["/ftp"] = "ftp://169.254.169.254/m.gguf"
    with pytest.raises(
        GGUFError, match=r"/ftp: refused: a redirect to ftp://169\.254\.169\.254/m\.gguf, not http\(s\)"
    ):
        read(site.url("/ftp"))


def test_header_reads_never_go_through_a_proxy(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy connects where it likes: with egress rules the read goes direct (here: a dead proxy is not used)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert read(site.url("/m.gguf", "http")).architecture == "llama"
    with pytest.raises(GGUFError, match="cannot fetch"):
        read(site.url("/m.gguf", "http"), None)  # the command line's reads honour the proxy


# ---- where the token goes ---------------------------------------------------------------------------------


def test_a_token_never_goes_over_http(site: Site) -> None:
    with pytest.raises(EgressRefused, match="a token goes over https only, never in clear text over http"):
        read(site.url("/m.gguf", "http"), token=TOKEN)
    with pytest.raises(EgressRefused, match="https only"):
        read_gguf(site.url("/m.gguf", "http"), {"authorization": f"Bearer {TOKEN}"})  # any case, any rule
    assert site.served.seen == []
    assert read(site.url("/m.gguf"), token=TOKEN).architecture == "llama"
    assert [auth for _, _, auth in site.served.seen] == [f"Bearer {TOKEN}"] * len(site.served.seen)


def test_the_token_stays_on_its_origin_across_redirects(site: Site, other: Site) -> None:
    """Another host, another port or another scheme (an https -> http downgrade on the same host and port)
    gets no token; a redirect on the same origin keeps it."""
    cases = {
        "/same": (site.url("/m.gguf"), f"Bearer {TOKEN}"),
        "/relative": ("/m.gguf", f"Bearer {TOKEN}"),
        "/host": (site.url("/m.gguf", host="localhost"), None),
        "/port": (other.url("/m.gguf"), None),
        "/downgrade": (site.url("/m.gguf", "http"), None),
    }
    for path, (location, _) in cases.items():
        site.served.redirects[path] = location
    for path, (_, want) in cases.items():
        site.served.seen.clear()
        other.served.seen.clear()
        assert read(site.url(path), token=TOKEN).architecture == "llama"
        first, *rest = site.served.seen + other.served.seen
        assert first == (path, f"127.0.0.1:{site.port}", f"Bearer {TOKEN}"), path
        assert rest and all(auth == want for _, _, auth in rest), (path, rest)


def test_once_dropped_the_token_does_not_come_back(site: Site, other: Site) -> None:
    site.served.redirects["/away"] = other.url("/back")
    other.served.redirects["/back"] = site.url("/m.gguf")
    assert read(site.url("/away"), token=TOKEN).architecture == "llama"
    assert site.served.seen[0][2] == f"Bearer {TOKEN}"
    assert [auth for _, _, auth in site.served.seen[1:] + other.served.seen] == [None] * (
        len(site.served.seen) - 1 + len(other.served.seen)
    )


def spec(model: dict[str, Any]) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({"model": {**model, "tokenSecretRef": {"name": "hf"}}})


def test_token_refused_names_the_host_its_source_implies() -> None:
    hf = spec({"huggingFace": {"repo": "org/repo", "file": "m.gguf"}})
    cat = spec({"catalog": "qwen3.5-0.8b", "quant": "Q4_0"})
    url = spec({"url": "https://mirror.example/m.gguf"})
    assert token_refused(hf, "https://huggingface.co/org/repo/resolve/main/m.gguf") is None
    assert token_refused(cat, "https://huggingface.co/x/y/resolve/main/m.gguf") is None
    assert token_refused(url, "https://mirror.example/m.gguf") is None
    for s in (hf, cat):
        for host in ("evil.example", "cdn-lfs.huggingface.co", "cas-bridge.xethub.hf.co", "huggingface.co.evil"):
            why = token_refused(s, f"https://{host}/m.gguf")
            assert why is not None and "goes to huggingface.co only" in why, host
    for s in (hf, cat, url):
        why = token_refused(s, "http://huggingface.co/m.gguf")
        assert why is not None and "goes over https only, never in clear text over http" in why


def _with_secret(k: FakeKube, ns: str = "default") -> None:
    import base64

    k.objects[path_for("v1", "Secret", ns, "hf")] = {"data": {"token": base64.b64encode(TOKEN.encode()).decode()}}


def test_a_token_over_http_is_a_planned_false_condition_and_nothing_is_sent(site: Site) -> None:
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    st.settings = LOCAL
    _with_secret(k)
    body = {"model": {"url": site.url("/m.gguf", "http"), "tokenSecretRef": {"name": "hf"}}, "context": 4096}
    patch = asyncio.run(reconcile(md(body), LOG, k, st))
    planned = {c["type"]: c for c in patch["conditions"]}["Planned"]
    assert (planned["status"], planned["reason"]) == ("False", "ModelUnreadable")
    assert planned["message"] == (
        f"cannot read the model: {site.url('/m.gguf', 'http')}: refused: the token of spec.model.tokenSecretRef "
        "goes over https only, never in clear text over http"
    )
    assert site.served.seen == [] and TOKEN not in str(patch)
    body["model"]["url"] = site.url("/m.gguf")
    patch = asyncio.run(reconcile(md(body), LOG, k, st))
    assert {c["type"]: c for c in patch["conditions"]}["Planned"]["status"] == "True"
    assert {auth for _, _, auth in site.served.seen} == {f"Bearer {TOKEN}"}


def test_the_operator_refuses_loopback_unless_its_settings_allow_it(site: Site) -> None:
    """The reconciler reads with the admin's settings (``OperatorState.settings``): refused by default."""
    k, st = FakeKube([CPU_LARGE]), OperatorState()
    body = {"model": {"url": site.url("/m.gguf")}, "context": 4096}
    patch = asyncio.run(reconcile(md(body), LOG, k, st))
    planned = {c["type"]: c for c in patch["conditions"]}["Planned"]
    assert (planned["status"], planned["reason"]) == ("False", "ModelUnreadable")
    assert planned["message"] == (
        f"cannot read the model: {site.url('/m.gguf')}: refused: 127.0.0.1 is loopback; "
        "an admin can allow it with --allow-network"
    )
    assert site.served.seen == []
    st.settings, st.sources = LOCAL, Sources()
    patch = asyncio.run(reconcile(md(body), LOG, k, st))
    assert {c["type"]: c for c in patch["conditions"]}["Planned"]["status"] == "True"


def test_catalog_header_reads_keep_the_egress_rule(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog model's header read (shared by every reconcile) is refused too, and falls back to the catalog."""
    monkeypatch.setattr(sources.catalog, "catalog_url", lambda name, quant: site.url("/m.gguf"))
    s = ModelDeploymentSpec.model_validate({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}})
    loaded = asyncio.run(load_facts(s, Sources(sources.HeaderReads())))
    assert loaded.source.startswith(f"catalog (header unreachable: {site.url('/m.gguf')}: refused: 127.0.0.1 is")
    assert site.served.seen == []
    loaded = asyncio.run(load_facts(s, Sources(sources.HeaderReads()), settings=LOCAL))
    assert loaded.source == f"header: {site.url('/m.gguf')}"  # differs from the catalog: a warning, the header's
