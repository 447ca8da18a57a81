"""Prompt and decode speed of the real llama-server: the plan's flags against the defaults and a small grid.

For one generated model (real architecture and shapes, random weights) this runs
llama-server with

  * `plan`      the flags `modelfit.sizing.plan` chooses (`plan.args`),
  * `defaults`  llama-server's own defaults (only -m, --host and --port),
  * a grid      around the plan: threads, ubatch, flash attention, load mode,
                weight repacking and transparent huge pages for llama.cpp's
                buffers (the plan's env, GLIBC_TUNABLES=glibc.malloc.hugetlb=1).
                `--grid axes` (the default) changes one of them at a time from
                the plan's value; `--grid full` runs every combination (much longer).

All servers are started up front and served round-robin: one warm-up round, then
`--repeats` timed rounds, one request per server each (same prompt, no prompt
cache, EOS ignored so every request decodes `--n-predict` tokens); a row shows
the medians of llama-server's own `timings`. Interleaving spreads drift in a
shared machine's load over all rows; `--sequential` runs one server at a time
(less memory, for big models). In the same
run the memory bandwidth of this machine is measured (numpy copies of 256 MiB
arrays in 1..N threads at once, best of a few, counting read + write) and turned
into a decode bound: bandwidth / bytes of weights read per generated token
(``sizing.decode_bytes_per_token``: all weights of a dense model, the active
experts of a MoE, one row of an untied token embedding; the KV cache read is
left out, it is small at these prompt lengths). A second table gives the threads
curve: decode and prompt speed per thread count, and the weight bytes per second
one thread streams (decode t/s x bytes per token / threads): the constant of the
planner's threads rule (``sizing.THREAD_DECODE_BYTES_PER_S``). The plan is made
for this machine's CPUs with the policy's default bandwidth, or with the one
measured here (``--node-bandwidth measured``, as a node label would give it).

    python bench/serving_speed.py                          # qwen35-0.8b Q4_0, axes grid
    python bench/serving_speed.py --model llama-3.2-1b --grid full --budget 1200
    python bench/serving_speed.py --quick                  # tiny model, 2-point grid (smoke test)
    python bench/serving_speed.py --grid axes --ubatch '' --fa '' --load-modes '' --repack '' --thp ''  # threads only
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from modelfit.facts import ModelFacts, facts_from_header
from modelfit.gguf_reader import read_gguf
from modelfit.memory import ServerConfig
from modelfit.nodes import NodeFacts
from modelfit.sizing import THP_ENV, Policy, decode_bytes_per_token, plan
from modelfit_dev.probe import LlamaServer, filler_prompt, free_port, with_endpoint
from modelfit_dev.synth import ensure_model, llama_bin

MiB = 1 << 20


# ---- memory bandwidth and the decode bound ---------------------------------------------------


def copy_bandwidth(threads: int = 1, nbytes: int = 256 * MiB, runs: int = 3) -> float:
    """Bytes per second of `threads` numpy copies at once, each of its own arrays (read + write counted), best of
    `runs`. numpy releases the GIL while it copies, so the threads stream in parallel."""
    srcs = [np.ones(nbytes // 8, dtype=np.float64) for _ in range(threads)]
    dsts = [np.empty_like(s) for s in srcs]
    for s, d in zip(srcs, dsts, strict=True):
        np.copyto(d, s)  # fault the pages in
    best = float("inf")
    for _ in range(runs):
        start = threading.Barrier(threads + 1)

        def work(i: int) -> None:
            start.wait()
            np.copyto(dsts[i], srcs[i])

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes * threads / best


def machine_bandwidth(cpus: int) -> tuple[float, float]:
    """(one thread's, the machine's best) copy bandwidth over 1, 2, 4, ... cpus threads."""
    counts = sorted({1, cpus, *(c for c in (2, 4, 8, 16, 32, 64) if c < cpus)})
    found = {c: copy_bandwidth(c) for c in counts}
    return found[1], max(found.values())


def bytes_per_token(facts: ModelFacts) -> int:
    """Weight bytes one decode step on the CPU reads (the planner's own count)."""
    return decode_bytes_per_token(facts, ServerConfig(n_ctx=facts.context_length))


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
    env: dict[str, str] = field(default_factory=dict)  # environment of the server (the plan's env)

    @property
    def thp(self) -> str:
        return "on" if self.env.get("GLIBC_TUNABLES") == THP_ENV["GLIBC_TUNABLES"] else "off"

    def row(self, error: str = "") -> Row:
        return Row(self.label, self.threads, self.ubatch, self.fa, self.load_mode, self.repack, self.thp, error=error)


@dataclass
class Row:
    label: str
    threads: str
    ubatch: str
    fa: str
    load_mode: str
    repack: str
    thp: str
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


def describe(label: str, args: list[str], env: dict[str, str]) -> Point:
    return Point(
        label=label,
        args=args,
        threads=_flag(args, "-t"),
        ubatch=_flag(args, "-ub"),
        fa=_flag(args, "-fa"),
        load_mode=_flag(args, "--load-mode"),
        repack="off" if "--no-repack" in args else "on",
        env=env,
    )


def with_thp(env: dict[str, str], on: bool) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k not in THP_ENV}
    return {**out, **THP_ENV} if on else out


def build_points(
    plan_args: list[str],
    plan_env: dict[str, str],
    model_path: str,
    grid: str,
    threads: list[int],
    ubatches: list[int],
    fas: list[str],
    modes: list[str],
    repacks: list[bool],
    thps: list[bool],
) -> list[Point]:
    p_t, p_ub = int(_flag(plan_args, "-t")), int(_flag(plan_args, "-ub"))
    p_fa, p_lm = _flag(plan_args, "-fa"), _flag(plan_args, "--load-mode")
    p_rp = "--no-repack" not in plan_args
    base = variant(plan_args, p_t, p_ub, p_fa, p_lm, p_rp)
    points = [describe("plan", base, plan_env)]
    defaults = Point(label="defaults", args=["-m", model_path, "--host", "127.0.0.1", "--port", "0"])
    points.append(defaults)
    combos: list[tuple[str, list[str], dict[str, str]]] = []
    if grid == "axes":
        env = plan_env
        for t in threads:
            combos.append((f"t={t}", variant(base, t, p_ub, p_fa, p_lm, p_rp), env))
        for ub in ubatches:
            combos.append((f"ub={ub}", variant(base, p_t, ub, p_fa, p_lm, p_rp), env))
        for fa in fas:
            combos.append((f"fa={fa}", variant(base, p_t, p_ub, fa, p_lm, p_rp), env))
        for lm in modes:
            combos.append((f"lm={lm}", variant(base, p_t, p_ub, p_fa, lm, p_rp), env))
        for rp in repacks:
            combos.append((f"repack={'on' if rp else 'off'}", variant(base, p_t, p_ub, p_fa, p_lm, rp), env))
        for on in thps:
            combos.append((f"thp={'on' if on else 'off'}", base, with_thp(plan_env, on)))
    else:
        thp_options: list[bool | None] = [*thps] or [None]  # None: the plan's own environment
        for t, ub, fa, lm, rp, thp in itertools.product(threads, ubatches, fas, modes, repacks, thp_options):
            env = plan_env if thp is None else with_thp(plan_env, thp)
            combos.append(("grid", variant(base, t, ub, fa, lm, rp), env))
    seen = {(tuple(base), tuple(sorted(plan_env.items())))}
    for label, args, env in combos:
        key = (tuple(args), tuple(sorted(env.items())))
        if key in seen:
            continue  # the plan's own setting (or a repeat) runs once
        seen.add(key)
        points.append(describe(label, args, env))
    return points


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """The server's environment: this process' with THP_ENV's keys as `env` says (Popen copies it at start)."""
    saved = {k: os.environ.get(k) for k in THP_ENV}
    for k in THP_ENV:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def start_server(pt: Point, model_path: str, timeout: float) -> Iterator[LlamaServer]:
    """A started llama-server for a point, stopped on exit (entered once: a second __enter__ would start
    a second process on the same port and lose the first one's handle)."""
    args = with_endpoint(pt.args, model_path, free_port())
    srv = LlamaServer(llama_bin("llama-server"), args, timeout=timeout)
    with environment(pt.env):
        srv.__enter__()
    try:
        yield srv
    finally:
        srv.stop()


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
    row = pt.row()
    t0 = time.monotonic()
    with start_server(pt, model_path, timeout=max(10.0, min(180.0, deadline - t0))) as srv:
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
    rows = [p.row() for p in points]
    with contextlib.ExitStack() as stack:
        servers: dict[int, LlamaServer] = {}
        for i, pt in enumerate(points):
            t0 = time.monotonic()
            try:
                servers[i] = stack.enter_context(
                    start_server(pt, model_path, timeout=max(10.0, min(180.0, deadline - t0)))
                )
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


def thread_counts(spec: str, cpus: int) -> list[int]:
    """`auto`: 1, 2, 3, 4, 6, 8, 12, 16, ... up to this machine's CPUs (and all of them)."""
    if spec != "auto":
        return _ints(spec)
    steps = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    return sorted({*(t for t in steps if t < cpus), cpus})


def print_table(rows: list[Row], bound_tps: float) -> None:
    ok = [r for r in rows if not r.error]
    best_p = max((r.prompt_tps for r in ok), default=0.0) or 1.0
    best_d = max((r.decode_tps for r in ok), default=0.0) or 1.0
    head = (
        f"{'config':<12} {'t':>3} {'ub':>4} {'fa':>3} {'load':>4} {'repack':>6} {'thp':>3} {'load_s':>6} {'n':>2} "
        f"{'prompt t/s':>10} {'x best':>6} {'decode t/s':>10} {'x best':>6} {'of bound':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        cfg = f"{r.label:<12} {r.threads:>3} {r.ubatch:>4} {r.fa:>3} {r.load_mode:>4} {r.repack:>6} {r.thp:>3}"
        if r.error:
            print(f"{cfg} FAILED: {r.error:.120}")
            continue
        print(
            f"{cfg} {r.load_s:>6.1f} {len(r.samples):>2} {r.prompt_tps:>10.1f} {r.prompt_tps / best_p:>6.2f} "
            f"{r.decode_tps:>10.2f} {r.decode_tps / best_d:>6.2f} {r.decode_tps / bound_tps:>7.0%}"
        )


def print_threads_curve(rows: list[Row], per_token: int, bandwidth: float) -> None:
    """Decode and prompt speed by thread count, with the plan's other settings (the t=N rows and the plan)."""
    plan_row = next((r for r in rows if r.label == "plan" and not r.error), None)
    if plan_row is None:
        return
    same = [
        r
        for r in rows
        if not r.error
        and (r.label == "plan" or r.label.startswith("t="))
        and (r.ubatch, r.fa, r.load_mode, r.repack, r.thp)
        == (plan_row.ubatch, plan_row.fa, plan_row.load_mode, plan_row.repack, plan_row.thp)
    ]
    by_t = {int(r.threads): r for r in same if r.threads.isdigit()}
    if len(by_t) < 2:
        return
    bound = bandwidth / per_token
    print(f"\nthreads curve (the plan's settings; bound = {bandwidth / 1e9:.1f} GB/s / {per_token / MiB:.1f} MiB)")
    print(f"{'threads':>7} {'decode t/s':>10} {'prompt t/s':>10} {'GB/s/thread':>11} {'bound t/s':>9} {'of bound':>8}")
    for t, r in sorted(by_t.items()):
        per_thread = r.decode_tps * per_token / t / 1e9
        print(
            f"{t:>7} {r.decode_tps:>10.2f} {r.prompt_tps:>10.1f} {per_thread:>11.2f} {bound:>9.1f} "
            f"{r.decode_tps / bound:>7.0%}"
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
    ap.add_argument("--threads", default="auto", help="thread counts; auto: 1, 2, 3, 4, 6, 8, ... up to the CPUs")
    ap.add_argument("--ubatch", default="128,512")
    ap.add_argument("--fa", default="on,off")
    ap.add_argument("--load-modes", default="mmap,none")
    ap.add_argument("--repack", default="on,off")
    ap.add_argument("--thp", default="on,off", help="transparent huge pages for llama.cpp's buffers (THP_ENV)")
    ap.add_argument(
        "--node-bandwidth",
        choices=["policy", "measured"],
        default="policy",
        help="plan with the policy's default memory bandwidth, or with the one measured here (as a node label)",
    )
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
        a.ubatch, a.fa, a.load_modes, a.repack, a.thp = "", "", "", "", ""
        a.threads = "1"
    start = time.monotonic()
    deadline = start + a.budget

    path = ensure_model(a.model, a.quant)
    facts = facts_from_header(read_gguf(path))
    cpus = len(os.sched_getaffinity(0))
    bw_one, bw_before = machine_bandwidth(cpus)
    measured = int(bw_before) if a.node_bandwidth == "measured" else None
    node = NodeFacts(name="bench", cpu_millis=cpus * 1000, memory_bytes=None, memory_bandwidth_bytes=measured)
    res = plan(facts, node, Policy(context=a.context), model_path=str(path))
    points = build_points(
        res.plan.args,
        res.plan.env,
        str(path),
        a.grid,
        thread_counts(a.threads, cpus),
        _ints(a.ubatch),
        [x for x in a.fa.split(",") if x],
        [x for x in a.load_modes.split(",") if x],
        [x == "on" for x in a.repack.split(",") if x],
        [x == "on" for x in a.thp.split(",") if x],
    )

    per_token = bytes_per_token(facts)
    prompt = filler_prompt(a.prompt_words)
    print(
        f"# {a.model} {a.quant}: {facts.weights_bytes / MiB:.1f} MiB weights, {per_token / MiB:.1f} MiB read per "
        f"token; ctx {a.context}; {cpus} CPUs; load avg {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    env = " ".join(f"{k}={v}" for k, v in res.plan.env.items())
    print(f"# plan: {env + ' ' if env else ''}{' '.join(res.plan.args)}", flush=True)
    print(f"# {next(x for x in res.reasons if x.startswith('threads'))}", flush=True)

    if a.sequential:
        rows: list[Row] = []
        for pt in points:
            if time.monotonic() >= deadline:
                rows.append(pt.row(error="skipped: budget"))
                continue
            try:
                row = run_point(pt, str(path), prompt, a.n_predict, a.repeats, deadline)
            except Exception as exc:  # noqa: BLE001 - a failed point is reported, the grid goes on
                row = pt.row(error=str(exc).splitlines()[0])
            rows.append(row)
            status = row.error or f"prompt {row.prompt_tps:.1f} t/s, decode {row.decode_tps:.2f} t/s"
            print(f"# {pt.label:<12} {' '.join(pt.args[6:])}: {status}", file=sys.stderr, flush=True)
    else:
        rows = run_interleaved(points, str(path), prompt, a.n_predict, a.repeats, deadline)

    bw = max(bw_before, machine_bandwidth(cpus)[1])
    bound_tps = bw / per_token
    ok = [r for r in rows if not r.error]
    n_prompt = ok[0].prompt_n if ok else 0
    n_pred = ok[0].predicted_n if ok else 0
    print(
        f"# bandwidth (numpy copies in 1..{cpus} threads, read+write, best before/after): {bw / 1e9:.2f} GB/s "
        f"(one thread {bw_one / 1e9:.2f} GB/s) "
        f"-> decode bound {bound_tps:.1f} t/s; prompt {n_prompt} tokens, decode {n_pred} tokens, "
        f"median of up to {a.repeats} (n); {time.monotonic() - start:.0f} s; load avg {os.getloadavg()[0]:.2f}"
    )
    print_table(rows, bound_tps)
    print_threads_curve(rows, per_token, bw)
    if a.json:
        print(
            json.dumps(
                {
                    "bandwidth_bytes_per_s": bw,
                    "bandwidth_one_thread_bytes_per_s": bw_one,
                    "bytes_per_token": per_token,
                    "plan_env": res.plan.env,
                    "rows": [asdict(r) for r in rows],
                },
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
