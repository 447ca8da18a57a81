"""Prompt and decode speed of the real llama-server: the plan's flags against the defaults and a small grid.

For one generated model (real architecture and shapes, random weights) this runs
llama-server with

  * `plan`      the flags `modelfit.sizing.plan` chooses (`plan.args`),
  * `defaults`  llama-server's own defaults (only -m, --host and --port),
  * a grid      around the plan: threads, ubatch, flash attention, load mode and
                weight repacking. `--grid axes` (the default) changes one of them
                at a time from the plan's value; `--grid full` runs every
                combination (about 5x longer).

All servers are started up front and served round-robin: one warm-up round, then
`--repeats` timed rounds, one request per server each (same prompt, no prompt
cache, EOS ignored so every request decodes `--n-predict` tokens); a row shows
the medians of llama-server's own `timings`. Interleaving spreads drift in a
shared machine's load over all rows; `--sequential` runs one server at a time
(less memory, for big models). In the same
run the memory bandwidth of this machine is measured (numpy copy of a 512 MiB
array, best of a few, counting read + write) and turned into a decode bound:
bandwidth / bytes of weights read per generated token (all weights of a dense
model, the active experts of a MoE, one row of an untied token embedding; the KV
cache read is left out, it is small at these prompt lengths).

    python bench/serving_speed.py                          # qwen35-0.8b Q4_0, axes grid
    python bench/serving_speed.py --model llama-3.2-1b --grid full --budget 1200
    python bench/serving_speed.py --quick                  # tiny model, 2-point grid (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import numpy as np

from modelfit.facts import ModelFacts, facts_from_header
from modelfit.gguf_reader import read_gguf
from modelfit.nodes import NodeFacts
from modelfit.probe import LlamaServer, filler_prompt, free_port, with_endpoint
from modelfit.sizing import Policy, plan
from modelfit.synth import ensure_model, llama_bin

MiB = 1 << 20


# ---- memory bandwidth and the decode bound ---------------------------------------------------


def copy_bandwidth(nbytes: int = 512 * MiB, runs: int = 5) -> float:
    """Bytes per second of a numpy copy (read + write counted), best of `runs`."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def bytes_per_token(facts: ModelFacts) -> int:
    """Weight bytes one decode step reads: everything a dense model uses, the active share of experts."""
    total = 0
    for t in facts.tensors:
        il = t.layer
        if il is not None and il >= facts.n_layer:
            continue  # MTP / nextn blocks are not run for plain decoding
        n = t.nbytes
        if t.name.startswith("token_embd.") and not facts.tied_embeddings:
            n //= max(facts.n_vocab, 1)  # a lookup reads one row; the output matrix is read in full
        elif "_exps." in t.name and facts.n_expert > 0:
            n = n * facts.n_expert_used // facts.n_expert
        total += n
    return total


# ---- server points ---------------------------------------------------------------------------


@dataclass
class Point:
    label: str
    args: list[str]  # endpoint is filled in per run
    threads: str = "def"
    ubatch: str = "def"
    fa: str = "def"
    load_mode: str = "def"
    repack: str = "def"


@dataclass
class Row:
    label: str
    threads: str
    ubatch: str
    fa: str
    load_mode: str
    repack: str
    prompt_n: int = 0
    predicted_n: int = 0
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    load_s: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    error: str = ""


def _flag(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args else "def"


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def variant(base: list[str], threads: int, ubatch: int, fa: str, load_mode: str, repack: bool) -> list[str]:
    args = set_flag(base, "-t", str(threads))
    args = set_flag(args, "-ub", str(ubatch))
    batch = int(_flag(args, "-b")) if "-b" in args else 2048
    args = set_flag(args, "-b", str(max(batch, ubatch)))
    args = set_flag(args, "-fa", fa)
    args = set_flag(args, "--load-mode", load_mode)
    args = [a for a in args if a not in ("--no-repack", "-nr", "--repack")]
    if not repack:
        args.append("--no-repack")
    return args


def describe(label: str, args: list[str]) -> Point:
    return Point(
        label=label,
        args=args,
        threads=_flag(args, "-t"),
        ubatch=_flag(args, "-ub"),
        fa=_flag(args, "-fa"),
        load_mode=_flag(args, "--load-mode"),
        repack="off" if "--no-repack" in args else "on",
    )


def build_points(
    plan_args: list[str],
    model_path: str,
    grid: str,
    threads: list[int],
    ubatches: list[int],
    fas: list[str],
    modes: list[str],
    repacks: list[bool],
) -> list[Point]:
    p_t, p_ub = int(_flag(plan_args, "-t")), int(_flag(plan_args, "-ub"))
    p_fa, p_lm = _flag(plan_args, "-fa"), _flag(plan_args, "--load-mode")
    p_rp = "--no-repack" not in plan_args
    base = variant(plan_args, p_t, p_ub, p_fa, p_lm, p_rp)
    points = [describe("plan", base)]
    defaults = Point(label="defaults", args=["-m", model_path, "--host", "127.0.0.1", "--port", "0"])
    points.append(defaults)
    combos: list[tuple[str, list[str]]] = []
    if grid == "axes":
        for t in threads:
            combos.append((f"t={t}", variant(base, t, p_ub, p_fa, p_lm, p_rp)))
        for ub in ubatches:
            combos.append((f"ub={ub}", variant(base, p_t, ub, p_fa, p_lm, p_rp)))
        for fa in fas:
            combos.append((f"fa={fa}", variant(base, p_t, p_ub, fa, p_lm, p_rp)))
        for lm in modes:
            combos.append((f"lm={lm}", variant(base, p_t, p_ub, p_fa, lm, p_rp)))
        for rp in repacks:
            combos.append((f"repack={'on' if rp else 'off'}", variant(base, p_t, p_ub, p_fa, p_lm, rp)))
    else:
        for t, ub, fa, lm, rp in itertools.product(threads, ubatches, fas, modes, repacks):
            combos.append(("grid", variant(base, t, ub, fa, lm, rp)))
    seen = {tuple(base)}
    for label, args in combos:
        if tuple(args) in seen:
            continue  # the plan's own setting (or a repeat) runs once
        seen.add(tuple(args))
        points.append(describe(label, args))
    return points


def timed_completion(srv: LlamaServer, prompt: str, n_predict: int, timeout: float) -> dict[str, float]:
    """One /completion with the prompt cache off and EOS ignored; llama-server's timings."""
    body = {"prompt": prompt, "n_predict": n_predict, "cache_prompt": False, "ignore_eos": True, "temperature": 0}
    req = urllib.request.Request(
        srv.url + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        timings = json.loads(r.read())["timings"]
    return {k: float(timings[k]) for k in ("prompt_n", "prompt_per_second", "predicted_n", "predicted_per_second")}


def run_point(pt: Point, model_path: str, prompt: str, n_predict: int, repeats: int, deadline: float) -> Row:
    """One server at a time: start it, warm up, `repeats` timed requests, stop it."""
    row = Row(pt.label, pt.threads, pt.ubatch, pt.fa, pt.load_mode, pt.repack)
    args = with_endpoint(pt.args, model_path, free_port())
    t0 = time.monotonic()
    with LlamaServer(llama_bin("llama-server"), args, timeout=max(10.0, min(180.0, deadline - t0))) as srv:
        row.load_s = time.monotonic() - t0
        for i in range(repeats + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"time budget spent after {i} of {repeats + 1} requests")
            t = timed_completion(srv, prompt, n_predict, timeout=min(300.0, left))
            if i > 0:  # the first is a warm-up: first touch of weights, thread pool start, graph allocation
                _record(row, t)
    _summarize(row)
    return row


def run_interleaved(
    points: list[Point], model_path: str, prompt: str, n_predict: int, repeats: int, deadline: float
) -> list[Row]:
    """All servers up at once (idle ones sleep), one request to each per round, so drift in the
    machine's load spreads over every row instead of landing on the last ones."""
    rows = [Row(p.label, p.threads, p.ubatch, p.fa, p.load_mode, p.repack) for p in points]
    with contextlib.ExitStack() as stack:
        servers: dict[int, LlamaServer] = {}
        for i, pt in enumerate(points):
            t0 = time.monotonic()
            try:
                args = with_endpoint(pt.args, model_path, free_port())
                srv = LlamaServer(llama_bin("llama-server"), args, timeout=max(10.0, min(180.0, deadline - t0)))
                servers[i] = stack.enter_context(srv)
                rows[i].load_s = time.monotonic() - t0
            except Exception as exc:  # noqa: BLE001 - a failed point is reported, the rest go on
                rows[i].error = str(exc).splitlines()[0]
        for rnd in range(repeats + 1):
            live = sorted(servers)
            live = live[rnd % len(live) :] + live[: rnd % len(live)] if live else live  # rotate the order
            for i in live:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    t = timed_completion(servers[i], prompt, n_predict, timeout=min(300.0, left))
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    rows[i].error = str(exc).splitlines()[0]
                    servers.pop(i).stop()
                    continue
                if rnd > 0:
                    _record(rows[i], t)
            print(f"# round {rnd}/{repeats} done ({'warm-up' if rnd == 0 else 'timed'})", file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                break
    for r in rows:
        if not r.error and not r.samples:
            r.error = "skipped: budget"
        elif r.samples:
            r.error = ""
            _summarize(r)
    return rows


def _record(row: Row, t: dict[str, float]) -> None:
    row.prompt_n, row.predicted_n = int(t["prompt_n"]), int(t["predicted_n"])
    row.samples.append((t["prompt_per_second"], t["predicted_per_second"]))


def _summarize(row: Row) -> None:
    row.prompt_tps = statistics.median(s[0] for s in row.samples)
    row.decode_tps = statistics.median(s[1] for s in row.samples)


# ---- main ------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def print_table(rows: list[Row], bound_tps: float) -> None:
    ok = [r for r in rows if not r.error]
    best_p = max((r.prompt_tps for r in ok), default=0.0) or 1.0
    best_d = max((r.decode_tps for r in ok), default=0.0) or 1.0
    head = (
        f"{'config':<12} {'t':>3} {'ub':>4} {'fa':>3} {'load':>4} {'repack':>6} {'load_s':>6} {'n':>2} "
        f"{'prompt t/s':>10} {'x best':>6} {'decode t/s':>10} {'x best':>6} {'of bound':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cfg = f"{r.label:<12} {r.threads:>3} {r.ubatch:>4} {r.fa:>3} {r.load_mode:>4} {r.repack:>6}"
        if r.error:
            print(f"{cfg} FAILED: {r.error:.120}")
            continue
        print(
            f"{cfg} {r.load_s:>6.1f} {len(r.samples):>2} {r.prompt_tps:>10.1f} {r.prompt_tps / best_p:>6.2f} "
            f"{r.decode_tps:>10.2f} {r.decode_tps / best_d:>6.2f} {r.decode_tps / bound_tps:>7.0%}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen35-0.8b")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed requests per server (after one warm-up)")
    ap.add_argument("--prompt-words", type=int, default=300)
    ap.add_argument("--n-predict", type=int, default=32)
    ap.add_argument("--grid", choices=["axes", "full"], default="axes")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ubatch", default="128,512")
    ap.add_argument("--fa", default="on,off")
    ap.add_argument("--load-modes", default="mmap,none")
    ap.add_argument("--repack", default="on,off")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run; later points are skipped")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one server at a time (less memory; drift in the machine's load then lands on the later rows)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny model, 2-point grid, for smoke testing")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.grid, a.repeats, a.budget = "qwen35-tiny", "axes", 2, min(a.budget, 60.0)
        a.ubatch, a.fa, a.load_modes, a.repack = "", "", "", ""
        a.threads = "1"
    start = time.monotonic()
    deadline = start + a.budget

    path = ensure_model(a.model, a.quant)
    facts = facts_from_header(read_gguf(path))
    cpus = len(os.sched_getaffinity(0))
    node = NodeFacts(name="bench", cpu_millis=cpus * 1000, memory_bytes=None)
    res = plan(facts, node, Policy(context=a.context), model_path=str(path))
    points = build_points(
        res.plan.args,
        str(path),
        a.grid,
        _ints(a.threads),
        _ints(a.ubatch),
        [x for x in a.fa.split(",") if x],
        [x for x in a.load_modes.split(",") if x],
        [x == "on" for x in a.repack.split(",") if x],
    )

    bw_before = copy_bandwidth()
    per_token = bytes_per_token(facts)
    prompt = filler_prompt(a.prompt_words)
    print(
        f"# {a.model} {a.quant}: {facts.weights_bytes / MiB:.1f} MiB weights, {per_token / MiB:.1f} MiB read per "
        f"token; ctx {a.context}; {cpus} CPUs; load avg {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(f"# plan: {' '.join(res.plan.args)}", flush=True)

    if a.sequential:
        rows: list[Row] = []
        for pt in points:
            if time.monotonic() >= deadline:
                rows.append(
                    Row(pt.label, pt.threads, pt.ubatch, pt.fa, pt.load_mode, pt.repack, error="skipped: budget")
                )
                continue
            try:
                row = run_point(pt, str(path), prompt, a.n_predict, a.repeats, deadline)
            except Exception as exc:  # noqa: BLE001 - a failed point is reported, the grid goes on
                row = Row(
                    pt.label, pt.threads, pt.ubatch, pt.fa, pt.load_mode, pt.repack, error=str(exc).splitlines()[0]
                )
            rows.append(row)
            status = row.error or f"prompt {row.prompt_tps:.1f} t/s, decode {row.decode_tps:.2f} t/s"
            print(f"# {pt.label:<12} {' '.join(pt.args[6:])}: {status}", file=sys.stderr, flush=True)
    else:
        rows = run_interleaved(points, str(path), prompt, a.n_predict, a.repeats, deadline)

    bw = max(bw_before, copy_bandwidth())
    bound_tps = bw / per_token
    ok = [r for r in rows if not r.error]
    n_prompt = ok[0].prompt_n if ok else 0
    n_pred = ok[0].predicted_n if ok else 0
    print(
        f"# bandwidth (numpy copy, read+write, best before/after): {bw / 1e9:.2f} GB/s "
        f"-> decode bound {bound_tps:.1f} t/s; prompt {n_prompt} tokens, decode {n_pred} tokens, "
        f"median of up to {a.repeats} (n); {time.monotonic() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}"
    )
    print_table(rows, bound_tps)
    if a.json:
        print(
            json.dumps(
                {"bandwidth_bytes_per_s": bw, "bytes_per_token": per_token, "rows": [asdict(r) for r in rows]},
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
