"""The sizing core against the real llama-server on tiny generated models.

Each case plans with the same flags the operator would use, runs llama-server with
`plan.args`, sends one prompt per slot and compares the predicted peak RSS with
the process' VmHWM; and the predicted peak against a context filled to the last cell.
The prompt cache (--cache-ram) is checked on its own: a chat resumed from it, and the
peak once it is full.
"""

from __future__ import annotations

import pytest

from modelfit.facts import facts_from_header
from modelfit.gguf_reader import read_gguf
from modelfit.memory import MiB
from modelfit.nodes import NodeFacts
from modelfit.sizing import Policy, plan
from modelfit_dev.probe import LlamaServer, filler_prompt, free_port, read_status, token_prompt, with_endpoint
from modelfit_dev.synth import ensure_model, llama_bin

pytestmark = pytest.mark.llama

NOISE = 3 * MiB  # resident file pages (the binary, its libraries, the mapped model), between runs of one shape

CASES = [
    ("qwen35-tiny", "Q4_0", 4096, "none", 1, "f16"),
    ("qwen35-tiny", "Q4_0", 2048, "mmap", 4, "q8_0"),
    ("llama-tiny", "Q4_0", 4096, "mmap", 1, "f16"),
    ("llama-tiny", "Q8_0", 4096, "none", 4, "f16"),
    ("gemma3-tiny", "Q4_0", 2048, "none", 2, "f16"),
    ("qwen3moe-tiny", "Q4_0", 4096, "mmap", 1, "q8_0"),
    ("qwen3-tiny", "Q4_0", 4096, "mmap", 4, "q8_0"),
    ("lfm2-tiny", "Q4_0", 4096, "none", 2, "f16"),
    ("gpt-oss-tiny", "Q4_0", 4096, "mmap", 1, "q8_0"),
]


@pytest.mark.parametrize(("model", "quant", "ctx", "mode", "np_", "kv"), CASES)
def test_predicted_rss_matches_real_server(model: str, quant: str, ctx: int, mode: str, np_: int, kv: str) -> None:
    path = ensure_model(model, quant)
    facts = facts_from_header(read_gguf(path))
    res = plan(
        facts,
        NodeFacts(name="t", cpu_millis=2000, memory_bytes=None),
        # a fresh server's peak: the prompt cache (a budget filled as prompts are saved) has its own test
        Policy(context=ctx, parallel=np_, kv_cache_type=kv, load_mode=mode, cache_ram_mib=0),
        model_path=str(path),
    )
    assert res.plan.context == ctx
    with LlamaServer(llama_bin("llama-server"), with_endpoint(res.plan.args, str(path), free_port())) as srv:
        words = min(300, ctx // (np_ * 4))  # unified KV: the slots share the context
        m = srv.measure([filler_prompt(words, seed=i) for i in range(np_)], n_predict=4)
    pred, meas = res.memory.total_bytes, m.vm_hwm
    err = (pred - meas) / meas
    # Never under. The peak counts a full context (the whole compute buffer, HOST_BYTES_PER_CELL per cell),
    # which a 300-word prompt leaves mostly untouched: 4-6 MiB on these ~30 MiB runtime-dominated processes.
    # The full-context test below and bench/memory_fill.py (real shapes) hold the peak closer. Over by at most a
    # quarter and NOISE: under mmap the resident pages of the mapped file vary between runs of one shape (gpt-oss-tiny
    # Q4_0 mmap: 28.8 MiB measured in 2 of 6 runs on a loaded machine, more in the others, 36.1 predicted).
    assert pred >= meas and pred <= 1.25 * meas + NOISE, (
        f"predicted {pred / MiB:.1f} MiB, measured {meas / MiB:.1f} MiB ({100 * err:+.1f}%)"
    )


FULL = [
    ("qwen3-tiny", "mmap", 1, "f16"),
    ("qwen35-tiny", "none", 4, "q8_0"),
    ("lfm2-tiny", "none", 2, "q8_0"),
    ("gpt-oss-tiny", "mmap", 1, "f16"),
]


@pytest.mark.parametrize(("model", "mode", "np_", "kv"), FULL)
def test_predicted_peak_bounds_a_full_context(model: str, mode: str, np_: int, kv: str) -> None:
    """Every slot's prompt fills its share of the 4096 cells: the predicted peak still holds the process."""
    path = ensure_model(model, "Q4_0")
    facts = facts_from_header(read_gguf(path))
    policy = Policy(context=4096, parallel=np_, kv_cache_type=kv, load_mode=mode, cache_ram_mib=0)
    res = plan(facts, NodeFacts(name="t", cpu_millis=2000, memory_bytes=None), policy, model_path=str(path))
    with LlamaServer(llama_bin("llama-server"), with_endpoint(res.plan.args, str(path), free_port())) as srv:
        per_slot = 4096 // np_ - 1
        m = srv.measure([token_prompt(per_slot, facts.n_vocab, seed=i) for i in range(np_)], n_predict=0)
    pred, meas = res.memory.total_bytes, m.vm_hwm
    err = (pred - meas) / meas
    assert m.prompt_tokens == per_slot * np_
    print(f"\n[full context] {model} {mode} np {np_} {kv}: predicted {pred / MiB:.1f} MiB, VmHWM {meas / MiB:.1f} MiB")
    # Never under, but for the run-to-run noise of the resident file pages under mmap (RUNTIME_FILE: 10.6-12.9 MiB
    # measured, 13 counted; qwen3-tiny under mmap, predicted 40.2 MiB, measured 40.5 and 41.8 MiB in two CI runs and
    # under the prediction in others): at most NOISE under. Tiny models are dominated by the runtime, whose constants are fitted on real shapes; the
    # compute fit over-counts gpt-oss's (its real-width cut: 134.9 MiB predicted, 112.4 allocated): +15% here.
    assert pred >= meas - NOISE and err <= 0.20, (
        f"predicted {pred / MiB:.1f} MiB, measured {meas / MiB:.1f} MiB ({100 * err:+.1f}%)"
    )


def test_modelfit_serve_runs_the_plan(tmp_path: pytest.TempPathFactory) -> None:
    """`modelfit serve` plans for this machine and runs llama-server with the plan."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    path = ensure_model("llama-tiny", "Q4_0")
    port = free_port()
    env = dict(os.environ, MODELFIT_LLAMA_BIN=str(llama_bin("llama-server").parent))
    cmd = [sys.executable, "-m", "modelfit.cli", "serve", str(path), "--port", str(port), "--context", "2048"]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=env, check=True)
    assert "-c 2048" in dry.stdout and "--fit off" in dry.stdout and "Predicted peak RSS" in dry.stderr
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        body = json.dumps({"prompt": "hello", "n_predict": 2}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body)
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(20)


def _timings(r: dict[str, object]) -> dict[str, float]:
    t = r["timings"]
    assert isinstance(t, dict)
    return {k: float(t.get(k, 0)) for k in ("prompt_n", "cache_n", "prompt_ms")}


def _chat_turns(srv: LlamaServer, words: int) -> tuple[dict[str, float], dict[str, float], dict[str, float], int]:
    """Chat A's first turn, another chat B in the only slot, then A's second turn; and VmHWM after A's first."""
    a = filler_prompt(words, seed=1)
    first = srv.complete(a, n_predict=8)
    assert srv.proc is not None
    fresh = read_status(srv.proc.pid)["VmHWM"]  # nothing saved yet: the slot was empty
    other = _timings(srv.complete("Another chat. " + filler_prompt(words, seed=2), n_predict=8))
    second = _timings(srv.complete(a + str(first["content"]) + " And next?", n_predict=8))
    return _timings(first), other, second, fresh


def test_prompt_cache_resumes_a_chat_and_stays_within_the_limit() -> None:
    """promptCache auto: a chat that lost its slot resumes from the cache; RSS stays in the limit once it is full."""
    path = ensure_model("qwen35-tiny", "Q4_0")
    facts = facts_from_header(read_gguf(path))
    node = NodeFacts(name="t", cpu_millis=2000, memory_bytes=None)
    res = plan(facts, node, Policy(context=4096, load_mode="none"), model_path=str(path))
    budget = res.plan.cache_ram_mib
    assert budget > 0 and res.plan.args[res.plan.args.index("--cache-ram") + 1] == str(budget)
    assert res.memory.full_context_bytes >= res.memory.total_bytes + budget * MiB
    words = 500  # ~1850 tokens: a long chat history
    with LlamaServer(llama_bin("llama-server"), with_endpoint(res.plan.args, str(path), free_port())) as srv:
        first, other, second, before = _chat_turns(srv, words)
        assert srv.proc is not None
        for i in range(5):  # more different long prompts than the cache holds: it fills and evicts
            srv.complete(f"Chat {i}. " + filler_prompt(words, seed=3 + i), n_predict=4)
        hwm = read_status(srv.proc.pid)["VmHWM"]
        log = srv.log
    print(
        f"\n[prompt cache {budget} MiB] turn 1: {first['prompt_n']:.0f} tokens in {first['prompt_ms']:.0f} ms; "
        f"other chat: {other['prompt_n']:.0f} in {other['prompt_ms']:.0f} ms; turn 2: {second['prompt_n']:.0f} "
        f"new + {second['cache_n']:.0f} cached in {second['prompt_ms']:.0f} ms; VmHWM {before / MiB:.1f} -> "
        f"{hwm / MiB:.1f} MiB (planned {res.memory.full_context_bytes / MiB:.1f}, limit {res.memory_request_bytes / MiB:.0f})"
    )
    # The second turn reuses A's saved state: only the new tokens are processed, far faster.
    assert second["cache_n"] >= 0.95 * first["prompt_n"], (first, second)
    assert second["prompt_n"] < 0.05 * first["prompt_n"], (first, second)
    # (no timing assertion: machines are shared; the tokens taken from the cache are the proof)
    assert "removing oldest entry" in log  # the cache filled up to its budget
    # The cache is real memory, held within its budget: the growth is about the budget, and the peak
    # matches the plan's context-and-cache-full figure and stays under the pod's limit.
    assert 0.5 * budget * MiB <= hwm - before <= budget * MiB + 2 * MiB, (before, hwm, budget)
    assert hwm <= res.memory.full_context_bytes * 1.05, (hwm, res.memory.full_context_bytes)
    assert hwm <= res.memory_request_bytes

    # Without the prompt cache the same conversation reprocesses its history.
    off = plan(facts, node, Policy(context=4096, load_mode="none", cache_ram_mib=0), model_path=str(path))
    with LlamaServer(llama_bin("llama-server"), with_endpoint(off.plan.args, str(path), free_port())) as srv:
        first, _, second, _ = _chat_turns(srv, words)
    print(f"[prompt cache 0] turn 2: {second['prompt_n']:.0f} tokens reprocessed in {second['prompt_ms']:.0f} ms")
    assert second["prompt_n"] >= 0.9 * first["prompt_n"], (first, second)
