"""The status module: one setter per condition, each tested by a table (as Cluster API's
``TestSetInfrastructureReadyCondition``: the gathered data in, the expected condition out), and status.plan to and
from a placement."""

from __future__ import annotations

from typing import Any

import pytest

from modelfit import catalog
from modelfit.api import Condition, MemoryStatus, ModelDeploymentSpec, ModelDeploymentStatus, PlanStatus
from modelfit.memory import MemoryBreakdown
from modelfit.nodes import node_facts_from_k8s
from modelfit.placement import place
from modelfit.render import HASH_ANNOTATION
from modelfit.sizing import Plan, PlanResult
from modelfit.status import (
    UNRECORDED,
    Room,
    Workload,
    api_failure_conditions,
    condition,
    find_condition,
    merge_conditions,
    placement_from_status,
    plan_status,
    planning_failure_conditions,
    pod_signals,
    set_degraded,
    set_progressing,
    set_ready,
    set_unschedulable,
    workload,
)

Obj = dict[str, Any]
Cond = tuple[str, str, str]


def said(c: Condition) -> Cond:
    return (c.status, c.reason, c.message)


# ---- merging conditions ---------------------------------------------------------------------------


def test_transition_time_changes_only_on_flip() -> None:
    c = merge_conditions([], [condition("Ready", "False", "ReplicasNotReady", "0/1")], 1, now="t1")
    c = merge_conditions(c, [condition("Ready", "False", "ReplicasNotReady", "still 0/1")], 2, now="t2")
    ready = find_condition(c, "Ready")
    assert ready is not None
    assert (ready.last_transition_time, ready.message, ready.observed_generation) == ("t1", "still 0/1", 2)
    c = merge_conditions(c, [condition("Ready", "True", "ReplicasReady", "1/1")], 2, now="t3")
    assert find_condition(c, "Ready").last_transition_time == "t3"  # type: ignore[union-attr]


def test_conditions_sorted_and_unique() -> None:
    new = [condition("Unschedulable", "False", "Scheduled"), condition("Ready", "True", "ReplicasReady")]
    c = merge_conditions([], new, 1)
    c = merge_conditions(c, [condition("Ready", "True", "ReplicasReady")], 1)
    assert [x.type for x in c] == ["Ready", "Unschedulable"]


def test_a_long_message_is_cut_to_the_condition_limit() -> None:
    assert len(condition("Unschedulable", "True", "FailedScheduling", "x" * 40000).message) == 32768


# ---- the gathered data: the Deployment and its pods ------------------------------------------------


def deploy(replicas: int = 1, ready: int = 1, updated: int = 1, gen: int = 1, observed: int = 1, conditions=()) -> Obj:
    return {
        "metadata": {"generation": gen},
        "status": {
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "observedGeneration": observed,
            "conditions": list(conditions),
        },
    }


def on_template(d: Obj, template_hash: str) -> Obj:
    """The Deployment running pod template ``template_hash``."""
    return {**d, "spec": {"template": {"metadata": {"annotations": {HASH_ANNOTATION: template_hash}}}}}


PENDING = {
    "metadata": {"name": "p1"},
    "status": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient memory.",
            }
        ],
    },
}
DOWNLOAD_FAILED = {
    "metadata": {"name": "p3"},
    "status": {
        "phase": "Pending",
        "initContainerStatuses": [
            {
                "name": "fetch-model",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "message": "model download failed: HTTP error (404 or similar) for https://x\n",
                    }
                },
            }
        ],
    },
}
IMAGE_PULL = {
    "metadata": {"name": "p4"},
    "status": {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "llama-server",
                "image": "bad:1",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
            }
        ],
    },
}
CONFIG_ERROR = {
    "metadata": {"name": "p"},
    "status": {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "llama-server",
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "llm-key" not found'}},
            }
        ],
    },
}
CRASHING = {
    "metadata": {"name": "p5"},
    "status": {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "llama-server",
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                "lastState": {"terminated": {"exitCode": 1, "message": "error: bad flag\n"}},
            }
        ],
    },
}
REPLICA_FAILURE = {
    "type": "ReplicaFailure",
    "status": "True",
    "reason": "FailedCreate",
    "message": 'Pod "x-1" is invalid: spec.containers[0].image: must not have leading or trailing whitespace',
}
DEADLINE = {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "m"}


def oom_pod(template_hash: str = "h1") -> Obj:
    return {
        "metadata": {"name": "p2", "annotations": {HASH_ANNOTATION: template_hash}},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "llama-server", "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            ],
        },
    }


def ready_pod(template_hash: str = "h1", deleting: bool = False) -> Obj:
    meta: Obj = {"name": "p6", "annotations": {HASH_ANNOTATION: template_hash}}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def test_oom_kills_count_only_the_current_template() -> None:
    assert pod_signals([oom_pod()], "h1").oom_killed == ["p2"]
    assert pod_signals([oom_pod("old")], "h1").oom_killed == []
    assert pod_signals([oom_pod("old")]).oom_killed == ["p2"]  # no template given: every pod


def test_ready_pods_of_the_current_template_count_before_the_deployment_says_so() -> None:
    assert workload(deploy(ready=0), [ready_pod()], 1, "h1").ready == 1
    assert workload(deploy(ready=0), [ready_pod("old")], 1, "h1").ready == 0
    assert workload(deploy(ready=0), [ready_pod(deleting=True)], 1, "h1").ready == 0  # terminating
    assert workload(deploy(ready=0), [ready_pod()], 1).ready == 0  # no template: the Deployment's count


# ---- one setter per condition, a table each ---------------------------------------------------------


def given(
    d: Obj | None = None, pods: list[Obj] | None = None, desired: int = 1, template: str | None = None
) -> Workload:
    return workload(deploy() if d is None else d, pods or [], desired, template)


@pytest.mark.parametrize(
    ("w", "expect"),
    [
        (given(), ("True", "ReplicasReady", "1/1 replicas ready")),
        (given(deploy(0, 0, 0), desired=0), ("True", "ScaledToZero", "replicas is 0")),
        (given(deploy(ready=0)), ("False", "ReplicasNotReady", "0/1 replicas ready: starting")),
        (
            given(deploy(ready=0), [PENDING]),
            ("False", "ReplicasNotReady", "0/1 replicas ready: 0/3 nodes are available: 3 Insufficient memory."),
        ),
        (
            given(deploy(ready=0), [CONFIG_ERROR]),
            ("False", "ReplicasNotReady", '0/1 replicas ready: llama-server: secret "llm-key" not found'),
        ),
        (
            given(deploy(0, 0, 0, conditions=[REPLICA_FAILURE]), [PENDING]),  # the Deployment's word comes first
            ("False", "ReplicasNotReady", f"0/1 replicas ready: {REPLICA_FAILURE['message']}"),
        ),
        (given(deploy(ready=0), [ready_pod()], template="h1"), ("True", "ReplicasReady", "1/1 replicas ready")),
    ],
    ids=["ready", "scaled-to-zero", "starting", "unschedulable", "config-error", "replica-failure", "pod-ready-first"],
)
def test_set_ready(w: Workload, expect: Cond) -> None:
    c = set_ready(w)
    assert c.type == "Ready" and said(c) == expect


@pytest.mark.parametrize(
    ("w", "expect"),
    [
        (given(), ("False", "RolloutComplete", "1 replicas on the current plan")),
        (given(deploy(ready=0, updated=0)), ("True", "RollingOut", "0/1 updated, 0 ready")),
        (given(deploy(gen=2, observed=1)), ("True", "RollingOut", "1/1 updated, 1 ready")),
        (given(deploy(replicas=2)), ("True", "RollingOut", "1/1 updated, 1 ready")),  # an old pod still runs
        (given(deploy(ready=0, conditions=[DEADLINE])), ("False", "ProgressDeadlineExceeded", "m")),
        # a spec change not applied yet: the live Deployment, complete, runs the old pod template
        (given(on_template(deploy(), "old"), template="h1"), ("True", "RollingOut", "0/1 updated, 1 ready")),
        (
            given(on_template(deploy(), "h1"), template="h1"),
            ("False", "RolloutComplete", "1 replicas on the current plan"),
        ),
    ],
    ids=["complete", "rolling-out", "generation-not-seen", "surplus-pod", "deadline", "new-template", "same-template"],
)
def test_set_progressing(w: Workload, expect: Cond) -> None:
    c = set_progressing(w)
    assert c.type == "Progressing" and said(c) == expect


MISSING = condition("Degraded", "True", "SecretNotFound", "Secret llm-key (spec.apiKeySecretRef) does not exist")


@pytest.mark.parametrize(
    ("w", "missing", "expect"),
    [
        (given(), None, ("False", "AsExpected", "")),
        (
            given(deploy(ready=0), [DOWNLOAD_FAILED]),
            None,
            ("True", "ModelDownloadFailed", "model download failed: HTTP error (404 or similar) for https://x"),
        ),
        (
            given(deploy(ready=0), [oom_pod()], template="h1"),
            None,
            ("True", "OOMKilled", "llama-server was OOM-killed in p2"),
        ),
        (given(deploy(ready=0), [IMAGE_PULL]), None, ("True", "ImagePullFailed", "bad:1: not found")),
        (
            given(deploy(ready=0), [CONFIG_ERROR]),
            None,
            ("True", "ContainerConfigError", 'llama-server: secret "llm-key" not found'),
        ),
        (given(deploy(ready=0), [CRASHING]), None, ("True", "CrashLoopBackOff", "error: bad flag")),
        (
            given(deploy(0, 0, 0, conditions=[REPLICA_FAILURE]), [IMAGE_PULL]),
            None,
            ("True", "PodCreateFailed", REPLICA_FAILURE["message"]),
        ),
        (given(deploy(ready=0), [CONFIG_ERROR]), MISSING, said(MISSING)),  # the shell's check says it first
    ],
    ids=["as-expected", "download", "oom", "image-pull", "config-error", "crash", "pod-create", "missing-secret"],
)
def test_set_degraded(w: Workload, missing: Condition | None, expect: Cond) -> None:
    c = set_degraded(w, missing)
    assert c.type == "Degraded" and said(c) == expect


HOST = {"kubernetes.io/hostname": "cpu-small"}


@pytest.mark.parametrize(
    ("w", "kwargs", "expect"),
    [
        (given(), {}, ("False", "Scheduled", "all pods are scheduled")),
        (
            given(deploy(ready=0), [PENDING]),
            {},
            ("True", "FailedScheduling", "0/3 nodes are available: 3 Insufficient memory."),
        ),
        (
            given(deploy(ready=0), [PENDING]),
            {"shape": "large"},
            (
                "True",
                "WaitingForNode",
                "pods wait for a node of shape large (a cluster autoscaler can add one): "
                "0/3 nodes are available: 3 Insufficient memory.",
            ),
        ),
        (given(deploy(ready=0)), {"shape": "large"}, ("False", "Scheduled", "all pods are scheduled")),
        (
            given(deploy(ready=0), [PENDING]),
            {"waiting": "short by 1 CPU"},
            ("True", "WaitingForNode", "short by 1 CPU"),
        ),
        (
            given(desired=5),
            {"room": Room(2, 1, HOST)},
            (
                "True",
                "InsufficientCapacity",
                "5 replicas wanted, the 1 present node(s) of kubernetes.io/hostname=cpu-small hold 2; the others "
                "stay pending (a cluster autoscaler can add a node)",
            ),
        ),
        (given(desired=2), {"room": Room(2, 1, HOST)}, ("False", "Scheduled", "all pods are scheduled")),
        (given(desired=5), {"room": Room(0, 0, HOST)}, ("False", "Scheduled", "all pods are scheduled")),  # no node
        (
            given(deploy(ready=0), [PENDING], desired=5),  # the scheduler has said it
            {"room": Room(2, 1, HOST)},
            ("True", "FailedScheduling", "0/3 nodes are available: 3 Insufficient memory."),
        ),
    ],
    ids=[
        "scheduled",
        "failed-scheduling",
        "waits-for-shape",
        "shape-but-scheduled",
        "placement-waits",
        "insufficient-capacity",
        "room-enough",
        "no-node-of-the-class",
        "scheduler-first",
    ],
)
def test_set_unschedulable(w: Workload, kwargs: dict[str, Any], expect: Cond) -> None:
    c = set_unschedulable(w, **kwargs)
    assert c.type == "Unschedulable" and said(c) == expect


def test_planning_failures() -> None:
    v = {c.type: said(c) for c in planning_failure_conditions("ModelUnreadable", "404")}
    assert v["Planned"] == ("False", "ModelUnreadable", "404") and v["Degraded"][0] == "True"
    assert v["Ready"][1] == "NotPlanned" and "Unschedulable" not in v
    v = {c.type: said(c) for c in planning_failure_conditions("NoNodeFits", "short")}
    assert v["Unschedulable"] == ("True", "NoNodeFits", "short") and "Degraded" not in v


def test_api_failure_conditions_leave_planned_alone() -> None:
    c = {x.type: said(x) for x in api_failure_conditions("ApplyFailed", "Deployment x: HTTP 422: invalid")}
    assert set(c) == {"Ready", "Progressing", "Degraded"} and c["Degraded"][:2] == ("True", "ApplyFailed")


# ---- the status as read and written ------------------------------------------------------------------


def test_a_status_writes_only_what_was_set_and_reads_what_it_does_not_know() -> None:
    st = ModelDeploymentStatus(observed_generation=2, selector="s", conditions=[condition("Ready", "True", "R")])
    assert st.dump() == {
        "observedGeneration": 2,
        "selector": "s",
        "conditions": [{"type": "Ready", "status": "True", "reason": "R", "message": ""}],
    }  # no endpoint, replicas or oomKills: a merge patch leaves what is there
    read = ModelDeploymentStatus.model_validate({**st.dump(), "plan": {"hash": "h", "fromANewerOperator": 1}})
    assert read.plan is not None and read.plan.hash == "h"


# ---- status.plan from a placement and back -----------------------------------------------------------


def test_memory_status_is_a_declared_subset_of_the_breakdown() -> None:
    ours, theirs = MemoryStatus.model_fields, MemoryBreakdown.model_fields
    assert set(ours) <= set(theirs) and all(ours[k].annotation == theirs[k].annotation for k in ours)
    assert set(theirs) - set(ours) == UNRECORDED["memory"]


def test_a_plan_comes_back_from_its_status_as_it_was_placed(make_node) -> None:
    """``placement_from_status`` inverts ``plan_status``: every field of the plan comes back but those the status
    does not record (UNRECORDED), so a field added to the plan and the status is carried without a field list."""
    spec = ModelDeploymentSpec.model_validate({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "adapt": True})
    facts = catalog.catalog_facts("qwen3.5-0.8b", "Q4_0")
    placed = place(spec, facts, [node_facts_from_k8s(make_node("cpu-small"))], "/models/m.gguf")
    assert placed.result is not None
    recorded = plan_status(placed, facts, facts.file_bytes, "hash", 0.25)
    assert isinstance(recorded, PlanStatus) and recorded.node_class == placed.result.plan.node
    again = placement_from_status(recorded)
    assert again.result is not None
    assert again.fits and (again.reason, again.selector, again.adapted) == (
        placed.reason,
        placed.selector,
        placed.adapted,
    )

    def kept(result: PlanResult) -> Obj:
        out = result.model_dump(exclude=UNRECORDED["result"])
        out["plan"] = {k: v for k, v in out["plan"].items() if k not in UNRECORDED["plan"]}
        out["memory"] = {k: v for k, v in out["memory"].items() if k not in UNRECORDED["memory"]}
        return out

    assert kept(again.result) == kept(placed.result)
    assert set(Plan.model_fields) - set(PlanStatus.model_fields) == {"node", *UNRECORDED["plan"]}
