"""Where a model comes from: its facts read from the catalog, a catalog file's header or a URL's header.

Shell-level I/O (HTTP header reads in threads, the token Secret through ``kube``), kept apart from the
reconciler so the command line can read a model the way the operator does: ``load_facts`` runs without a
cluster (``kube=None``; pass ``token=`` for a gated file), ``catalog_facts`` is the cached catalog table.
A ``Sources`` holds what one process remembers of its reads (the operator's lives in its ``OperatorState``).

Egress (the admin's ``Settings``): a header read is the operator pod connecting where a tenant's spec says, so
it refuses loopback, link-local and the admin's denied networks (``settings.refused_address``, checked on the
addresses it connects to, every redirect hop); a token goes over https only, to the host its source implies
(huggingface.co for catalog and huggingFace models, the URL's own host for a url), never across a redirect.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hashlib
import http.client
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import api, catalog
from .api import ModelDeploymentSpec
from .decide import LoadedFacts
from .facts import ModelFacts, facts_from_header
from .gguf_reader import READ_DEADLINE, Address, EgressRefused, GGUFError, GGUFHeader, Refuse, read_gguf
from .kube import Kube, KubeError, path_for
from .render import model_file
from .settings import DEFAULT as DEFAULT_SETTINGS
from .settings import Settings, refused_address
from .status import condition

DEFAULT_QUANT = "Q4_K_M"  # a catalog model named without a quant (the command line): the usual size/quality balance
HEADER_TIMEOUT = 5.0  # seconds per HTTP request of a catalog file's header read
HEADER_WAIT = 8.0  # the longest a reconcile waits for one (a DNS lookup is not bounded by the socket timeout)
HEADER_RETRY = 600.0  # a failed read is tried again after this long (at once when the token changes)
READ_WORKERS = 8  # url/huggingFace header reads at once: a read holds ~2 chunks (MAX_CHUNK), so ~50 MiB in all
READ_GRACE = 5.0  # a reconcile waits READ_DEADLINE plus this for a read (a DNS lookup is not bounded by it)
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP header value and curl's config accept
HF_HOSTS = ("huggingface.co",)  # where a catalog or huggingFace model's token goes (its CDN redirects get none)


@dataclass
class _Outcome:
    at: float
    header: GGUFHeader | None
    error: str


def egress_rule(settings: Settings | None) -> Refuse | None:
    """``settings.refused_address`` as gguf_reader's rule, its answer naming the admin's way out (None: no rule,
    the command line's own reads)."""
    if settings is None:
        return None

    def refuse(ip: Address) -> str | None:
        why = refused_address(ip, settings)
        return None if why is None else f"{why}; an admin can allow it with --allow-network"

    return refuse


def token_refused(spec: ModelDeploymentSpec, url: str) -> str | None:
    """Why spec.model.tokenSecretRef's token may not go to ``url``, or None: over https only (never in clear
    text), and for a catalog or huggingFace model to Hugging Face only (a url's host is the spec's own choice)."""
    parts = urllib.parse.urlsplit(url)
    where = "spec.model.tokenSecretRef"
    if parts.scheme.lower() != "https":
        return f"{url}: refused: the token of {where} goes over https only, never in clear text over {parts.scheme}"
    if spec.model.url is None and (parts.hostname or "").lower() not in HF_HOSTS:
        return f"{url}: refused: the Hugging Face token of {where} goes to {', '.join(HF_HOSTS)} only"
    return None


Reader = Callable[[str, dict[str, str] | None, float, Settings | None], GGUFHeader]


def _read_header(url: str, headers: dict[str, str] | None, timeout: float, settings: Settings | None) -> GGUFHeader:
    return read_gguf(url, headers, timeout, READ_DEADLINE, egress_rule(settings))


_Key = tuple[str, str, Settings | None]  # (URL, the token's sha256 or "", settings)


class HeaderReads:
    """Header reads of catalog files, shared by every reconcile of the process.

    One read per (URL, token, settings) runs at a time, in a thread; a reconcile waits for it at most ``wait``
    seconds (a slower read finishes in the background and is used from then on). A header read is kept; a
    failure is remembered for ``retry`` seconds, so an unreachable hub costs one wait, not one per reconcile.
    """

    def __init__(
        self,
        timeout: float = HEADER_TIMEOUT,
        wait: float = HEADER_WAIT,
        retry: float = HEADER_RETRY,
        reader: Reader = _read_header,
    ) -> None:
        self.timeout, self.wait, self.retry, self.reader = timeout, wait, retry, reader
        self.outcomes: dict[_Key, _Outcome] = {}
        self.running: dict[_Key, concurrent.futures.Future[GGUFHeader]] = {}
        self.reads = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="modelfit-header")

    async def read(
        self, url: str, token: str | None = None, settings: Settings | None = DEFAULT_SETTINGS
    ) -> tuple[GGUFHeader | None, str]:
        """The header of ``url`` or None and why not (``settings``: the admin's egress rules, see ``load_facts``)."""
        key = (url, hashlib.sha256(token.encode()).hexdigest() if token else "", settings)
        known = self.outcomes.get(key)
        if known is not None and (known.header is not None or time.monotonic() - known.at < self.retry):
            return known.header, known.error
        fut = self.running.get(key)
        if fut is None:
            headers = {"Authorization": f"Bearer {token}"} if token else None
            self.reads += 1
            fut = self._pool.submit(self.reader, url, headers, self.timeout, settings)
            self.running[key] = fut
            fut.add_done_callback(functools.partial(self._finished, key))
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(ready.set)

        fut.add_done_callback(wake)  # after _finished: the outcome is recorded before the wake-up
        try:
            await asyncio.wait_for(ready.wait(), self.wait)
        except TimeoutError:
            error = f"{url}: no answer within {self.wait:g} s"
            self.outcomes[key] = _Outcome(time.monotonic(), None, error)
            return None, error
        done = self.outcomes.get(key)
        return (done.header, done.error) if done is not None else (None, f"{url}: read cancelled")

    def _finished(self, key: _Key, fut: concurrent.futures.Future[GGUFHeader]) -> None:
        self.running.pop(key, None)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self.outcomes[key] = _Outcome(time.monotonic(), fut.result(), "")
        else:
            error = str(exc) if isinstance(exc, GGUFError) else f"{type(exc).__name__}: {exc}"
            self.outcomes[key] = _Outcome(time.monotonic(), None, error[:500])


HEADERS = HeaderReads()


class Sources:
    """What one process remembers of its model reads; all of it can be read again after a restart."""

    def __init__(self, headers: HeaderReads | None = None) -> None:
        self.headers = headers  # catalog header reads; None: the process-wide HEADERS
        self.facts: dict[tuple[str, str | None], tuple[ModelFacts, int]] = {}  # (url, sha256) -> facts, size
        self.header_facts: dict[str, tuple[GGUFHeader, str, ModelFacts]] = {}  # catalog URL -> header, name, facts


SOURCES = Sources()


def secret_problem(
    secret: dict[str, Any] | None, ref: api.SecretKeyRef | api.TokenSecretRef, where: str, ns: str, what: str
) -> api.Condition | None:
    """A missing Secret or key as a Degraded condition: ``what`` cannot happen until it exists."""
    if secret is None:
        return condition(
            "Degraded",
            "True",
            "SecretNotFound",
            f"Secret {ref.name} ({where}) does not exist in namespace {ns}; {what}",
        )
    if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
        return condition(
            "Degraded", "True", "SecretKeyNotFound", f"Secret {ref.name} ({where}) has no key {ref.key}; {what}"
        )
    return None


async def model_token(kube: Kube | None, ns: str | None, spec: ModelDeploymentSpec) -> tuple[str | None, str]:
    """The token of spec.model.tokenSecretRef, or None and why not ("" when none is asked for)."""
    ref = spec.model.token_secret_ref
    if ref is None:
        return None, ""
    where = "spec.model.tokenSecretRef"
    if kube is None or ns is None:
        return None, f"no cluster to read Secret {ref.name} ({where}) from"
    try:
        secret = await kube.get(path_for("v1", "Secret", ns, ref.name))
    except KubeError as exc:
        return None, f"cannot read Secret {ref.name} ({where}): {exc}"
    problem = secret_problem(secret, ref, where, ns, "the model is read without a token")
    if problem is not None or secret is None:
        return None, problem.message if problem else ""
    data = secret.get("data") or {}
    try:
        if ref.key in data:
            token = base64.b64decode(str(data[ref.key]), validate=True).decode("utf-8")
        else:
            token = str((secret.get("stringData") or {})[ref.key])
    except ValueError:  # binascii.Error and UnicodeDecodeError
        return None, f"Secret {ref.name} ({where}) key {ref.key} is not base64 of UTF-8 text"
    token = token.strip()
    if not _TOKEN_RE.fullmatch(token):
        return None, f"Secret {ref.name} ({where}) key {ref.key} is empty or has spaces or control characters inside"
    return token, ""


catalog_facts = functools.lru_cache(maxsize=256)(catalog.catalog_facts)  # pure, and 10% of a burst's CPU

_READS = concurrent.futures.ThreadPoolExecutor(max_workers=READ_WORKERS, thread_name_prefix="modelfit-read")


def _usable(where: str, work: Callable[[], ModelFacts]) -> ModelFacts:
    """``work`` (a header read, its facts) with every failure a GGUFError: a hostile header ends as a
    condition, never as an exception the reconciler does not expect (facts check what they read; this is
    the shell's last line, for MemoryError and the like)."""
    try:
        return work()
    except GGUFError:
        raise
    except http.client.HTTPException as exc:
        raise GGUFError(f"{where}: not an HTTP answer ({type(exc).__name__}: {exc})"[:500]) from exc
    except Exception as exc:  # whatever a header makes of the parser, the operator goes on
        raise GGUFError(f"{where}: header not usable ({type(exc).__name__}: {exc})"[:500]) from exc


async def _off_the_loop(where: str, work: Callable[[], ModelFacts]) -> ModelFacts:
    """``work`` in a worker thread, so a large or hostile header never holds the event loop. The read's own
    deadline stops the thread; the wait here only bounds what that deadline cannot (a DNS lookup)."""
    fut = asyncio.get_running_loop().run_in_executor(_READS, _usable, where, work)
    try:
        return await asyncio.wait_for(fut, READ_DEADLINE + READ_GRACE)
    except TimeoutError as exc:
        raise GGUFError(f"{where}: no header within {READ_DEADLINE + READ_GRACE:g} s") from exc


async def load_facts(
    spec: ModelDeploymentSpec,
    sources: Sources = SOURCES,
    kube: Kube | None = None,
    namespace: str | None = None,
    *,
    token: str | None = None,
    catalog_header: bool = True,
    settings: Settings | None = DEFAULT_SETTINGS,
) -> LoadedFacts:
    """Model facts, file size and where they came from.

    A catalog model is planned from its file's header when the catalog URL answers (within HEADER_WAIT;
    a failure is remembered for HEADER_RETRY), else from the catalog's facts; a header that differs from
    the catalog on the key numbers is a warning. A url or huggingFace file is read once per (url, sha256);
    a file on a PVC is known by its catalog file name only (the operator does not mount PVCs).
    With spec.model.tokenSecretRef every read sends ``Authorization: Bearer`` with the Secret's token
    (read through ``kube``), or with ``token`` when given (a caller without a cluster: the command line).
    ``catalog_header=False`` plans a catalog model from the catalog's facts without the network (the command
    line: the two agree for catalog files, and a plan should not wait on a hub). ``settings``: the admin's
    egress rules (the operator's ``--allow-network``, ``--deny-network``); None reaches any address (a command
    line's own reads). A token that may not go where the model is read from (``token_refused``) is an
    EgressRefused, as is a refused address.
    """
    m = spec.model
    token_note = ""
    if token is None:
        token, token_note = await model_token(kube, namespace, spec)
    if m.catalog is not None:
        built_in = catalog_facts(m.catalog, m.quant or DEFAULT_QUANT)
        if not catalog_header:
            return LoadedFacts(built_in, built_in.file_bytes, "catalog")
        url = catalog.catalog_url(m.catalog, m.quant or DEFAULT_QUANT)
        _check_token(spec, url, token)
        return await _catalog_header(sources, url, built_in, token, token_note, settings)
    mf = model_file(spec)
    if mf.url is None:
        return _on_pvc(mf.file_name, mf.pvc_claim)
    _check_token(spec, mf.url, token)
    key = (mf.url, m.sha256)
    if key not in sources.facts:
        facts = await _url_header(mf.url, token, token_note, settings)
        sources.facts[key] = (facts, facts.file_bytes)
    facts, size = sources.facts[key]
    return LoadedFacts(facts, size, f"header: {mf.url}")


def _check_token(spec: ModelDeploymentSpec, url: str, token: str | None) -> None:
    refused = token_refused(spec, url) if token is not None else None
    if refused is not None:
        raise EgressRefused(refused)


async def _catalog_header(
    sources: Sources, url: str, built_in: ModelFacts, token: str | None, token_note: str, settings: Settings | None
) -> LoadedFacts:
    """A catalog model's facts from its file's header (the catalog's when it does not answer), mismatches named."""
    header, error = await (sources.headers or HEADERS).read(url, token, settings)
    facts: ModelFacts | None = None
    if header is not None:
        cached = sources.header_facts.get(url)
        try:
            if cached is not None and cached[0] is header and cached[1] == built_in.name:
                facts = cached[2]  # the same header read: the same facts object (and its remembered estimates)
            else:
                facts = await _off_the_loop(url, functools.partial(facts_from_header, header, built_in.name))
                sources.header_facts[url] = (header, built_in.name, facts)
        except GGUFError as exc:
            error = f"{url}: header not usable ({exc})"
    if facts is None:
        why = error + (f"; {token_note}" if token_note else "")
        return LoadedFacts(built_in, built_in.file_bytes, f"catalog (header unreachable: {why})")
    differ = catalog.facts_mismatch(facts, built_in)
    mismatch = ""
    if differ:
        mismatch = f"the header of {url} differs from the catalog: {', '.join(differ)}; planned from the header"
        facts = facts.model_copy(update={"warnings": [*facts.warnings, mismatch]})
    return LoadedFacts(facts, facts.file_bytes, f"header: {url}", mismatch)


def _on_pvc(file_name: str, claim: str | None) -> LoadedFacts:
    """A file on a PVC, known by its catalog file name only (the operator does not mount PVCs)."""
    known = catalog.for_file_name(file_name)
    if known is None:
        raise GGUFError(
            f"cannot read {file_name} on PVC {claim} from the operator; "
            "name the file like a catalog model or serve it from a URL"
        )
    built_in = catalog.catalog_facts(*known)
    source = f"catalog (recognised by the file name {file_name}; the operator does not read PVC {claim})"
    return LoadedFacts(built_in, built_in.file_bytes, source)


async def _url_header(url: str, token: str | None, token_note: str, settings: Settings | None) -> ModelFacts:
    """A url or huggingFace file's facts from its header, read off the loop within one deadline."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    refuse = egress_rule(settings)
    try:
        # one deadline for the whole read (each socket operation waits at most what is left of it)
        return await _off_the_loop(
            url, lambda: facts_from_header(read_gguf(url, headers, READ_DEADLINE, READ_DEADLINE, refuse))
        )
    except GGUFError as exc:
        note = token_note
        if not note and token is None and re.search(r": HTTP 40[13]\b", str(exc)):
            note = "a gated or private file needs spec.model.tokenSecretRef (a Secret with a Hugging Face token)"
        if note:
            raise type(exc)(f"{exc}; {note}") from exc
        raise


# ---- the command line's model argument: a catalog name, a .gguf path or a URL ------------------------------


def model_source(model: str, quant: str | None, *, local: bool = True) -> dict[str, Any]:
    """spec.model for the model argument: a catalog entry (default quant Q4_K_M) or a URL.

    A local .gguf file (``local``) has no spec source; it is written as a file on a volume, the
    closest a ModelDeployment comes (placement reads no source: the CLI passes the file's facts).
    """
    if model.startswith(("http://", "https://")) or model.endswith(".gguf") or Path(model).is_file():
        if quant is not None:
            raise ValueError("argument --quant: applies to catalog models only; a .gguf file has its own")
        if model.startswith(("http://", "https://")):
            return {"url": model}
        if local:
            return {"pvc": {"claimName": "local", "path": Path(model).name}}
    key = catalog.resolve_name(model)
    if key is None:
        files = "a .gguf file, a URL," if local else "an http(s) URL"
        raise KeyError(f"{model!r} is neither {files} nor a catalog model ({', '.join(sorted(catalog.MODELS))})")
    return {"catalog": key, "quant": catalog.normalize_quant(quant or DEFAULT_QUANT)}


def load_model(model: str, quant: str | None) -> tuple[ModelFacts, str]:
    """Facts and the path llama-server should load, for a catalog name, a .gguf path or a URL."""
    source = model_source(model, quant)
    if "catalog" in source:
        name, q = source["catalog"], source["quant"]
        return catalog.catalog_facts(name, q), "/models/" + catalog.MODELS[name].hf_file.format(quant=q)
    facts = facts_from_header(read_gguf(model))
    path = model if "pvc" in source else "/models/" + model.rsplit("/", 1)[-1].split("?")[0]
    return facts, path
