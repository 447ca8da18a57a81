"""The catalog's recipes agree with the real llama-quantize on files of the same shape.

`modelfit_dev.synth` writes F16 models with the real tensor shapes of catalog models; the
built llama-quantize applies its own recipe; the reader's per-tensor types and bytes
must equal what `modelfit.catalog` predicts without the file.
"""

from __future__ import annotations

import pytest

from modelfit.catalog import catalog_facts
from modelfit.facts import facts_from_header
from modelfit.gguf_reader import read_gguf
from modelfit_dev.synth import ensure_model

pytestmark = pytest.mark.llama

CASES = [
    ("qwen35-0.8b", "qwen3.5-0.8b", "Q4_0"),
    ("qwen35-0.8b", "qwen3.5-0.8b", "Q4_K_M"),
    ("llama-3.2-1b", "llama-3.2-1b", "Q4_K_M"),
    ("gemma3-1b", "gemma-3-1b", "Q4_K_M"),
]


@pytest.mark.parametrize(("synth_name", "catalog_name", "quant"), CASES)
def test_catalog_matches_llama_quantize(synth_name: str, catalog_name: str, quant: str) -> None:
    real = facts_from_header(read_gguf(ensure_model(synth_name, quant)))
    cat = catalog_facts(catalog_name, quant)
    real_t = {t.name: (t.ggml_type, t.shape, t.nbytes) for t in real.tensors}
    cat_t = {t.name: (t.ggml_type, t.shape, t.nbytes) for t in cat.tensors}
    assert set(real_t) == set(cat_t)
    diff = {n: (cat_t[n], real_t[n]) for n in real_t if real_t[n] != cat_t[n]}
    assert not diff, f"{len(diff)} tensors differ, e.g. {next(iter(diff.items()))}"
    assert real.weights_bytes == cat.weights_bytes
    assert [lf.model_dump() for lf in real.layers] == [lf.model_dump() for lf in cat.layers]
    assert (real.n_layer, real.n_embd, real.n_vocab, real.context_length) == (
        cat.n_layer,
        cat.n_embd,
        cat.n_vocab,
        cat.context_length,
    )
