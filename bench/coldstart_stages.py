"""The cold start of the seed's shape by stage, measured on the real node against the operator's prediction (issue 16,
item 5): held request -> pod created -> scheduled -> init containers done -> llama-server started -> model loaded ->
Ready -> first token, with the file in the node's cache (page cache warm, then cold) and not cached.

    sudo -E PYTHONPATH=operator python bench/coldstart_stages.py [--runs 2] [--out FILE]

Brings up the e2e harness's control plane and real node (`e2e/bench_coldstart_realnode.py`, needs root and the e2e
builds, as `.ci/run` makes them) and prints one row per wake. Several minutes; a bench, never a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2, help="wakes per condition (default 2)")
    ap.add_argument("--out", default="/tmp/coldstart-stages.md", help="where the table is written")
    ap.add_argument(
        "--kubelet-out", default="/tmp/coldstart-kubelet.md", help="where the kubelet's view (PLEG, probe) is written"
    )
    args = ap.parse_args()
    env = {
        **os.environ,
        "MODELFIT_BENCH_RUNS": str(args.runs),
        "MODELFIT_BENCH_OUT": args.out,
        "MODELFIT_BENCH_KUBELET": args.kubelet_out,
        "MODELFIT_REQUIRE_REALNODE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-s", str(ROOT / "e2e" / "bench_coldstart_realnode.py")]
    rc = subprocess.run(cmd, env=env, cwd=ROOT, check=False).returncode
    if rc == 0:
        print(Path(args.out).read_text())
        print(Path(args.kubelet_out).read_text())
    return rc


if __name__ == "__main__":
    sys.exit(main())
