"""Memory a node's scheduler sees for N models of which K are active, with and without scale to zero (issue 16,
item 5): every number from the operator's own decision (``decide``) for the seed's ModelDeployment on a 16-CPU,
64 GiB node, as rendered: the llama-server pod's request, and the picker and edge pod's (both containers).

    PYTHONPATH=operator python bench/scale_to_zero_memory.py [--models 10] [--active 2]

What it cannot say: the picker's and Envoy's real RSS (the routing e2e measures the picker at about 57 MiB for a
pool of 2 pods); a model at zero requests nothing, so its pod's memory is free for others' requests.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from modelfit import catalog
from modelfit.api import ModelDeploymentSpec, ModelDeploymentStatus
from modelfit.decide import Decision, LoadedFacts, Snapshot, decide
from modelfit.nodes import node_facts_from_k8s, parse_quantity
from modelfit.occupancy import node_facts

SEED: dict[str, Any] = {
    "model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"},
    "context": 16384,
    "parallel": 2,
    "backend": "cpu",
}
NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "cpu-16", "labels": {"kubernetes.io/hostname": "cpu-16", "kubernetes.io/arch": "amd64"}},
    "spec": {},
    "status": {
        "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
        "conditions": [{"type": "Ready", "status": "True"}],
    },
}


def _decide(raw: dict[str, Any]) -> Decision:
    spec = ModelDeploymentSpec.model_validate(raw)
    assert spec.model.catalog is not None and spec.model.quant is not None
    facts = catalog.catalog_facts(spec.model.catalog, spec.model.quant)
    snap = Snapshot(
        meta={"name": "m", "namespace": "bench", "uid": "u", "generation": 1},
        spec=spec,
        old=ModelDeploymentStatus(),
        loaded=LoadedFacts(facts, facts.file_bytes, "catalog"),
        nodes=node_facts([NODE], []),
        pods=[],
        deploy=None,
        now=time.monotonic(),
        inference_pools=True,
        empty=[node_facts_from_k8s(NODE)],
        wall=time.time(),
    )
    return decide(snap)


def _requested(d: Decision, name: str) -> int:
    deploy = next(o for o in d.apply if o["kind"] == "Deployment" and o["metadata"]["name"] == name)
    containers = deploy["spec"]["template"]["spec"]["containers"]
    return sum(int(parse_quantity(c["resources"]["requests"].get("memory", "0"))) for c in containers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--active", type=int, default=2)
    args = ap.parse_args()
    n, k = args.models, args.active
    plain = _decide(SEED)
    zero = _decide({**SEED, "routing": {"mode": "InferencePool"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 1}})
    model = _requested(plain, "m")
    assert model == _requested(zero, "m"), "routing must not change the model pod's request"
    picker = _requested(zero, "m-epp")
    mib = 2**20
    rows = [
        ("Service, always on", n * model, f"{n} x {model / mib:.0f}"),
        ("picker, always on", n * (model + picker), f"{n} x ({model / mib:.0f} + {picker / mib:.0f})"),
        ("picker, scale to zero", k * model + n * picker, f"{k} x {model / mib:.0f} + {n} x {picker / mib:.0f}"),
    ]
    base = rows[0][1]
    print(f"Seed ({SEED['model']['catalog']} {SEED['model']['quant']}, context {SEED['context']}, parallel 2, cpu)")
    print(f"{n} models, {k} active; memory requested on the node (MiB)\n")
    print("| serving | requested MiB | / Service always on | how |")
    print("|---|---|---|---|")
    for label, total, how in rows:
        print(f"| {label} | {total / mib:.0f} | {total / base:.2f} | {how} |")
    print(
        f"\nA model at zero requests {picker / mib:.0f} MiB (its picker and edge) instead of "
        f"{(model + picker) / mib:.0f} MiB; the picker pair costs {picker / model:.0%} of one model's request."
    )


if __name__ == "__main__":
    main()
