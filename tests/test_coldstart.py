"""The cold start of a new pod (issue 16, item 3): predicted by stage from the model's size and where its file is,
measured from the pods' own timestamps, shown in status.coldStart, and the one prediction the picker's queue TTL
takes; the startup probe looks every 2 s, so the load's end is seen within 2 s."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from modelfit import coldstart, routing
from modelfit.api import ColdStartStatus, ModelDeploymentSpec, ModelDeploymentStatus
from modelfit.coldstart import (
    CLEAR_BYTES_PER_S,
    DISK_BYTES_PER_S,
    DOWNLOAD_BYTES_PER_S,
    HASH_BYTES_PER_S,
    LOAD_BYTES_PER_S,
    STARTUP_PERIOD_S,
    measured,
    place,
    predict,
)
from modelfit.decide import decide
from modelfit.nodes import GiB
from modelfit.render import startup_failure_threshold
from test_decide import SMALL, child, snapshot

Obj = dict[str, Any]
Builder = Callable[..., Obj]
GB = 10**9
HOST_CACHE = {"hostPath": {"path": "/var/lib/modelfit"}}


def spec(**change: Any) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({**SMALL, **change})


def pod(name: str, created: str, ready_at: str | None = None, ready: bool = True) -> Obj:
    """A pod created at ``created`` whose Ready condition last moved at ``ready_at``."""
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": created}]
    if ready_at is not None:
        conditions.append({"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": ready_at})
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"phase": "Running", "conditions": conditions},
    }


# ---- the prediction ---------------------------------------------------------------------------------------------


def test_where_the_model_is_decides_the_fetch() -> None:
    assert place(spec()) == "download"  # emptyDir (the default): every new pod downloads
    assert place(spec(modelCache={"emptyDir": {}})) == "download"
    assert place(spec(modelCache=HOST_CACHE)) == "node"
    assert place(spec(modelCache={"pvc": {"size": "10Gi"}})) == "node"
    assert place(spec(model={"pvc": {"claimName": "models", "path": "m.gguf"}})) == "volume"


def test_a_node_cache_skips_the_download_and_the_check_but_not_the_load() -> None:
    size = GB // 2
    volume = spec(model={"pvc": {"claimName": "m", "path": "m.gguf"}})
    down, node, vol = (predict(size, s) for s in (spec(), spec(modelCache=HOST_CACHE), volume))
    assert down.stages["fetch"] == pytest.approx(size / DOWNLOAD_BYTES_PER_S)
    assert node.stages["fetch"] == vol.stages["fetch"] == 0
    # A download is hashed as it lands; a node's cached file was hashed once, after its download (a wake trusts the
    # stamp written then), and a model on its own PVC is not checked: both are read from disk by the load.
    assert down.stages["verify"] == pytest.approx(size / HASH_BYTES_PER_S)
    assert node.stages["verify"] == vol.stages["verify"] == 0
    assert node.stages["load"] == vol.stages["load"]
    assert vol.stages["load"] == pytest.approx(size / LOAD_BYTES_PER_S["none"] + size / DISK_BYTES_PER_S)
    assert node.seconds < down.seconds
    # A warm page cache saves the disk read where there is one; a download has none to save.
    assert node.warm_seconds == pytest.approx(node.seconds - size / DISK_BYTES_PER_S)
    assert vol.warm_seconds == pytest.approx(vol.seconds - size / DISK_BYTES_PER_S)
    assert down.warm_seconds == pytest.approx(down.seconds)
    for p in (down, node, vol):
        assert p.stages["image"] == 0 and p.stages["probe"] == STARTUP_PERIOD_S
        assert p.seconds == pytest.approx(sum(p.stages.values()))
        assert any(r.startswith("image: 0 s") and "on the node" in r for r in p.reasons)
    assert any("every new pod downloads" in r for r in down.reasons)
    assert any("node's cache" in r for r in node.reasons) and any("from disk" in r for r in node.reasons)
    assert any("not checked" in r for r in vol.reasons)


def test_the_prediction_grows_with_the_file_and_the_kv_cache() -> None:
    s = spec(modelCache=HOST_CACHE)
    assert predict(5 * GB, s).seconds > predict(GB // 2, s).seconds
    kv = predict(GB, s, kv_bytes=2 * GB).stages["warmup"] - predict(GB, s).stages["warmup"]
    assert kv == pytest.approx(2 * GB / CLEAR_BYTES_PER_S)
    assert predict(GB, s, "mmap").stages["load"] == pytest.approx(GB / LOAD_BYTES_PER_S["mmap"] + GB / DISK_BYTES_PER_S)
    with pytest.raises(ValueError, match="model_bytes"):
        predict(-1, s)


# ---- the measurement --------------------------------------------------------------------------------------------


def test_the_newest_pod_is_measured_once_it_is_ready() -> None:
    old = pod("a", "2026-01-01T00:00:00Z", "2026-01-01T00:00:30Z")
    new = pod("b", "2026-01-01T00:10:00Z", "2026-01-01T00:10:07Z")
    got = measured([old, new])
    assert got is not None and (got.pod, got.seconds, got.ready_at) == ("b", 7.0, "2026-01-01T00:10:07Z")
    # The newest pod still starting: nothing new (not the older one's start again).
    assert measured([old, pod("c", "2026-01-01T00:20:00Z")]) is None
    assert measured([old, pod("c", "2026-01-01T00:20:00Z", "2026-01-01T00:20:01Z", ready=False)]) is None
    # Timestamps that do not parse, or a Ready before the creation, measure nothing.
    assert measured([pod("d", "yesterday", "2026-01-01T00:00:01Z")]) is None
    assert measured([pod("e", "2026-01-01T00:00:10Z", "2026-01-01T00:00:01Z")]) is None
    assert measured([]) is None


def test_the_last_measured_is_kept_and_a_pod_is_measured_once() -> None:
    p = predict(GB, spec())
    first = coldstart.status(p, [pod("a", "2026-01-01T00:00:00Z", "2026-01-01T00:00:09Z")], None)
    assert (first.last_measured_pod, first.last_measured_seconds) == ("a", 9.0)
    # Pod a later flips NotReady -> Ready (a readiness probe failed under load): its start is not measured again.
    flipped = coldstart.status(p, [pod("a", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z")], first)
    assert (flipped.last_measured_pod, flipped.last_measured_seconds) == ("a", 9.0)
    # A newer pod still starting (or no pod at all: scaled to zero) keeps the last measured.
    for pods in ([pod("b", "2026-01-01T02:00:00Z")], []):
        kept = coldstart.status(p, pods, first)
        assert (kept.last_measured_pod, kept.last_measured_seconds, kept.last_measured_at) == (
            "a",
            9.0,
            "2026-01-01T00:00:09Z",
        )
    newer = coldstart.status(p, [pod("b", "2026-01-01T02:00:00Z", "2026-01-01T02:00:04Z")], first)
    assert (newer.last_measured_pod, newer.last_measured_seconds) == ("b", 4.0)
    assert newer.predicted_seconds == round(p.seconds, 1) and newer.stages.load == round(p.stages["load"], 1)


# ---- decide writes it; the picker's TTL takes the same prediction; the probe sees the load's end ----------------


def test_decide_writes_the_predicted_and_the_measured_cold_start(make_node: Builder) -> None:
    nodes = [make_node("cpu-large")]
    first = decide(snapshot({**SMALL, "modelCache": HOST_CACHE}, nodes))
    cs = first.status.cold_start
    assert cs is not None and cs.last_measured_seconds is None
    plan = first.status.plan
    assert plan is not None
    want = predict(plan.model_bytes, spec(modelCache=HOST_CACHE), plan.load_mode, plan.memory.kv_cache_bytes)
    assert cs.predicted_seconds == round(want.seconds, 1) and cs.predicted_warm_seconds == round(want.warm_seconds, 1)
    assert cs.stages.fetch == 0 and cs.stages.probe == STARTUP_PERIOD_S
    # The pod it made comes up: created 05:00:00, Ready 05:00:17.
    pods = [pod("qwen-1", "2026-01-01T05:00:00Z", "2026-01-01T05:00:17Z")]
    then = decide(snapshot({**SMALL, "modelCache": HOST_CACHE}, nodes, old=first.status, pods=pods))
    cs = then.status.cold_start
    assert cs is not None and (cs.last_measured_pod, cs.last_measured_seconds) == ("qwen-1", 17.0)
    dumped = then.status.dump()["coldStart"]
    assert dumped["lastMeasuredSeconds"] == 17.0 and dumped["stages"]["probe"] == STARTUP_PERIOD_S
    assert dumped["predictedSeconds"] == cs.predicted_seconds
    # Read back from the API server and decided again with a new pod still loading: the measurement stays.
    read = ModelDeploymentStatus.model_validate(then.status.dump())
    pods.append(pod("qwen-2", "2026-01-01T06:00:00Z"))
    again = decide(snapshot({**SMALL, "modelCache": HOST_CACHE}, nodes, old=read, pods=pods))
    assert again.status.cold_start is not None and again.status.cold_start.last_measured_seconds == 17.0


def test_the_queue_ttl_and_the_status_are_one_prediction(make_node: Builder) -> None:
    routed_spec = {**SMALL, "routing": {"mode": "InferencePool"}, "modelCache": HOST_CACHE}
    snap = dataclasses.replace(snapshot(routed_spec, [make_node("cpu-large")]), inference_pools=True)
    d = decide(snap)
    cs, plan = d.status.cold_start, d.status.plan
    assert cs is not None and plan is not None
    cold = predict(plan.model_bytes, snap.spec, plan.load_mode, plan.memory.kv_cache_bytes).seconds
    assert cs.predicted_seconds == round(cold, 1)
    epp = next(o for o in d.apply if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "qwen-epp")
    ttl = int(yaml.safe_load(epp["data"]["epp.yaml"])["flowControl"]["defaultRequestTTL"].rstrip("s"))
    assert ttl == min(routing.MAX_QUEUE_TTL_S, max(routing.MIN_QUEUE_TTL_S, math.ceil(1.5 * cold)))
    assert f"predicted cold start of {cold:.0f} s" in " ".join(plan.reasons)
    assert routing.cold_start_s(plan.model_bytes, snap.spec) == round(predict(plan.model_bytes, snap.spec).seconds, 1)


def test_the_startup_probe_sees_the_load_end_within_two_seconds(make_node: Builder) -> None:
    d = decide(snapshot(SMALL, [make_node("cpu-large")]))
    server = next(
        c for c in child(d, "Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "llama-server"
    )
    probe = server["startupProbe"]
    assert probe["periodSeconds"] == STARTUP_PERIOD_S == 2
    plan = d.status.plan
    assert plan is not None
    # The time allowed to load stays a minute plus 30 s per GiB (10 s probes before): only how often it looks moved.
    budget = 60 + 30 * math.ceil(plan.model_bytes / GiB)
    assert probe["failureThreshold"] * probe["periodSeconds"] == budget
    assert startup_failure_threshold(10_000 * GiB) * STARTUP_PERIOD_S == 3600  # capped at an hour
    assert server["readinessProbe"]["periodSeconds"] == 10  # once started, readiness is looked at as before


def test_an_old_status_without_a_cold_start_still_reads() -> None:
    read = ModelDeploymentStatus.model_validate({"observedGeneration": 1})
    assert read.cold_start is None
    back = ModelDeploymentStatus.model_validate({"coldStart": {"predictedSeconds": 4.5, "lastMeasuredPod": "p"}})
    assert back.cold_start == ColdStartStatus(predicted_seconds=4.5, last_measured_pod="p")


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"modelCache": HOST_CACHE},
        {"modelCache": {"pvc": {"size": "10Gi"}}},
    ],
    ids=["emptyDir", "hostPath", "pvc-cache"],  # a model on its own PVC: none (tests/test_render.py)
)
def test_each_init_container_the_pod_runs_costs_a_relist_of_the_kubelet(
    make_node: Builder, change: dict[str, Any]
) -> None:
    """The kubelet starts the next container only after its next look at the runtime (1 s): the prediction counts
    the init containers the rendered pod really has."""
    d = decide(snapshot({**SMALL, **change}, [make_node("cpu-large")]))
    pod_spec = child(d, "Deployment")["spec"]["template"]["spec"]
    inits = len(pod_spec.get("initContainers") or [])
    s = spec(**change)
    assert coldstart.init_containers(s) == inits == (1 if place(s) == "download" else inits)
    assert predict(GB, s).stages["scheduling"] == coldstart.SCHEDULING_S + coldstart.RELIST_S * inits
    assert f"each of its {inits} init container(s)" in " ".join(predict(GB, s).reasons)
