"""Predicted vs measured memory of the real llama-server, over a grid.

For each generated model (real architecture and shapes, random weights) and each
point of the grid, plan with `modelfit.sizing.plan`, run llama-server with
`plan.args`, send one prompt per slot, read VmHWM / RssAnon / RssFile from
/proc, and print predicted against measured, beside a header-only estimate in
the style of gguf-parser-go (every layer gets KV, no recurrent state, no repack)
and the seed page's figure. The predicted peak counts a full context, so after these short prompts
it reads a few percent over; bench/memory_fill.py measures it as the context fills to 100%.

    python bench/sizing_accuracy.py                       # default grid
    python bench/sizing_accuracy.py --models qwen35-0.8b --contexts 4096,32768
    python bench/sizing_accuracy.py --quick               # tiny models only
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import cast

from modelfit.facts import ModelFacts, facts_from_header
from modelfit.gguf_reader import read_gguf
from modelfit.memory import MiB, ServerConfig, type_size
from modelfit.nodes import NodeFacts
from modelfit.sizing import Policy, plan
from modelfit_dev.probe import LlamaServer, filler_prompt, free_port, with_endpoint
from modelfit_dev.synth import TINY_SPECS, ensure_model, llama_bin

SEED_PAGE_BYTES = int(0.5 * (1 << 30))  # "Min RAM required 0.5 GB"


def parser_style_estimate(facts: ModelFacts, cfg: ServerConfig) -> int:
    """A header-only estimate the way gguf-parser-go does it for unlisted architectures."""
    kv_per_layer = cfg.n_ctx * 2 * facts.n_head_kv * facts.head_dim_k * 2  # every layer, f16
    kv = kv_per_layer * facts.n_layer
    compute = cfg.n_ctx * cfg.n_ubatch * 4 + facts.n_vocab * cfg.n_ubatch * 4
    return facts.weights_bytes + kv + compute + 150 * MiB


def run_point(model: str, quant: str, ctx: int, mode: str, np_: int, kv: str, prompt_words: int) -> dict[str, object]:
    path = ensure_model(model, quant)
    facts = facts_from_header(read_gguf(path))
    node = NodeFacts(name="bench", cpu_millis=2000, memory_bytes=None)
    res = plan(facts, node, Policy(context=ctx, parallel=np_, kv_cache_type=kv, load_mode=mode), model_path=str(path))
    port = free_port()
    args = with_endpoint(res.plan.args, str(path), port)
    t0 = time.monotonic()
    with LlamaServer(llama_bin("llama-server"), args) as srv:
        load_s = time.monotonic() - t0
        words = min(prompt_words, res.plan.context // (np_ * 4))  # unified KV: the slots share the context
        m = srv.measure([filler_prompt(words, seed=i) for i in range(np_)], n_predict=4)
    pred = res.memory.total_bytes
    cfg = ServerConfig(
        n_ctx=res.plan.context, n_parallel=np_, type_k=res.plan.kv_cache_type, type_v=res.plan.kv_cache_type
    )
    err = (pred - m.vm_hwm) / m.vm_hwm
    return {
        "model": model,
        "quant": quant,
        "ctx": res.plan.context,
        "mode": res.plan.load_mode,
        "np": np_,
        "kv": res.plan.kv_cache_type,
        "predicted_mib": pred / MiB,
        "measured_hwm_mib": m.vm_hwm / MiB,
        "rss_anon_mib": m.rss_anon / MiB,
        "rss_file_mib": m.rss_file / MiB,
        "pred_anon_mib": res.memory.anon_bytes / MiB,
        "pred_file_mib": res.memory.weights_file_bytes / MiB,
        "error_pct": 100 * err,
        "parser_style_mib": parser_style_estimate(facts, cfg) / MiB,
        "seed_page_mib": SEED_PAGE_BYTES / MiB,
        "load_s": load_s,
        "kv_bytes_per_cell": sum(
            type_size(res.plan.kv_cache_type, lf.n_embd_k_gqa) + type_size(res.plan.kv_cache_type, lf.n_embd_v_gqa)
            for lf in facts.layers
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen35-0.8b,llama-3.2-1b,gemma3-1b,qwen3moe-a3b-2l,qwen3-0.6b")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--contexts", default="4096,32768,max")
    ap.add_argument("--modes", default="mmap,none")
    ap.add_argument("--parallel", default="1,4")
    ap.add_argument("--kv", default="f16,q8_0")
    ap.add_argument("--prompt-words", type=int, default=300, help="long enough for a full 512-token ubatch")
    ap.add_argument("--quick", action="store_true", help="tiny models, small grid")
    ap.add_argument(
        "--balanced",
        action="store_true",
        help="per model and context two points that together cover every level: (none, 1, f16) and (mmap, 4, q8_0)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.contexts, a.parallel = ",".join(TINY_SPECS), "4096", "1,4"
    rows = []
    contexts = [c if c == "max" else int(c) for c in a.contexts.split(",")]
    grid = list(
        itertools.product(
            a.models.split(","), contexts, a.modes.split(","), [int(x) for x in a.parallel.split(",")], a.kv.split(",")
        )
    )
    if a.balanced:
        grid = [
            (m, c, *combo)
            for m, c in itertools.product(a.models.split(","), contexts)
            for combo in (("none", 1, "f16"), ("mmap", 4, "q8_0"))
        ]
    for model, ctx, mode, np_, kv in grid:
        try:
            row = run_point(model, a.quant, ctx if ctx == "max" else int(ctx), mode, np_, kv, a.prompt_words)
        except Exception as exc:  # noqa: BLE001 - a failed point is reported, the grid goes on
            print(f"# {model} ctx={ctx} {mode} np={np_} {kv}: FAILED {exc!s:.300}", file=sys.stderr)
            continue
        rows.append(row)
        print(
            f"{row['model']:<16} {row['quant']:<6} ctx={row['ctx']:>7} {row['mode']:<4} np={row['np']} kv={row['kv']:<4} "
            f"pred={row['predicted_mib']:>8.1f} meas={row['measured_hwm_mib']:>8.1f} MiB err={row['error_pct']:>+6.2f}% "
            f"(anon {row['pred_anon_mib']:.0f}/{row['rss_anon_mib']:.0f}, file {row['pred_file_mib']:.0f}/{row['rss_file_mib']:.0f}) "
            f"parser-style={row['parser_style_mib']:>8.1f} seed-page={row['seed_page_mib']:.0f}",
            flush=True,
        )
    if rows:
        errors = [cast(float, r["error_pct"]) for r in rows]
        worst = max(errors, key=abs)
        print(f"\npoints: {len(rows)}  worst error: {worst:+.2f}%  most under: {min(errors):+.2f}%")
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
