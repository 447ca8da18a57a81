"""The rules of ``decide``, called as a function: a snapshot in, a Decision out -- no FakeKube, no event loop.

A row of a table names what the shell would have gathered (nodes by ``make_node`` preset name, our pods, the
last status) and what the decision must say: the children to apply, the events, the conditions, the plan
record, when to come back. The shell's own part (apply order against the API, API failures, status patches,
the resync loop) is tested in test_handlers.py.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest

from modelfit import catalog, occupancy
from modelfit.api import Condition, ModelDeploymentStatus
from modelfit.decide import (
    AVOID_SECONDS,
    MAX_RETRY_DELAY,
    OOM_HEADROOM_STEP,
    Decision,
    LoadedFacts,
    Snapshot,
    check_spec,
    decide,
    failure,
    retry_delay,
)
from modelfit.facts import ModelFacts
from modelfit.nodes import NodeShape, node_facts_from_k8s, parse_node_shapes
from modelfit.render import HASH_ANNOTATION
from modelfit.status import condition

Obj = dict[str, Any]
Cond = tuple[str, str, str]  # status, reason, message
Builder = Callable[..., Obj]

NOW = 1000.0  # the snapshot's monotonic clock
SEED = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 32768, "adapt": True}
SMALL = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 8192}
BIG = {"model": {"catalog": "llama-3.1-8b", "quant": "Q8_0"}, "context": 131072}  # no preset node holds it
SHAPE_LABEL = "modelfit.io/node-shape"
HOST = "kubernetes.io/hostname"


# ---- builders -------------------------------------------------------------------------------------


@functools.cache
def _catalog_facts(name: str, quant: str) -> ModelFacts:
    return catalog.catalog_facts(name, quant)


def meta_of(name: str = "qwen", generation: int = 1) -> Obj:
    return {"name": name, "namespace": "default", "uid": "uid-1", "generation": generation}


def snapshot(
    spec: Obj,
    nodes: list[Obj],
    *,
    name: str = "qwen",
    generation: int = 1,
    old: ModelDeploymentStatus | None = None,
    pods: list[Obj] | None = None,
    others: list[Obj] | None = None,
    deploy: Obj | None = None,
    shapes: list[NodeShape] | None = None,
    avoid: dict[Any, float] | None = None,
    seen_generation: int | None = None,
    missing: Condition | None = None,
    failures: int = 0,
) -> Snapshot:
    """What the shell gathers for a catalog model (planned from the catalog's facts, as in every unit test):
    ``nodes`` less what ``others`` (other tenants' pods) request; our own ``pods`` count as free."""
    meta = meta_of(name, generation)
    checked = check_spec(meta, spec)
    assert not isinstance(checked, tuple), checked
    assert checked.model.catalog is not None
    facts = _catalog_facts(checked.model.catalog, checked.model.quant or "Q4_K_M")
    return Snapshot(
        meta=meta,
        spec=checked,
        old=old if old is not None else ModelDeploymentStatus(),
        loaded=LoadedFacts(facts, facts.file_bytes, "catalog (header unreachable: not read in unit tests)"),
        nodes=occupancy.node_facts(nodes, others or []),
        pods=pods or [],
        deploy=deploy,
        now=NOW,
        shapes=shapes or [],
        empty=[node_facts_from_k8s(n) for n in nodes if occupancy.node_usable(n)],
        avoid=avoid or {},
        seen_generation=seen_generation,
        missing=missing,
        failures=failures,
    )


def conds(decision: Decision) -> dict[str, Cond]:
    return {c.type: (c.status, c.reason, c.message) for c in decision.status.conditions}


def child(decision: Decision, kind: str) -> Obj:
    return next(o for o in decision.apply if o["kind"] == kind)


def deployment(decision: Decision, ready: int = 0, generation: int = 1) -> Obj:
    """The Deployment this decision applied, as the API server gives it back."""
    d = copy.deepcopy(child(decision, "Deployment"))
    d["metadata"]["generation"] = generation
    replicas = int(d["spec"]["replicas"])
    d["status"] = {
        "replicas": replicas,
        "readyReplicas": ready,
        "updatedReplicas": replicas,
        "observedGeneration": generation,
    }
    return d


def template(deploy: Obj) -> str:
    return str(deploy["spec"]["template"]["metadata"]["annotations"][HASH_ANNOTATION])


def after(decision: Decision, make_pod: Builder, **pod: Any) -> Obj:
    """The next snapshot's ``old``, ``deploy`` and ``pods`` once this decision is applied: its pod runs Ready
    on its plan's node, or is the given pod (of the same template)."""
    deploy = deployment(decision, ready=0 if pod else 1)
    node = decision.status.plan.node_selector.get(HOST)
    pinned = deploy["spec"]["template"]["spec"].get("nodeSelector")
    p = (
        make_pod(template=template(deploy), node_selector=pinned, **pod)
        if pod
        else make_pod(template=template(deploy), node=node, ready=True, node_selector=pinned)
    )
    return {"old": decision.status, "deploy": deploy, "pods": [p]}


def _shapes() -> list[NodeShape]:
    return parse_node_shapes(
        [
            {"name": "tiny", "labels": {SHAPE_LABEL: "tiny"}, "cpu": 2, "memory": "4Gi"},
            {"name": "huge", "labels": {SHAPE_LABEL: "huge"}, "cpu": 64, "memory": "512Gi"},
            {"name": "large", "labels": {SHAPE_LABEL: "large"}, "cpu": "16", "memory": "64Gi"},
        ]
    )


# ---- spec errors (check_spec, failure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spec", "needle"),
    [
        ("qwen", {"model": {"url": "https://x/m.gguf"}, "context": "lots"}, "context"),
        ("qwen", {**SEED, "serverArgs": ["--ctx-size=9", "--jinja"]}, "--ctx-size"),
        ("qwen", {**SEED, "affinity": {"nodeAffinity": "x"}}, "nodeAffinity"),
        (
            "qwen",
            {
                **SEED,
                "affinity": {
                    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": ["x"]}}
                },
            },
            "nodeAffinity",
        ),
        (
            "qwen",
            {
                **SEED,
                "affinity": {
                    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"matchExpressions": []}]}
                },
            },
            "nodeAffinity",
        ),
        ("x" * 64, SEED, "metadata.name"),
        ("1model", SEED, "metadata.name"),
        ("my.model", SEED, "metadata.name"),
        ("-a", SEED, "metadata.name"),
        ("a-", SEED, "metadata.name"),
    ],
    ids=[
        "context-lots",
        "owned-flag",
        "affinity-str",
        "affinity-terms",
        "affinity-list",
        *"long digit dot dash1 dash2".split(),
    ],
)
def test_a_bad_spec_is_planned_false_with_its_reason(name: str, spec: Obj, needle: str) -> None:
    meta = meta_of(name)
    checked = check_spec(meta, spec)
    assert isinstance(checked, tuple)
    d = failure(meta, ModelDeploymentStatus(), *checked, "invalid", failures=3)
    c = conds(d)
    assert c["Planned"][:2] == ("False", "InvalidSpec") and needle in c["Planned"][2]
    assert c["Degraded"][:2] == ("True", "InvalidSpec") and c["Ready"][:2] == ("False", "NotPlanned")
    assert (d.apply, d.delete, d.events, d.result, d.requeue_after) == (
        [],
        [],
        [],
        "invalid",
        None,
    )  # waits for an edit
    assert [level for level, _ in d.logs] == [logging.WARNING]
    again = failure(meta, d.status, *checked, "invalid")
    assert [level for level, _ in again.logs] == [logging.DEBUG]  # the same verdict is not logged twice


def test_a_63_character_name_is_planned(make_node: Builder) -> None:
    d = decide(snapshot(SEED, [make_node("cpu-large")], name="m" * 63))
    assert conds(d)["Planned"][0] == "True"
    assert child(d, "Deployment")["metadata"]["labels"]["modelfit.io/modeldeployment"] == "m" * 63


# ---- a first plan -----------------------------------------------------------------------------------


def test_a_first_plan_applies_its_children_deployment_last(make_node: Builder) -> None:
    d = decide(snapshot(SEED, [make_node("cpu-small"), make_node("cpu-large")]))
    # the Deployment carries the applied hash
    assert [o["kind"] for o in d.apply] == ["ConfigMap", "Service", "Deployment"]
    assert {kind for _, kind, _ in d.delete} == {"PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"}
    plan = d.status.plan
    assert (plan.backend, plan.context, plan.node_class, plan.rollout) == (
        "cpu",
        32768,
        "cpu-large",
        "Surge",
    )
    assert plan.model.startswith("Qwen3.5-0.8B") and plan.quant == "Q4_0" and plan.memory_request.endswith("Mi")
    assert plan.fits is True and plan.facts_source.startswith("catalog")
    container = child(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["-m", "/models/Qwen3.5-0.8B-Q4_0.gguf"]
    assert [reason for reason, _ in d.events] == ["PlanChanged"] and "cpu on cpu-large" in d.events[0][1]
    c = conds(d)
    assert c["Planned"][:2] == ("True", "Planned") and c["Ready"][0] == "False" and c["Progressing"][1] == "RollingOut"
    assert d.status.endpoint == "http://qwen.default.svc:8080" and d.status.observed_generation == 1
    assert (d.result, d.requeue_after, d.replan_soon) == ("progressing", None, False)


def test_planner_warnings_are_in_the_planned_message(make_node: Builder) -> None:
    d = decide(snapshot({**SEED, "context": 16777216, "adapt": False}, [make_node("cpu-large")]))
    planned = conds(d)["Planned"]
    assert planned[1] == "Planned" and "exceeds the model's trained 262144; capped" in planned[2]


# ---- signals: OOM kills, pods the scheduler refuses -------------------------------------------------


def test_each_oom_kill_raises_the_headroom_a_step_up_to_one(make_node: Builder, make_pod: Builder) -> None:
    """An OOM kill of a pod of the current template re-plans with more headroom; a killed pod of an older
    template does not count again; at a boost of 1 the plan stays and Degraded says OOMKilled."""
    nodes = [make_node("cpu-large")]
    d = decide(snapshot(SEED, nodes))
    deploy, killed = deployment(d), []
    for round_, boost in enumerate([0.25, 0.5, 0.75, 1.0, 1.0], start=1):
        killed.append(make_pod(f"qwen-{round_}", node="cpu-large", template=template(deploy), oom_killed=True))
        before = d.status.plan
        d = decide(snapshot(SEED, nodes, old=d.status, deploy=deploy, pods=killed))
        assert d.status.plan.headroom_boost == boost
        assert d.status.oom_kills == min(round_, int(1 / OOM_HEADROOM_STEP))
        if boost > before.headroom_boost:
            assert d.status.plan.memory_request_bytes > before.memory_request_bytes
            assert [r for r, _ in d.events] == ["PlanChanged"]
            deploy = deployment(d)
        else:
            assert d.status.plan.hash == before.hash and not d.apply and not d.events
            assert conds(d)["Degraded"][:2] == ("True", "OOMKilled")  # the same pods keep being killed: said so
    # the last plan's own pod runs: the killed pods of older templates count no more
    ok = make_pod("qwen-6", node="cpu-large", template=template(deploy), ready=True)
    d = decide(snapshot(SEED, nodes, old=d.status, deploy=deploy, pods=[*killed[:-1], ok]))
    assert d.status.oom_kills == 4 and conds(d)["Degraded"][1] == "AsExpected" and not d.apply


@pytest.mark.parametrize(
    ("load_mode", "limit", "oom", "applied_limit", "planned", "needle"),
    [
        ("none", "96Mi", False, "96Mi", "Planned", ""),  # --load-mode none: tried, the kernel will tell
        ("none", "96Mi", True, "plan", "MemoryOverrideIgnored", "OOM-killed"),  # the override dropped, not the plan
        ("mmap", "256Mi", False, "plan", "MemoryOverrideIgnored", "thrashes"),  # never applied under mmap
    ],
    ids=["tried", "oom-drops-it", "mmap-never"],
)
def test_a_tight_memory_override(
    make_node: Builder,
    make_pod: Builder,
    load_mode: str,
    limit: str,
    oom: bool,
    applied_limit: str,
    planned: str,
    needle: str,
) -> None:
    spec = {**SEED, "loadMode": load_mode, "resources": {"limits": {"memory": limit}}}
    nodes = [make_node("cpu-large")]
    d = decide(snapshot(spec, nodes))
    if oom:
        first = d
        d = decide(snapshot(spec, nodes, **after(d, make_pod, node="cpu-large", oom_killed=True)))
        assert d.status.oom_kills == 1 and d.status.memory_override_rejected == 96 * 1024 * 1024
        assert d.status.plan.headroom_boost == 0.0  # the plan was right; the override was not
        assert d.status.plan.memory_request_bytes == first.status.plan.memory_request_bytes
    limits = child(d, "Deployment")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["memory"] == (d.status.plan.resources["limits"]["memory"] if applied_limit == "plan" else limit)
    assert conds(d)["Planned"][1] == planned and needle in conds(d)["Planned"][2]
    if oom:  # the next reconcile keeps it dropped and counts the kill once
        again = decide(snapshot(spec, nodes, **after(d, make_pod)))
        assert again.status.oom_kills == 1 and not again.apply
        assert again.status.memory_override_rejected == 96 * 1024 * 1024


@pytest.mark.parametrize(
    ("adapt", "avoid_until", "refused", "node_class", "avoided_until"),
    [
        (True, None, True, "cpu-other", NOW + AVOID_SECONDS),  # adapt: avoid the class, plan on the next one
        (False, None, True, "cpu-large", None),  # no adapt: the plan stays, the pods say why they wait
        (True, NOW + 10, False, "cpu-other", NOW + 10),  # a class still avoided
        (True, NOW - 1, False, "cpu-large", None),  # an avoidance that ran out
    ],
    ids=["adapt-avoids", "no-adapt-stays", "still-avoided", "avoidance-over"],
)
def test_pods_the_scheduler_refuses(
    make_node: Builder,
    make_pod: Builder,
    adapt: bool,
    avoid_until: float | None,
    refused: bool,
    node_class: str,
    avoided_until: float | None,
) -> None:
    nodes = [make_node("cpu-large"), make_node("cpu-other", "8", "32Gi")]
    spec = {**SEED, "adapt": adapt}
    large = ((HOST, "cpu-large"),)
    avoid = {large: avoid_until} if avoid_until is not None else None
    if refused:
        first = decide(snapshot(spec, nodes))
        assert first.status.plan.node_class == "cpu-large"
        d = decide(
            snapshot(spec, nodes, avoid=avoid, **after(first, make_pod, unschedulable="0/2 nodes: Insufficient cpu"))
        )
        assert d.replan_soon  # the pods wait for the scheduler: look again on fresh node facts
        assert conds(d)["Unschedulable"] == ("True", "FailedScheduling", "0/2 nodes: Insufficient cpu")
    else:
        d = decide(snapshot(spec, nodes, avoid=avoid))
    assert d.status.plan.node_class == node_class
    assert d.avoid == ({large: avoided_until} if avoided_until is not None else {})


def test_an_avoided_class_that_is_the_only_eligible_one_is_still_planned_on(
    make_node: Builder, make_pod: Builder
) -> None:
    """Avoiding a node class the scheduler refused is a preference: when it leaves no eligible node (here only
    a tainted node none tolerates), the plan stays on it and the pods say why they wait -- not NoEligibleNodes
    naming the one node the spec excludes (the burst on the demo cluster: 56 models for 5 minutes)."""
    real = make_node("real-0", "4", "8Gi", taints=[{"key": "real", "value": "true", "effect": "NoSchedule"}])
    nodes = [make_node("cpu-large"), real]
    first = decide(snapshot(SEED, nodes))
    refused = after(first, make_pod, unschedulable="0/2 nodes: Insufficient cpu")
    d = decide(snapshot(SEED, nodes, **refused))
    assert d.avoid == {((HOST, "cpu-large"),): NOW + AVOID_SECONDS}
    again = decide(snapshot(SEED, nodes, avoid=d.avoid, **refused))
    assert conds(again)["Planned"][:2] == ("True", "Planned") and again.status.plan.node_class == "cpu-large"
    assert conds(again)["Unschedulable"] == ("True", "FailedScheduling", "0/2 nodes: Insufficient cpu")


def test_a_pod_that_waits_for_room_is_refused_by_design_and_its_class_not_avoided(
    make_node: Builder, make_pod: Builder
) -> None:
    """A model planned for an empty node of a full class (WaitingForNode) has a pending pod the scheduler
    refuses until room frees up: that is the plan, not a reason to avoid the class (adapt or not)."""
    nodes = [make_node("cpu-large"), make_node("cpu-other", "8", "32Gi")]
    others = [
        make_pod(f"busy-{n}", node=n, owner=None, namespace="b", requests={"cpu": cpu, "memory": "1Gi"})
        for n, cpu in (("cpu-large", "16"), ("cpu-other", "8"))
    ]
    first = decide(snapshot(SEED, nodes, others=others))
    assert conds(first)["Unschedulable"][1] == "WaitingForNode"
    refused = after(first, make_pod, unschedulable="0/2 nodes: Insufficient cpu")
    d = decide(snapshot(SEED, nodes, others=others, **refused))
    assert d.avoid == {} and not d.apply and conds(d)["Unschedulable"][1] == "WaitingForNode"
    assert d.status.plan.node_selector == first.status.plan.node_selector


# ---- no churn: keep or move a running plan (spec.rebalance) -----------------------------------------


@pytest.mark.parametrize(
    ("first", "then", "policy", "refused", "node_class", "moved", "needle"),
    [
        (["cpu-large"], ["cpu-large"], None, False, "cpu-large", False, None),
        (
            ["cpu-small"],
            ["cpu-small", "cpu-large"],
            None,
            False,
            "cpu-small",
            False,
            "kept: a re-plan (cpu on cpu-large",
        ),
        (["cpu-small"], ["cpu-small", "cpu-large"], "Always", False, "cpu-large", True, None),
        (
            ["cpu-large"],
            ["cpu-large", "gpu-24g"],
            "Never",
            False,
            "cpu-large",
            False,
            "rebalance Never keeps a running",
        ),
        (["cpu-large"], ["cpu-large", "gpu-24g"], None, False, "gpu-24g", True, "moved: GPU share 0% -> 100%"),
        (["cpu-large"], ["cpu-small"], None, False, "cpu-small", True, None),
        (["cpu-large"], ["cpu-small"], "Never", False, "cpu-small", True, None),
        (["cpu-small"], ["cpu-small", "cpu-large"], "Never", True, "cpu-large", True, None),
        (["cpu-small"], ["cpu-small", "cpu-large"], None, True, "cpu-large", True, None),
    ],
    ids=[
        "nothing-changed",
        "WhenBetter-keeps-a-roomier-node",
        "Always-moves",
        "Never-keeps-cpu-over-gpu",
        "WhenBetter-moves-to-gpu",
        "class-gone-moves",
        "class-gone-moves-under-Never",
        "refused-pods-move-under-Never",
        "refused-pods-move",
    ],
)
def test_keep_or_move_a_running_plan(
    make_node: Builder,
    make_pod: Builder,
    first: list[str],
    then: list[str],
    policy: str | None,
    refused: bool,
    node_class: str,
    moved: bool,
    needle: str | None,
) -> None:
    """The first plan runs; then the nodes change (and the policy: a new policy is not a new plan)."""
    running = decide(snapshot(SMALL, [make_node(n) for n in first]))
    assert running.status.plan.node_class == first[0]
    spec = {**SMALL, "rebalance": {"policy": policy}} if policy else SMALL
    pod = {"unschedulable": "0/2 nodes: Insufficient cpu"} if refused else {}
    d = decide(snapshot(spec, [make_node(n) for n in then], generation=2, **after(running, make_pod, **pod)))
    plan = d.status.plan
    words = conds(d)["Planned"][2]
    assert plan.node_class == node_class
    if needle is None:  # no verdict to give: nothing to choose, or no choice left
        assert "kept:" not in words and "moved:" not in words, words
    else:
        assert needle in words
    if moved:
        assert plan.hash != running.status.plan.hash and [r for r, _ in d.events] == ["PlanChanged"]
        assert child(d, "Deployment")["spec"]["template"]["spec"]["nodeSelector"] == plan.node_selector
    else:
        assert plan.hash == running.status.plan.hash and d.apply == [] and d.events == []
        assert d.result == "ready"
    if node_class == "gpu-24g":
        assert plan.backend == "cuda" and plan.gpu_layers == plan.total_layers


def test_an_adapted_plan_moves_when_the_specs_own_terms_fit_again(make_node: Builder, make_pod: Builder) -> None:
    spec = {"model": {"catalog": "llama-3.1-8b", "quant": "Q4_K_M"}, "context": 131072, "adapt": True}
    mid = make_node("cpu-mid", "4", "8Gi")
    running = decide(snapshot(spec, [mid]))
    assert conds(running)["Planned"][1] == "Adapted" and running.status.plan.context < 131072
    d = decide(snapshot(spec, [mid, make_node("cpu-large")], **after(running, make_pod)))
    assert (d.status.plan.node_class, d.status.plan.context) == ("cpu-large", 131072)
    assert "moved: the spec's own terms fit again" in conds(d)["Planned"][2] and d.apply


def test_a_running_plan_pinned_to_a_node_shape_stays_while_its_pods_wait(make_node: Builder, make_pod: Builder) -> None:
    """A pending pod of a plan made for a node shape waits for the autoscaler: no move, still WaitingForNode;
    a node of the shape arrives (before or after the pod binds) and the plan stays; a second replica asks
    for another node of the shape with the same pod template."""
    shapes = _shapes()
    nodes = [make_node("cpu-small")]
    d = decide(snapshot(BIG, nodes, shapes=shapes))
    planned = d.status.plan.hash
    pending = after(d, make_pod, unschedulable="0/1 nodes are available: 1 node(s) didn't match Pod's node selector")
    d = decide(snapshot(BIG, nodes, shapes=shapes, **pending))
    assert d.status.plan.hash == planned and not d.apply
    assert conds(d)["Planned"][1] == "WaitingForNode" and "node shape large" in conds(d)["Planned"][2]
    assert conds(d)["Unschedulable"][1] == "WaitingForNode" and "shape large" in conds(d)["Unschedulable"][2]
    nodes.append(make_node("ca-large-1", labels={SHAPE_LABEL: "large"}))
    for pods in (pending["pods"], [make_pod(node="ca-large-1", template=template(pending["deploy"]), ready=True)]):
        d = decide(snapshot(BIG, nodes, shapes=shapes, old=d.status, deploy=pending["deploy"], pods=pods))
        assert d.status.plan.hash == planned and not d.apply
        assert d.status.plan.node_selector == {SHAPE_LABEL: "large"}
    assert conds(d)["Planned"][0] == "True" and conds(d)["Unschedulable"][0] == "False"
    two = {**BIG, "replicas": 2}
    d = decide(snapshot(two, nodes, shapes=shapes, generation=2, old=d.status, deploy=pending["deploy"], pods=pods))
    scaled = child(d, "Deployment")
    assert scaled["spec"]["replicas"] == 2 and template(scaled) == template(pending["deploy"])
    assert scaled["spec"]["template"]["spec"]["nodeSelector"] == {SHAPE_LABEL: "large"}
    waiting = make_pod("qwen-2", template=template(scaled), unschedulable="0/2 nodes are available")
    d = decide(
        snapshot(two, nodes, shapes=shapes, generation=2, old=d.status, deploy=deployment(d), pods=[*pods, waiting])
    )
    assert (
        not d.apply
        and conds(d)["Unschedulable"][1] == "WaitingForNode"
        and "shape large" in conds(d)["Unschedulable"][2]
    )


def test_scaling_is_not_a_new_plan(make_node: Builder, make_pod: Builder) -> None:
    spec = {**SMALL, "autoscaling": {"maxReplicas": 3}}
    nodes = [make_node("cpu-large")]
    running = decide(snapshot(spec, nodes))
    hpa = child(running, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment"
    assert any("autoscaling 1-3 replicas" in r for r in running.status.plan.reasons)
    d = decide(snapshot({**spec, "replicas": 2}, nodes, generation=2, **after(running, make_pod)))  # the HPA wrote it
    assert child(d, "Deployment")["spec"]["replicas"] == 2 and d.events == []  # no PlanChanged
    assert d.status.plan.hash == running.status.plan.hash


# ---- Progressing: a spec change rolls out -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "rolling"),
    [({"context": 16384}, True), ({"rebalance": {"policy": "Never"}}, False)],
    ids=["new-pod-template", "nothing-to-roll"],
)
def test_a_spec_change_is_rolling_out_until_the_new_pods_are_there(
    make_node: Builder, make_pod: Builder, change: Obj, rolling: bool
) -> None:
    """Right after a spec change the live Deployment still runs the old pod template, complete and ready: the
    new generation reads Progressing=True RollingOut (0 of the new pods yet), not RolloutComplete, until the
    Deployment runs the new template; a change with nothing to roll (a rebalance policy) is complete at once."""
    nodes = [make_node("cpu-large")]
    running = decide(snapshot(SMALL, nodes))
    settled = decide(snapshot(SMALL, nodes, **after(running, make_pod)))
    assert conds(settled)["Progressing"][:2] == ("False", "RolloutComplete") and not settled.apply
    d = decide(snapshot({**SMALL, **change}, nodes, generation=2, **after(running, make_pod)))
    progressing = next(c for c in d.status.conditions if c.type == "Progressing")
    assert progressing.observed_generation == 2 and bool(d.apply) is rolling
    if rolling:
        assert (progressing.status, progressing.reason, progressing.message) == (
            "True",
            "RollingOut",
            "0/1 updated, 1 ready",
        )
        assert conds(d)["Ready"][:2] == ("True", "ReplicasReady")  # the old pod serves meanwhile
        # applied: the Deployment controller has not seen the new generation yet, then its new pod is not ready
        new = deployment(d, ready=1, generation=2)
        new["status"]["observedGeneration"] = 1
        lagging = decide(snapshot({**SMALL, **change}, nodes, generation=2, old=d.status, deploy=new, pods=[]))
        assert conds(lagging)["Progressing"][:2] == ("True", "RollingOut")
        done = decide(snapshot({**SMALL, **change}, nodes, generation=2, **after(d, make_pod)))
        assert conds(done)["Progressing"][:2] == ("False", "RolloutComplete")
    else:
        assert (progressing.status, progressing.reason) == ("False", "RolloutComplete")


# ---- rollout: Surge or Replace ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "then", "context", "rollout"),
    [
        (["cpu-small"], ["cpu-small"], 8192, "Surge"),  # no pod runs yet: nothing to replace
        (["cpu-small"], ["cpu-small"], 16384, "Replace"),  # 4Gi holds one pod of this size, not two
        (["cpu-large"], ["cpu-large"], 16384, "Surge"),  # room for the old and the new pod
        (["cpu-large"], ["cpu-large", "gpu-24g"], 8192, "Surge"),  # another node class: the new pod starts first
    ],
    ids=["first-plan", "in-place-no-room", "in-place-with-room", "another-class"],
)
def test_surge_when_there_is_room_else_replace(
    make_node: Builder, make_pod: Builder, first: list[str], then: list[str], context: int, rollout: str
) -> None:
    running = decide(snapshot(SMALL, [make_node(n) for n in first]))
    if context == SMALL["context"] and first == then:
        d = running
    else:
        spec = {**SMALL, "context": context}
        d = decide(snapshot(spec, [make_node(n) for n in then], generation=2, **after(running, make_pod)))
        assert d.status.plan.context == context and d.apply
    assert d.status.plan.rollout == rollout
    strategy = child(d, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == (
        {"maxSurge": 1, "maxUnavailable": 0} if rollout == "Surge" else {"maxSurge": 0, "maxUnavailable": 1}
    )


def test_pods_none_of_which_runs_are_replaced_when_their_plan_moves(make_node: Builder, make_pod: Builder) -> None:
    """A surge keeps the old pending pod, pinned where there is no room, until a new one runs: a model moved to
    another node class in a burst, its new pod as unschedulable as its old one, kept both pending for good. In its
    own class a pending pod's plan keeps Surge (no churn of a plan that did not change)."""
    first = decide(snapshot(SMALL, [make_node("cpu-small")]))
    pending = after(first, make_pod)
    pending["pods"] = [{**p, "status": {**p.get("status", {}), "phase": "Pending"}} for p in pending["pods"]]
    nodes = [make_node("cpu-small"), make_node("gpu-24g")]
    d = decide(snapshot({**SMALL, "context": 16384}, nodes, generation=2, **pending))
    assert d.status.plan.node_selector != first.status.plan.node_selector
    assert d.apply and d.status.plan.rollout == "Replace"
    assert child(d, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_a_move_decided_again_before_the_deployment_controller_acted_keeps_replace(
    make_node: Builder, make_pod: Builder
) -> None:
    """e2e/test_burst, once in CI: a model refused on n0 moved to n1 (Replace), and the next resync, with the old
    pod still pending on n0, re-decided it. That pod's refusal said nothing of n1, yet it made the operator avoid n1
    too and, the recorded plan already naming n1 (not a move), surge: the Deployment controller then kept the old
    pod beside the new one, both pending for good. The old template's pod is neither a refusal of the new plan nor
    a reason to surge."""
    spec = {**SEED, "context": 4096, "resources": {"requests": {"cpu": "3"}}}
    nodes = [make_node("n0", "4", "8Gi"), make_node("n1", "4", "8Gi")]
    first = decide(snapshot(spec, nodes))
    refused = after(first, make_pod, unschedulable="0/2 nodes: 1 Insufficient cpu")
    moved = decide(snapshot(spec, nodes, **refused))
    assert moved.status.plan.node_selector != first.status.plan.node_selector and moved.status.plan.rollout == "Replace"
    # applied; the Deployment controller has not replaced the old pod yet
    again = decide(
        snapshot(spec, nodes, old=moved.status, deploy=deployment(moved), pods=refused["pods"], avoid=moved.avoid)
    )
    assert again.status.plan.node_selector == moved.status.plan.node_selector
    assert not again.apply or child(again, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert not any("adapting" in line for _, line in again.logs), again.logs
    # a re-plan of the same class with the old pod there (a new spec) replaces it too: nothing runs
    bigger = decide(
        snapshot({**spec, "context": 8192}, nodes, generation=2, old=moved.status, deploy=deployment(moved),
                 pods=refused["pods"], avoid=moved.avoid)
    )  # fmt: skip
    assert bigger.apply and bigger.status.plan.rollout == "Replace"


# ---- drift: a hand edit of the Deployment -----------------------------------------------------------


@pytest.mark.parametrize(
    ("seen", "live", "restored"),
    [
        (None, 1, False),  # the first generation seen (after a restart) is the baseline
        (1, 1, False),
        (1, 2, True),  # a hand edit bumped the generation under our applied hash
        (3, 3, False),  # our own apply bumped it, and the shell saw that
    ],
    ids=["baseline", "unchanged", "hand-edit", "own-apply"],
)
def test_a_hand_edit_of_the_deployment_is_applied_again(
    make_node: Builder, make_pod: Builder, seen: int | None, live: int, restored: bool
) -> None:
    nodes = [make_node("cpu-large")]
    running = decide(snapshot(SEED, nodes))
    state = after(running, make_pod)
    state["deploy"]["metadata"]["generation"] = live
    state["deploy"]["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/hand-edited:1"
    d = decide(snapshot(SEED, nodes, seen_generation=seen, **state))
    assert d.seen_generation == live
    assert bool(d.apply) is restored and d.events == []  # the same plan: no PlanChanged
    edited = [line for level, line in d.logs if level == logging.WARNING and "was edited" in line]
    assert edited == ([f"Deployment qwen was edited (generation {live}); restoring it"] if restored else [])
    if restored:
        assert child(d, "Deployment") == child(running, "Deployment")  # applied with force over the edit


# ---- capacity and room -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "unschedulable"),
    [
        ({**SMALL, "replicas": 5}, ("True", "InsufficientCapacity")),
        ({**SMALL, "replicas": 1}, ("False", "Scheduled")),
        ({**SMALL, "replicas": 2, "resources": {"requests": {"cpu": "100m"}}}, ("False", "Scheduled")),
    ],
    ids=["five-on-one-small-node", "one", "rendered-requests-fit"],
)
def test_more_replicas_than_the_class_holds_is_said_before_the_scheduler_does(
    make_node: Builder, spec: Obj, unschedulable: tuple[str, str]
) -> None:
    d = decide(snapshot(spec, [make_node("cpu-small")]))
    c = conds(d)["Unschedulable"]
    assert c[:2] == unschedulable and d.apply  # the Deployment is made: the others stay pending
    if c[1] == "InsufficientCapacity":
        assert c[2].startswith("5 replicas wanted, the 1 present node(s) of kubernetes.io/hostname=cpu-small")


@pytest.mark.parametrize(
    ("spec", "busy", "shapes", "planned", "unschedulable", "selector", "needle"),
    [
        (SMALL, True, False, "WaitingForNode", "WaitingForNode", {HOST: "cpu-small"}, "short by"),
        (BIG, False, True, "WaitingForNode", "WaitingForNode", {SHAPE_LABEL: "large"}, "node shape large"),
        (BIG, False, False, "NoNodeFits", "NoNodeFits", None, ""),
    ],
    ids=["full-node", "node-shape", "nothing-fits"],
)
def test_waiting_for_a_node(
    make_node: Builder,
    make_pod: Builder,
    spec: Obj,
    busy: bool,
    shapes: bool,
    planned: str,
    unschedulable: str,
    selector: dict[str, str] | None,
    needle: str,
) -> None:
    """Only full nodes (another tenant's pod holds the CPU), or a node shape an autoscaler can add: the
    Deployment is made and its pod pends; no node even empty, no shape: Planned=False, nothing applied."""
    others = [
        make_pod("other", node="cpu-small", owner=None, namespace="team-b", requests={"cpu": "2", "memory": "1Gi"})
    ]
    nodes = [make_node("cpu-small")]
    d = decide(snapshot(spec, nodes, others=others if busy else None, shapes=_shapes() if shapes else None))
    c = conds(d)
    assert (
        c["Planned"][1] == planned and needle in c["Planned"][2] and c["Unschedulable"][:2] == ("True", unschedulable)
    )
    if selector is None:
        assert d.apply == [] and d.status.plan.fits is False and d.result == "unschedulable"
        return
    assert c["Planned"][0] == "True" and d.status.plan.node_selector == selector
    assert child(d, "Deployment")["spec"]["template"]["spec"]["nodeSelector"] == selector
    assert d.result == "progressing" and d.requeue_after is None  # the scheduler places the pod when room frees
    # the next look, room freed or not yet: the plan stays
    pending = after(d, make_pod, unschedulable="0/1 nodes are available: Insufficient cpu")
    again = decide(snapshot(spec, nodes, shapes=_shapes() if shapes else None, **pending))
    assert again.status.plan.hash == d.status.plan.hash and again.apply == []


# ---- why no node was used -------------------------------------------------------------------------


def _state(node: Obj, *, cordoned: bool = False, ready: str = "True") -> Obj:
    node["spec"]["unschedulable"] = cordoned
    node["status"]["conditions"] = [{"type": "Ready", "status": ready}]
    return node


def _ml_nodes(make_node: Builder) -> list[Obj]:
    """Nodes of pool ml, each kept from the spec by another reason, and two nodes outside the pool."""
    ml = {"pool": "ml"}
    return [
        *(_state(make_node(f"c{i}", labels=ml), cordoned=True) for i in (1, 2, 3)),  # drained
        _state(make_node("r1", labels=ml), ready="False"),
        _state(make_node("u1", labels=ml), ready="Unknown"),
        make_node("t1", labels=ml, taints=[{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
        make_node("x1"),
        make_node("x2"),
    ]


def test_no_eligible_node_names_every_node_and_why(make_node: Builder) -> None:
    """A drained (cordoned), a not Ready and an unreachable node are named as such, with the taint and the
    nodeSelector that keep the others out: one clause per reason, the most nodes first."""
    d = decide(snapshot({**SMALL, "nodeSelector": {"pool": "ml"}}, _ml_nodes(make_node)))
    message = (
        "no node is eligible: 3 nodes (c1, c2, c3): cordoned (spec.unschedulable); 2 nodes (x1, x2): nodeSelector "
        "pool=ml does not match; r1: not Ready; t1: taint dedicated=db:NoSchedule is not tolerated; u1: "
        "unreachable (Ready Unknown)"
    )
    assert conds(d)["Planned"] == ("False", "NoEligibleNodes", message)
    assert conds(d)["Unschedulable"] == ("True", "NoEligibleNodes", message) and d.apply == []


def test_no_node_fits_names_the_small_ones_and_the_ineligible_ones(make_node: Builder) -> None:
    nodes = [*_ml_nodes(make_node), make_node("s1", "4", "256Mi", labels={"pool": "ml"})]
    d = decide(snapshot({**SMALL, "nodeSelector": {"pool": "ml"}}, nodes))
    status, reason, message = conds(d)["Planned"]
    assert (status, reason) == ("False", "NoNodeFits")
    assert message.startswith("no node fits the model at the requested context: s1: short by ")
    assert message.endswith(
        "Mi (not eligible: 3 nodes (c1, c2, c3): cordoned (spec.unschedulable); 2 nodes (x1, x2): nodeSelector "
        "pool=ml does not match; r1: not Ready; t1: taint dedicated=db:NoSchedule is not tolerated; u1: "
        "unreachable (Ready Unknown))"
    )


def test_a_spec_that_tolerates_the_cordon_may_run_there_as_the_scheduler_allows(make_node: Builder) -> None:
    tolerant = {**SMALL, "tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}]}
    d = decide(snapshot(tolerant, [_state(make_node("cpu-large"), cordoned=True)]))
    assert conds(d)["Planned"][:2] == ("True", "Planned") and d.status.plan.node_class == "cpu-large"


def test_the_message_stays_short_for_a_hundred_nodes(make_node: Builder) -> None:
    nodes = [
        *(_state(make_node(f"drained-node-{i:03d}"), cordoned=True) for i in range(60)),
        *(_state(make_node(f"lost-node-{i:03d}"), ready="False") for i in range(30)),
        *(
            make_node(f"t{i}", taints=[{"key": f"team-{i}", "value": "x" * 40, "effect": "NoSchedule"}])
            for i in range(10)
        ),
    ]
    message = conds(decide(snapshot(SMALL, nodes)))["Planned"][2]
    assert len(message) < 1024, message
    assert message.startswith(
        "no node is eligible: 60 nodes (drained-node-000, drained-node-001, drained-node-002, ...): cordoned "
        "(spec.unschedulable); 30 nodes (lost-node-000, lost-node-001, lost-node-002, ...): not Ready; t0: taint "
    )
    assert message.endswith(
        "; t6: taint team-6=" + "x" * 40 + ":NoSchedule is not tolerated; and 3 more nodes for 3 other reasons"
    )


def test_a_running_plan_leaves_a_drained_node_class(make_node: Builder, make_pod: Builder) -> None:
    """Its class cordoned (kubectl drain), a running plan moves to a node that can take its pods."""
    nodes = [make_node("cpu-large"), make_node("cpu-other", "8", "32Gi")]
    first = decide(snapshot(SMALL, nodes))
    assert first.status.plan.node_class == "cpu-large"
    drained = [_state(make_node("cpu-large"), cordoned=True), nodes[1]]
    d = decide(snapshot(SMALL, drained, **after(first, make_pod)))
    assert d.status.plan.node_class == "cpu-other" and child(d, "Deployment")


def test_shapes_too_small_change_nothing(make_node: Builder) -> None:
    d = decide(snapshot(BIG, [make_node("cpu-small")], shapes=_shapes()[:1]))  # only tiny
    assert conds(d)["Planned"][:2] == ("False", "NoNodeFits") and d.apply == []


def test_a_missing_secret_is_degraded_and_logged_once(make_node: Builder) -> None:
    missing = condition("Degraded", "True", "SecretNotFound", "Secret llm-key not found")
    nodes = [make_node("cpu-large")]
    spec = {**SEED, "apiKeySecretRef": {"name": "llm-key"}}
    d = decide(snapshot(spec, nodes, missing=missing))
    assert conds(d)["Degraded"] == ("True", "SecretNotFound", "Secret llm-key not found") and child(
        d, "Deployment"
    )  # the pods start once it exists
    assert (logging.WARNING, "SecretNotFound: Secret llm-key not found") in d.logs
    again = decide(snapshot(spec, nodes, old=d.status, missing=missing))
    assert not [line for level, line in again.logs if level >= logging.WARNING]


# ---- when to come back (Decision.requeue_after) ----------------------------------------------------


def test_retry_delay_backs_off_to_a_bound() -> None:
    delays = [retry_delay(i) for i in range(12)]
    assert delays[:3] == [10.0, 20.0, 40.0] and max(delays) == MAX_RETRY_DELAY and delays == sorted(delays)


@pytest.mark.parametrize(
    ("case", "failures", "result", "after_s"),
    [
        ("no-node-fits", 0, "unschedulable", 10.0),
        ("no-node-fits", 1, "unschedulable", 20.0),
        ("no-node-fits", 9, "unschedulable", MAX_RETRY_DELAY),
        ("no-eligible-nodes", 2, "unschedulable", 40.0),
        ("model-unreadable", 0, "model_unreadable", 10.0),
        ("model-unreadable", 3, "model_unreadable", 80.0),
        ("invalid", 3, "invalid", None),  # an edit of the spec brings it back
        ("planned", 3, "progressing", None),  # the pods' events bring it back
        ("waiting-for-node", 3, "progressing", None),  # the Deployment is made: the scheduler waits for room
    ],
)
def test_when_to_come_back(make_node: Builder, case: str, failures: int, result: str, after_s: float | None) -> None:
    """A model server not up yet, or room that frees up when other tenants' pods end, tells us by no event of
    ours: those come back with backoff over the failures in a row; the rest waits for an event."""
    meta, nodes = meta_of(), [make_node("cpu-small")]
    if case == "model-unreadable":
        d = failure(
            meta,
            ModelDeploymentStatus(),
            "ModelUnreadable",
            "cannot read the model: HTTP 503",
            "model_unreadable",
            failures,
        )
        assert conds(d)["Planned"][:2] == ("False", "ModelUnreadable") and conds(d)["Degraded"][0] == "True"
    elif case == "invalid":
        d = failure(meta, ModelDeploymentStatus(), "InvalidSpec", "spec is invalid", "invalid", failures)
    else:
        spec = {
            "no-node-fits": BIG,
            "no-eligible-nodes": {**SMALL, "nodeSelector": {"pool": "nowhere"}},
            "planned": SMALL,
            "waiting-for-node": BIG,
        }[case]
        d = decide(snapshot(spec, nodes, failures=failures, shapes=_shapes() if case == "waiting-for-node" else None))
    assert (d.result, d.requeue_after) == (result, after_s)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [(BIG, "NoNodeFits"), ({**SMALL, "nodeSelector": {"pool": "nowhere"}}, "NoEligibleNodes")],
    ids=["no-node-fits", "no-eligible-nodes"],
)
def test_a_verdict_is_logged_once_not_on_every_resync(make_node: Builder, spec: Obj, reason: str) -> None:
    nodes = [make_node("cpu-small")]
    d = decide(snapshot(spec, nodes))
    assert conds(d)["Planned"][:2] == ("False", reason) and d.apply == []
    assert any(level == logging.WARNING and reason in line for level, line in d.logs)
    again = decide(snapshot(spec, nodes, old=d.status))
    assert [line for level, line in again.logs if level >= logging.INFO] == []
    nodes.append(make_node("cpu-tiny", "1", "1Gi"))  # the message names every node: a new verdict
    new = decide(snapshot(spec, nodes, old=d.status))
    assert any(level == logging.WARNING and reason in line for level, line in new.logs)


# ---- the model digest: trust on first use --------------------------------------------------------


def _fetched(name: str, url: str, message: str, exit_code: int = 0, created: str = "2026-12-03T10:00:00Z") -> Obj:
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"initContainers": [{"name": "fetch-model", "env": [{"name": "MODEL_URL", "value": url}]}]},
        "status": {
            "initContainerStatuses": [
                {"name": "fetch-model", "state": {"terminated": {"exitCode": exit_code, "message": message}}}
            ]
        },
    }


def _digest_cm(d: Any) -> str:
    return next(o for o in d.apply if o["kind"] == "ConfigMap")["data"]["sha256"]


def test_the_first_verified_download_records_the_digest_every_later_pod_is_held_to(make_node: Builder) -> None:
    from modelfit.render import model_file

    spec = SEED
    url = model_file(check_spec(meta_of("qwen", 1), spec)).url  # type: ignore[union-attr]
    a, b = "a" * 64, "b" * 64
    nodes = [make_node("cpu-large")]
    d = decide(snapshot(spec, nodes))
    assert d.status.model_digest is None and _digest_cm(d) == ""
    # A failed download and a pod of another URL report nothing usable; the oldest verified pod wins.
    pods = [
        _fetched("p-failed", url, "ChecksumMismatch: x", exit_code=1, created="2026-12-03T09:00:00Z"),
        _fetched("p-other-url", "https://elsewhere/m.gguf", f"Verified: sha256 {b}", created="2026-12-03T09:30:00Z"),
        _fetched("p-second", url, f"Verified: sha256 {b}", created="2026-12-03T10:05:00Z"),
        _fetched("p-first", url, f"Verified: sha256 {a}", created="2026-12-03T10:00:00Z"),
    ]
    d = decide(snapshot(spec, nodes, pods=pods))
    rec = d.status.model_digest
    assert rec is not None and (rec.url, rec.sha256, rec.pod) == (url, [a], "p-first")
    assert _digest_cm(d) == a + "\n"
    # Kept: a later pod that reports something else does not replace it; no failure forgets it.
    d2 = decide(snapshot(spec, nodes, pods=[_fetched("p-late", url, f"Verified: sha256 {b}")], old=d.status))
    assert d2.status.model_digest == rec
    assert failure(meta_of("qwen", 1), d.status, "InvalidSpec", "x", "invalid").status.model_digest == rec
    # Recording changes no pod template: no roll.
    tpl = next(o for o in d.apply if o["kind"] == "Deployment")["spec"]["template"]
    first = decide(snapshot(spec, nodes))
    assert tpl == next(o for o in first.apply if o["kind"] == "Deployment")["spec"]["template"]
    # A new URL starts over; a spec sha256 that disagrees with the record wins.
    d3 = decide(snapshot({**spec, "model": {"catalog": "qwen3.5-0.8b", "quant": "Q8_0"}}, nodes, old=d.status))
    assert d3.status.model_digest is None
    d4 = decide(snapshot({**spec, "model": {**spec["model"], "sha256": b}}, nodes, pods=pods[3:], old=d.status))
    assert d4.status.model_digest is None
