"""The real llama-server's peak memory as its context fills, against the plan's two figures.

For each case (a generated model of a real architecture, random weights, and the flags
`modelfit.sizing.plan` chooses; prompt cache off, so nothing but the context grows), one
llama-server is started in a memory cgroup of its own where this machine allows it, and
every slot gets a prompt of token ids that fills about 1%, 10%, 50% and 100% of the
context (each prompt extends the slot's previous one, so a level only processes the new
tokens). After each level the table shows the process' VmHWM, the cgroup's peak (anonymous
memory plus page cache charged to it: what a container limit is held to), the predicted
peak (`memory.total_bytes`) and the context-full figure (`memory.full_context_bytes`), and
the error of the predicted peak against the larger measured one. The model is right when
both figures bound every level and the predicted peak is within a few percent of the
full context.

Under mmap the model file's page cache is dropped first (posix_fadvise), so that the
server is charged for the pages it maps, as a pod that is the first to touch the file is.
Under load mode none the file is read here first, so that its page cache is charged to
this process, as a pod's is to the init container that downloaded it: the server's
cgroup then holds what it allocates, not a reclaimable copy of the file it read.

    python bench/memory_fill.py                        # every case
    python bench/memory_fill.py --cases seed-8k,lfm2 --levels 1,100
    python bench/memory_fill.py --list
    python bench/memory_fill.py --out fill.json        # keep the measurements ...
    python bench/memory_fill.py --replay fill.json     # ... and hold a changed memory model to them
    python bench/memory_fill.py --replay tests/data/memory-fill.json   # the measurements tests/test_memory.py holds
                                                       # the model to (with the models' facts: no files needed)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from modelfit.facts import ModelFacts, facts_from_header
from modelfit.gguf_reader import read_gguf
from modelfit.memory import MiB
from modelfit.nodes import NodeFacts
from modelfit.sizing import PlanResult, Policy, plan
from modelfit_dev.probe import LlamaServer, drop_file_cache, free_port, token_prompt, with_endpoint
from modelfit_dev.synth import ensure_model, llama_bin


@dataclass(frozen=True)
class Case:
    model: str
    quant: str
    context: int
    load_mode: str
    parallel: int
    kv: str
    note: str = ""


CASES: dict[str, Case] = {
    # The seed's shape with the plan's args of the issue (--context 65536 --parallel 4 -ctk q8_0, none);
    # all 24 blocks take minutes per 10% of this context on 2 cores: run it with --levels 1,10.
    "seed-65k": Case("qwen35-0.8b", "Q4_0", 65536, "none", 4, "q8_0", "the seed, all 24 blocks"),
    # Its first 4 blocks (3 Gated DeltaNet + 1 attention): every level at a sixth of the prompt time.
    "seed4l-65k": Case("qwen35-0.8b-4l", "Q4_0", 65536, "none", 4, "q8_0", "seed shape, first 4 blocks"),
    "seed4l-32k": Case("qwen35-0.8b-4l", "Q4_0", 32768, "none", 4, "q8_0", "seed shape, first 4 blocks"),
    "seed4l-8k": Case("qwen35-0.8b-4l", "Q4_0", 8192, "none", 4, "q8_0", "seed shape, first 4 blocks"),
    "lfm2": Case("lfm2-350m", "Q4_0", 8192, "mmap", 1, "f16", "LFM2-350M, hybrid short-conv/attention"),
    "lfm2-6l-32k": Case("lfm2-350m-6l", "Q4_0", 32768, "mmap", 4, "q8_0", "LFM2-350M, first 6 blocks"),
    "gptoss-16k": Case("gpt-oss-2l", "Q4_0", 16384, "mmap", 1, "f16", "gpt-oss-20b widths, 2 blocks, 8 experts"),
    "qwen3-4l-16k": Case("qwen3-0.6b-4l", "Q4_0", 16384, "mmap", 1, "f16", "Qwen3-0.6B dense, first 4 blocks"),
    "qwen3-4l-none": Case("qwen3-0.6b-4l", "Q4_0", 16384, "none", 4, "q8_0", "Qwen3-0.6B dense, first 4 blocks"),
    "gemma3-tiny": Case("gemma3-tiny", "Q4_0", 4096, "mmap", 1, "f16", "sliding window, tiny widths (runtime-bound)"),
}


@dataclass
class Row:
    case: str
    level_pct: float
    cells: int  # KV cells the prompts hold, all slots
    processed: int  # prompt tokens this level processed (the rest came from the slots' caches)
    seconds: float
    vm_hwm: int
    cgroup_peak: int
    rss_anon: int
    rss_file: int
    predicted: int
    full_context: int

    @property
    def measured(self) -> int:
        return max(self.vm_hwm, self.cgroup_peak)

    @property
    def error_pct(self) -> float:
        return 100 * (self.predicted / self.measured - 1)

    @property
    def full_error_pct(self) -> float:
        return 100 * (self.full_context / self.measured - 1)


def planned(case: Case) -> tuple[Path, ModelFacts, PlanResult]:
    """The case's model file, facts and plan (prompt cache off: only the context grows)."""
    path = ensure_model(case.model, case.quant)
    facts = facts_from_header(read_gguf(path))
    policy = Policy(
        context=case.context,
        parallel=case.parallel,
        kv_cache_type=case.kv,
        load_mode=case.load_mode,
        cache_ram_mib=0,
    )
    res = plan(facts, NodeFacts(name="bench", cpu_millis=2000, memory_bytes=None), policy, model_path=str(path))
    return path, facts, res


def run_case(name: str, case: Case, levels: list[float], budget: float, rows: list[Row]) -> None:
    """Measure the case's levels into ``rows`` (the levels done stay there if a later one fails)."""
    path, facts, res = planned(case)
    mem = res.memory
    ctx, np_ = res.plan.context, res.plan.parallel
    print(
        f"# {name}: {case.model} {case.quant} -c {ctx} -np {np_} -ctk {res.plan.kv_cache_type} "
        f"--load-mode {res.plan.load_mode} ({case.note}); predicted {mem.total_bytes / MiB:.1f} MiB "
        f"(anon {mem.anon_bytes / MiB:.1f}, file {mem.weights_file_bytes / MiB:.1f}), "
        f"context full {mem.full_context_bytes / MiB:.1f} MiB (compute reserve {mem.compute_reserve_bytes / MiB:.1f})",
        flush=True,
    )
    if res.plan.load_mode != "none":
        drop_file_cache(path)
    else:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    t_case = time.monotonic()
    args = with_endpoint(res.plan.args, str(path), free_port())
    with LlamaServer(llama_bin("llama-server"), args, cgroup=True) as srv:
        if srv.cgroup is None:
            print("# no memory cgroup of our own here: cgroup peak not measured", flush=True)
        rate = 0.0  # processed tokens per second, from the last level
        done = 0
        for level in levels:
            per_slot = max(1, int(level / 100 * ctx / np_) - 1)
            todo = (per_slot * np_) - done
            left = budget - (time.monotonic() - t_case)
            # attention makes each token dearer as the context fills: twice the last level's rate is a safe guess
            if rate and 2 * todo / rate > left:
                print(f"# {name} {level:g}%: skipped, about {2 * todo / rate:.0f} s of prompt, {left:.0f} s left")
                break
            t0 = time.monotonic()
            # n_predict 0: the slot then holds exactly its prompt, which the next level extends (no rollback,
            # which a recurrent state could not do: it would reprocess the whole prompt)
            prompts = [token_prompt(per_slot, facts.n_vocab, seed=i) for i in range(np_)]
            m = srv.measure(prompts, n_predict=0, timeout=max(left, 60.0))
            dt = time.monotonic() - t0
            processed = m.prompt_tokens
            done = per_slot * np_
            rate = max(processed, 1) / dt
            row = Row(
                name,
                level,
                done,
                processed,
                dt,
                m.vm_hwm,
                m.cgroup_peak,
                m.rss_anon,
                m.rss_file,
                mem.total_bytes,
                mem.full_context_bytes,
            )
            rows.append(row)
            _print_row(row)


def replanned(case: Case, facts: ModelFacts) -> PlanResult:
    """The case's plan from frozen facts (tests/data/memory-fill.json): no model file needed."""
    policy = Policy(
        context=case.context, parallel=case.parallel, kv_cache_type=case.kv, load_mode=case.load_mode, cache_ram_mib=0
    )
    return plan(facts, NodeFacts(name="bench", cpu_millis=2000, memory_bytes=None), policy, model_path="/m.gguf")


def replay(saved: list[dict[str, Any]] | dict[str, Any]) -> list[Row]:
    """Rows measured earlier with today's predictions (each case re-planned with the memory model as it is).

    ``saved`` is an --out file (a list of rows: the models are generated to plan them) or the form of
    tests/data/memory-fill.json ({"cases", "facts", "rows"}: planned from the frozen facts)."""
    names = {f.name for f in fields(Row)}
    predicted: dict[str, tuple[int, int]] = {}
    rows = []
    for d in saved["rows"] if isinstance(saved, dict) else saved:
        row = Row(**{k: d.get(k, 0) for k in names})
        if row.case not in predicted:
            if isinstance(saved, dict):
                case = Case(**saved["cases"][row.case])
                facts = ModelFacts.model_validate(saved["facts"][f"{case.model}-{case.quant}"])
                mem = replanned(case, facts).memory
            else:
                mem = planned(CASES[row.case])[2].memory
            predicted[row.case] = (mem.total_bytes, mem.full_context_bytes)
        row.predicted, row.full_context = predicted[row.case]
        rows.append(row)
        _print_row(row)
    return rows


HEADER = (
    f"{'case':<14} {'fill':>5} {'cells':>7} {'new':>6} {'s':>5} {'anon':>7} {'file':>6} {'VmHWM':>8} {'cgroup':>8} "
    f"{'predicted':>9} {'err%':>6} {'ctx full':>8} {'err%':>6}"
)


def _print_row(r: Row) -> None:
    print(
        f"{r.case:<14} {r.level_pct:>4g}% {r.cells:>7} {r.processed:>6} {r.seconds:>5.0f} {r.rss_anon / MiB:>7.1f} "
        f"{r.rss_file / MiB:>6.1f} {r.vm_hwm / MiB:>8.1f} "
        f"{(r.cgroup_peak / MiB if r.cgroup_peak else float('nan')):>8.1f} {r.predicted / MiB:>9.1f} "
        f"{r.error_pct:>+6.2f} {r.full_context / MiB:>8.1f} {r.full_error_pct:>+6.2f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--levels", default="1,10,50,100", help="context fill, percent")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per case; later levels are skipped")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", type=Path, help="write the rows (measurements and predictions) here as JSON")
    ap.add_argument("--replay", type=Path, help="re-predict the rows of an earlier --out; runs no server")
    a = ap.parse_args(argv)
    if a.list:
        for k, c in CASES.items():
            print(f"{k:<14} {c.model} {c.quant} -c {c.context} -np {c.parallel} -ctk {c.kv} {c.load_mode}: {c.note}")
        return 0
    levels = sorted(float(x) for x in a.levels.split(","))
    rows: list[Row] = []
    print(HEADER, flush=True)
    if a.replay:
        rows = replay(json.loads(a.replay.read_text()))
    for name in [] if a.replay else a.cases.split(","):
        try:
            run_case(name, CASES[name], levels, a.budget, rows)
        except Exception as exc:  # noqa: BLE001 - a failed case is reported, the others go on
            print(f"# {name}: FAILED {exc!s:.400}", file=sys.stderr, flush=True)
        if a.out:
            a.out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if rows:
        under = [r for r in rows if r.error_pct < 0]
        full_under = [r for r in rows if r.full_error_pct < 0]
        print(
            f"\npoints {len(rows)}; predicted peak under measured at {len(under)} "
            f"(worst {min(r.error_pct for r in rows):+.2f}%), context-full figure under at {len(full_under)}; "
            f"most over {max(r.error_pct for r in rows):+.2f}%"
        )
    return 0 if rows and not any(r.full_error_pct < 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
