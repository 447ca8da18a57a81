"""Tokens/s and time-to-first-token as offered load rises, with load-based autoscaling off and on.

For one generated model (real architecture and shapes, random weights), llama-server processes run on
this machine, one per replica, each pinned to its own CPU set as a pod on its own node would be (the
operator sizes threads from a node's CPUs and places one right-sized pod per node). The offered load is
``clients`` closed-loop clients sending streamed chat completions back to back (fixed prompt, EOS
ignored so every request decodes ``--max-tokens``, each prompt unique so no prefix is reused), spread
round-robin over the replicas as a Service would.

  off  one replica, whatever the load.
  on   the HPA the operator renders, run as a loop here: every --sync seconds it reads each replica's
       /metrics (llamacpp:requests_processing + llamacpp:requests_deferred, the adapter's
       llamacpp_requests_inflight), averages over replicas, and sets
       desired = ceil(replicas x average / target) within [1, --max-replicas] (10% tolerance, as KCM's
       controller; scale-down stabilization --scale-down-window), target = parallel x targetUtilization / 100.
       A replica added starts a new llama-server (its start time is part of the run); a replica removed
       finishes its requests first.

A row is measured after a warm-up (--warmup s, and until every replica the controller added is ready) for
--window s. It shows the replicas at the end, completed requests, generated tokens/s, TTFT p50/p95 (the
queueing shows here: a request waits for a free slot before its first token; one still waiting when the
window closes counts with its wait so far) and request latency p50. On a shared machine the numbers move
with its load average (printed): compare rows of one run.

    python bench/autoscaling_load.py              # qwen3-tiny Q4_0 (384 tokens ~0.2 s), clients 1 2 4 6 (~4 min)
    python bench/autoscaling_load.py --model qwen3-0.6b --max-tokens 16 --window 40   # a real shape: quiet machine
    python bench/autoscaling_load.py --quick      # a smoke test (~1 min)

The tiny model keeps the bench short and its statistics stable on a shared 2-core machine (a 0.6B model
decodes ~10 tokens/s per core here, so a window holds only a handful of requests); what the table shows,
queueing against slots and replicas, depends on the ratio of offered load to capacity, not on the model.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))
sys.path.insert(0, str(ROOT / "operator"))

from _metrics import ChatLoad, free_port  # noqa: E402
from modelfit_dev.synth import ensure_model, llama_bin  # noqa: E402

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_GAUGE = re.compile(rb"^llamacpp:requests_(processing|deferred) ([0-9.e+-]+)$", re.M)


class Replica:
    """One llama-server, pinned to ``cpus`` (taskset), with ``-t len(cpus)`` as the operator would plan."""

    def __init__(self, model: Path, cpus: list[int], parallel: int, ctx: int, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cpus = cpus
        args = [
            "taskset", "-c", ",".join(map(str, cpus)), str(llama_bin("llama-server")), "-m", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), "-c", str(ctx * parallel), "-np", str(parallel),
            "-t", str(len(cpus)), "--metrics", "--no-webui", "--cache-ram", "0",
        ]  # fmt: skip
        self.log = open(log_dir / f"llama-{self.port}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.ready = False

    def poll_ready(self) -> bool:
        if not self.ready:
            try:
                with _NO_PROXY.open(f"{self.url}/health", timeout=2) as r:
                    self.ready = r.status == 200
            except OSError:
                pass
        return self.ready

    def inflight(self) -> float:
        with _NO_PROXY.open(f"{self.url}/metrics", timeout=5) as r:
            return sum(float(v) for _, v in _GAUGE.findall(r.read()))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


class Fleet:
    """Replicas on disjoint CPU sets ("nodes"), and an HPA-style controller over them."""

    def __init__(self, model: Path, args: argparse.Namespace, log_dir: Path) -> None:
        self.model, self.args, self.log_dir = model, args, log_dir
        ncpu = len(os.sched_getaffinity(0))
        per = args.cpus_per_replica
        self.slots = [list(range(i * per, (i + 1) * per)) for i in range(max(1, ncpu // per))]
        self.replicas: list[Replica] = []
        self.draining: list[Replica] = []
        self.target = args.parallel * args.target_utilization / 100
        self.decisions: list[tuple[float, int, int, float]] = []  # (t, from, to, avg)
        self.recommendations: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def scale(self, n: int) -> None:
        while len(self.replicas) < n:
            used = {c for r in self.replicas + self.draining for c in r.cpus}
            free = [s for s in self.slots if not used & set(s)]
            if not free:  # a removed replica still finishing its requests holds its CPUs: stop it now
                self._retire(self.draining[0], wait=0)
                continue
            self.replicas.append(Replica(self.model, free[0], self.args.parallel, self.args.ctx, self.log_dir))
        while len(self.replicas) > n:
            r = self.replicas.pop()  # out of the Service first; its requests finish, then it stops
            self.draining.append(r)
            threading.Thread(target=self._retire, args=(r,), daemon=True).start()

    def _retire(self, r: Replica, wait: float = 120) -> None:
        end = time.monotonic() + wait
        while time.monotonic() < end and r in self.draining:
            try:
                if r.inflight() == 0:
                    break
            except OSError:
                break
            time.sleep(0.5)
        with self._lock:
            if r not in self.draining:
                return
            self.draining.remove(r)
        r.stop()

    def reset(self) -> None:
        """Back to one replica, at once (between runs, with no load)."""
        self.scale(1)
        for r in list(self.draining):
            self._retire(r, wait=0)

    def urls(self) -> list[str]:
        return [r.url for r in self.replicas if r.poll_ready()]

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not all(r.poll_ready() for r in self.replicas):
            if time.monotonic() > end:
                raise TimeoutError("llama-server did not become ready")
            time.sleep(0.2)

    def max_replicas(self) -> int:
        return min(int(self.args.max_replicas), len(self.slots))

    def autoscale(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop_autoscale(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(15)

    def _loop(self) -> None:
        while not self._stop.wait(self.args.sync):
            ready = [r for r in self.replicas if r.poll_ready()]
            if not ready:
                continue
            try:
                avg = sum(r.inflight() for r in ready) / len(ready)
            except OSError:
                continue
            n = len(self.replicas)
            ratio = avg / self.target
            now = time.monotonic()
            if abs(ratio - 1) <= 0.1:  # KCM's --horizontal-pod-autoscaler-tolerance
                recommendation = n
            else:
                # KCM counts only pods with metrics; a starting replica (no metrics yet) counts as idle going up.
                recommendation = max(1, min(self.max_replicas(), math.ceil(len(ready) * ratio)))
            self.recommendations = [(t, r) for t, r in self.recommendations if t > now - self.args.scale_down_window]
            self.recommendations.append((now, recommendation))
            desired = recommendation
            if desired < n:  # scale-down stabilization: the highest recommendation of the window
                desired = max(r for _, r in self.recommendations)
                if len(ready) < n:
                    continue  # never scale in while a replica is still starting
            if desired != n:
                self.decisions.append((time.monotonic(), n, desired, avg))
                self.scale(desired)

    def close(self) -> None:
        self.stop_autoscale()
        for r in self.replicas + self.draining:
            r.stop()
        self.replicas, self.draining = [], []


def run_level(fleet: Fleet, clients: int, autoscale: bool, args: argparse.Namespace) -> dict[str, float]:
    fleet.reset()
    fleet.wait_ready()
    fleet.recommendations = []
    decisions = len(fleet.decisions)
    if autoscale:
        fleet.autoscale()
    load = ChatLoad(fleet.urls, clients=clients, max_tokens=args.max_tokens, prompt=args.prompt, stream=args.stream)
    load.start()
    time.sleep(args.warmup)
    deadline = time.monotonic() + 120
    while not all(r.poll_ready() for r in fleet.replicas) and time.monotonic() < deadline:
        time.sleep(0.5)  # a replica the controller added is still loading its model: not steady yet
    t0 = time.monotonic()
    time.sleep(args.window)
    t1 = time.monotonic()
    replicas = len(fleet.replicas)
    fleet.stop_autoscale()
    load.abort()  # queued requests are cancelled, not waited for
    s = load.summary(since=t0, until=t1)
    s["replicas"] = replicas
    s["errors"] = len(load.errors)
    s["decisions"] = len(fleet.decisions) - decisions
    fleet.reset()
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-tiny")
    p.add_argument("--quant", default="Q4_0")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--target-utilization", type=int, default=80)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--cpus-per-replica", type=int, default=1, help="CPUs of one replica's 'node'")
    p.add_argument("--ctx", type=int, default=1024, help="context per slot")
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--sync", type=float, default=3.0, help="controller period (KCM default 15s)")
    p.add_argument(
        "--scale-down-window",
        type=float,
        default=20.0,
        help="scale-down stabilization, s (spec.autoscaling.scaleDownStabilizationSeconds, default 300 there)",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="streamed responses (client-measured TTFT; costs client CPU per token). Default: TTFT = latency - "
        "llama-server's decode time",
    )
    p.add_argument("--quick", action="store_true", help="two load levels, short windows")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the replicas on the way out
    if args.quick:
        args.clients, args.warmup, args.window = [1, 4], 6.0, 6.0

    model = ensure_model(args.model, args.quant)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"autoscaling-load-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    target = args.parallel * args.target_utilization / 100
    print(
        f"model {model.name}, parallel {args.parallel}, {args.cpus_per_replica} CPU per replica, "
        f"target {target:g} in flight per replica (targetUtilization {args.target_utilization}), "
        f"max {args.max_replicas} replicas, {args.max_tokens} tokens per request; load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )
    fleet = Fleet(model, args, log_dir)
    if fleet.max_replicas() < args.max_replicas:
        print(f"note: only {len(fleet.slots)} CPU sets here, so at most {fleet.max_replicas()} replicas")
    rows: list[tuple[int, str, dict[str, float]]] = []
    t_start = time.monotonic()
    try:
        for clients in args.clients:
            for mode in ("off", "on"):
                s = run_level(fleet, clients, mode == "on", args)
                rows.append((clients, mode, s))
                print(
                    f"  clients {clients} autoscaling {mode}: {s['replicas']:.0f} replicas, {s['tok_s']:.1f} tok/s, "
                    f"TTFT p50 {s['ttft_p50']:.2f}s",
                    flush=True,
                )
    finally:
        fleet.close()
    print(
        "\n| clients | autoscaling | replicas | requests | tokens/s | TTFT p50 (s) | TTFT p95 (s) | latency p50 (s) | scalings |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for clients, mode, s in rows:
        print(
            f"| {clients} | {mode} | {s['replicas']:.0f} | {s['requests']:.0f} | {s['tok_s']:.1f} | "
            f"{s['ttft_p50']:.2f} | {s['ttft_p95']:.2f} | {s['lat_p50']:.2f} | {s['decisions']:.0f} |"
        )
    base = next((s for c, m, s in rows if m == "off" and s["requests"]), None)
    if base:
        bound = 2 * base["ttft_p50"] + 0.05
        for mode in ("off", "on"):
            flat = [c for c, m, s in rows if m == mode and s["requests"] and s["ttft_p50"] <= bound]
            print(
                f"autoscaling {mode}: TTFT p50 within 2x of one client's ({base['ttft_p50']:.2f}s) up to "
                f"{max(flat) if flat else 0} clients"
            )
        print(
            f"(the target, {target:g} in flight per replica, adds a replica once the average exceeds it by 10%, "
            f"up to {fleet.max_replicas()} replicas; beyond {fleet.max_replicas() * args.parallel} clients requests queue)"
        )
    print(f"total {time.monotonic() - t_start:.0f}s; load average {os.getloadavg()[0]:.1f} at the end; logs {log_dir}")


if __name__ == "__main__":
    main()
