"""Unit tests never reach huggingface.co: a catalog model's header read fails at once, so catalog models
are planned from the catalog's facts on every machine (tests of the header read bring their own server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from modelfit import handlers
from modelfit.gguf_reader import GGUFError, GGUFHeader


def _offline(url: str, headers: dict[str, str] | None, timeout: float) -> GGUFHeader:
    raise GGUFError(f"{url}: not read in unit tests")


@pytest.fixture(autouse=True)
def offline_catalog_headers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(handlers, "HEADERS", handlers.HeaderReads(reader=_offline))
    yield
