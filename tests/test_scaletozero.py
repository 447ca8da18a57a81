"""Scale to zero (issue 16, item 2): the verdict as a function (wake on a held request, sleep after the idle period,
never while a pod starts), the decision that follows it (the Deployment and spec.replicas, the HPA's floor, the
status, the events), the spec's rule, the reading of the picker's metrics, and the shell's watch against a
picker served over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
import yaml
from pydantic import ValidationError

from modelfit import scaletozero
from modelfit.api import ModelDeploymentSpec, ModelDeploymentStatus, ScaleToZeroStatus
from modelfit.decide import Decision, decide
from modelfit.reconciler import OperatorState, _Seen
from modelfit.scaletozero import Activity, busy, should_look, verdict
from modelfit.settings import Settings
from modelfit.zerowatch import Unreadable, ZeroWatch, held_of, parse_activity, read_activity
from test_decide import SMALL, snapshot
from test_routing import named

Obj = dict[str, Any]
Builder = Callable[..., Obj]
NOW = 1_800_000_000.0
ZERO = {
    **SMALL,
    "replicas": 1,
    "routing": {"mode": "InferencePool"},
    "autoscaling": {"minReplicas": 0, "maxReplicas": 3, "idleSeconds": 60},
}
QUIET = Activity(served=12, failed=0, running=0, held=0)


def spec_of(raw: Obj) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate(raw)


def pod(name: str = "qwen-1", ready_at: float | None = NOW - 600, deleting: bool = False) -> Obj:
    conditions = []
    if ready_at is not None:
        at = datetime.datetime.fromtimestamp(ready_at, datetime.UTC).isoformat().replace("+00:00", "Z")
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": at})
    else:
        conditions.append({"type": "Ready", "status": "False"})
    meta: Obj = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2027-01-15T08:00:00Z"
    return {"metadata": meta, "status": {"conditions": conditions}}


# ---- the verdict ------------------------------------------------------------------------------


def test_an_idle_model_goes_to_zero_after_its_idle_period() -> None:
    spec = spec_of(ZERO)
    got = verdict(spec, [pod()], QUIET, last_busy=NOW - 61, now=NOW)
    assert got.replicas == 0 and "no request for 61 s" in got.message
    soon = verdict(spec, [pod()], QUIET, last_busy=NOW - 20, now=NOW)
    assert soon.replicas is None and soon.look_again == pytest.approx(40)


def test_the_idle_period_counts_from_the_newest_pods_ready() -> None:
    """A pod that just turned Ready (woken, or a rollout's new pod) gets its whole idle period."""
    spec = spec_of({**ZERO, "replicas": 2})
    pods = [pod("a", ready_at=NOW - 600), pod("b", ready_at=NOW - 10)]
    got = verdict(spec, pods, QUIET, last_busy=NOW - 600, now=NOW)
    assert got.replicas is None and got.look_again == pytest.approx(50)


@pytest.mark.parametrize(
    "pods",
    [
        [pod(ready_at=None)],  # pending, downloading or loading
        [],  # the Deployment has not made it yet
        [pod("a"), pod("b", deleting=True)],  # two wanted, one live
    ],
    ids=["not-ready", "no-pod-yet", "one-of-two"],
)
def test_a_pod_still_starting_is_never_scaled_down(pods: list[Obj]) -> None:
    spec = spec_of({**ZERO, "replicas": 1 if len(pods) < 2 else 2})
    got = verdict(spec, pods, QUIET, last_busy=NOW - 10_000, now=NOW)
    assert got.replicas is None and "still starting" in got.message


@pytest.mark.parametrize("activity", [Activity(running=1), Activity(held=2)], ids=["running", "held"])
def test_a_model_with_requests_stays(activity: Activity) -> None:
    got = verdict(spec_of(ZERO), [pod()], activity, last_busy=NOW - 10_000, now=NOW)
    assert got.replicas is None and got.look_again == 60


def test_a_held_request_wakes_a_model_at_zero_with_one_pod() -> None:
    spec = spec_of({**ZERO, "replicas": 0})
    assert verdict(spec, [], Activity(held=20), last_busy=0, now=NOW).replicas == 1  # a burst: one scale-up
    assert verdict(spec, [], QUIET, last_busy=0, now=NOW).replicas is None


def test_nothing_moves_on_an_unread_picker_or_without_min_replicas_zero() -> None:
    assert verdict(spec_of(ZERO), [pod()], None, last_busy=0, now=NOW).replicas is None
    assert verdict(spec_of({**ZERO, "replicas": 0}), [], None, last_busy=0, now=NOW).replicas is None
    floor_one = spec_of({**ZERO, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}})
    assert verdict(floor_one, [pod()], QUIET, last_busy=0, now=NOW).replicas is None


def test_busy_is_any_request_between_two_reads() -> None:
    assert busy(None, QUIET)  # the first read after a start
    assert not busy(QUIET, QUIET)
    assert busy(QUIET, dataclasses.replace(QUIET, served=13))
    assert busy(QUIET, dataclasses.replace(QUIET, failed=1))  # a refused request is a request too
    assert busy(QUIET, dataclasses.replace(QUIET, served=0))  # the picker restarted: its counters went back
    assert busy(QUIET, dataclasses.replace(QUIET, held=1))


def test_should_look_asks_for_a_reconcile_only_when_one_can_act() -> None:
    at_zero = spec_of({**ZERO, "replicas": 0})
    assert should_look(at_zero, 0, Activity(held=1), last_busy=NOW, now=NOW)
    assert not should_look(at_zero, 0, QUIET, last_busy=0, now=NOW)
    active = spec_of(ZERO)
    assert should_look(active, 1, QUIET, last_busy=NOW - 61, now=NOW)
    assert not should_look(active, 1, QUIET, last_busy=NOW - 59, now=NOW)
    assert not should_look(active, 0, QUIET, last_busy=NOW - 61, now=NOW)  # not Ready yet


# ---- the spec ---------------------------------------------------------------------------------


def test_min_replicas_zero_needs_the_picker() -> None:
    raw = {**ZERO}
    del raw["routing"]
    with pytest.raises(ValidationError, match=r"needs routing\.mode InferencePool"):
        spec_of(raw)
    with pytest.raises(ValidationError, match="greater than or equal to 10"):
        spec_of({**ZERO, "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "idleSeconds": 5}})
    assert spec_of(ZERO).autoscaling is not None and spec_of({**ZERO, "autoscaling": {"maxReplicas": 2}})


def test_the_crd_carries_the_same_rule() -> None:
    from modelfit import crd

    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["message"] for r in schema["x-kubernetes-validations"]]
    assert any("minReplicas 0 needs routing.mode InferencePool" in m for m in rules)
    a = schema["properties"]["autoscaling"]["properties"]
    assert a["minReplicas"]["minimum"] == 0 and a["idleSeconds"]["minimum"] == 10


# ---- the decision ------------------------------------------------------------------------------


def zero_decision(make_node: Builder, raw: Obj, **change: Any) -> Decision:
    snap = snapshot(raw, [make_node("cpu-large")], pods=change.pop("pods", []))
    change = {"inference_pools": True, "wall": NOW, **change}
    return decide(dataclasses.replace(snap, **change))


def test_decide_puts_an_idle_model_to_zero(make_node: Builder) -> None:
    d = zero_decision(make_node, ZERO, pods=[pod()], activity=QUIET, last_busy=NOW - 120)
    assert d.scale == 0
    assert named(d, "Deployment", "qwen")["spec"]["replicas"] == 0
    assert named(d, "HorizontalPodAutoscaler", "qwen")["spec"]["minReplicas"] == 1  # the HPA's floor stays 1
    assert named(d, "Deployment", "qwen-epp")["spec"]["replicas"] == 1  # the picker stays: it holds requests
    st = d.status.scale_to_zero
    assert st is not None and st.state == "Zero" and st.since.startswith("2027-01-15")
    assert [r for r, _ in d.events if r != "PlanChanged"] == ["ScaledToZero"]  # (its first plan, here)
    ready = next(c for c in d.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "ScaledToZero")
    assert d.status.plan is not None and d.status.plan.fits  # the plan stays in status
    line = next(r for r in d.status.plan.reasons if r.startswith("autoscaling "))
    assert "to zero after 60 s without a request" in line and "every wake downloads the model" in line


def test_a_model_that_may_go_to_zero_is_ready_the_moment_its_one_second_readiness_probe_passes(
    make_node: Builder,
) -> None:
    """A held request waits on every start of such a model: no startup probe (a passed one leaves Ready to the
    kubelet's next pod sync, up to a second later), readiness every second, liveness held off for the same load
    budget; the predicted cold start's probe stage says so."""
    zero = zero_decision(make_node, ZERO)
    always = zero_decision(make_node, {**ZERO, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}})

    def server(d: Decision) -> Obj:
        pod = named(d, "Deployment", "qwen")["spec"]["template"]["spec"]
        return next(c for c in pod["containers"] if c["name"] == "llama-server")

    fast, slow = server(zero), server(always)
    assert "startupProbe" not in fast and fast["readinessProbe"]["periodSeconds"] == 1
    assert fast["readinessProbe"]["httpGet"]["path"] == "/health"
    assert (slow["startupProbe"]["periodSeconds"], slow["readinessProbe"]["periodSeconds"]) == (2, 10)
    budget = slow["startupProbe"]["failureThreshold"] * 2
    assert fast["livenessProbe"]["initialDelaySeconds"] == budget and "initialDelaySeconds" not in slow["livenessProbe"]
    assert fast["livenessProbe"]["periodSeconds"] == slow["livenessProbe"]["periodSeconds"] == 20
    assert zero.status.cold_start is not None and zero.status.cold_start.stages.probe == 1
    assert always.status.cold_start is not None and always.status.cold_start.stages.probe == 2
    assert "readiness probe looks every 1 s" in " ".join(zero.status.cold_start.reasons)


def test_a_model_that_may_go_to_zero_reads_its_file_from_the_nodes_cache_when_the_admin_allows_one(
    make_node: Builder,
) -> None:
    """Every wake would download the file again into a fresh emptyDir: with an allowed root, such a model that
    names no cache gets the node's (its own directory under the first root), the plan's reason goes, and the
    predicted cold start loses its download. A named cache, a model on a PVC or no allowed root: as it was."""
    roots = Settings(host_path_roots=("/var/lib/modelfit/models", "/mnt/other"))

    def volumes(d: Decision) -> dict[str, Obj]:
        return {v["name"]: v for v in named(d, "Deployment", "qwen")["spec"]["template"]["spec"]["volumes"]}

    cached = zero_decision(make_node, ZERO, settings=roots)
    (host,) = [v["hostPath"]["path"] for v in volumes(cached).values() if "hostPath" in v]
    assert host.startswith("/var/lib/modelfit/models/")
    assert cached.status.plan is not None
    assert not any("every wake downloads" in r for r in cached.status.plan.reasons)
    assert cached.status.cold_start is not None and cached.status.cold_start.stages.fetch == 0
    for raw, settings in (
        (ZERO, Settings()),
        ({**ZERO, "modelCache": {"emptyDir": {}}}, roots),
        ({**ZERO, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}, roots),
    ):
        d = zero_decision(make_node, raw, settings=settings)
        assert not any("hostPath" in v for v in volumes(d).values()), raw


def test_decide_wakes_a_model_at_zero(make_node: Builder) -> None:
    old = ModelDeploymentStatus(scale_to_zero=ScaleToZeroStatus(state="Zero", since="2027-01-15T07:00:00Z", wakes=2))
    d = zero_decision(make_node, {**ZERO, "replicas": 0}, old=old, activity=Activity(held=3), last_busy=NOW)
    assert d.scale == 1 and named(d, "Deployment", "qwen")["spec"]["replicas"] == 1
    st = d.status.scale_to_zero
    assert st is not None and (st.state, st.wakes) == ("Active", 3) and "3 request(s) held" in st.message
    assert [r for r, _ in d.events if r != "PlanChanged"] == ["Woken"]


def test_decide_leaves_a_model_alone_without_a_verdict(make_node: Builder) -> None:
    d = zero_decision(make_node, ZERO, pods=[pod()], activity=QUIET, last_busy=NOW - 5)
    assert d.scale is None and named(d, "Deployment", "qwen")["spec"]["replicas"] == 1
    st = d.status.scale_to_zero
    assert st is not None and st.state == "Active" and not {"Woken", "ScaledToZero"} & {r for r, _ in d.events}
    plain = zero_decision(make_node, {**SMALL, "routing": {"mode": "InferencePool"}})
    assert plain.scale is None and plain.status.scale_to_zero is None


def test_a_model_that_may_sleep_keeps_busy_pods_candidates(make_node: Builder) -> None:
    """A wake releases every held request at once to the first pod, faster than the picker counts them in flight:
    with the busy-pod filter all but the first got 429 on the real node."""
    d = zero_decision(make_node, ZERO)
    config = yaml.safe_load(named(d, "ConfigMap", "qwen-epp")["data"]["epp.yaml"])
    assert {"pluginRef": "concurrency-detector"} not in config["schedulingProfiles"][0]["plugins"]
    assert config["saturationDetector"] == {"pluginRef": "concurrency-detector"}  # the pool still fills up
    assert d.status.plan is not None and any("A busy pod stays a candidate" in r for r in d.status.plan.reasons)
    always = zero_decision(make_node, {**ZERO, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}})
    config = yaml.safe_load(named(always, "ConfigMap", "qwen-epp")["data"]["epp.yaml"])
    assert config["schedulingProfiles"][0]["plugins"][0] == {"pluginRef": "concurrency-detector"}


def test_the_picker_admits_the_operator_to_its_metrics_for_a_model_that_may_sleep(make_node: Builder) -> None:
    settings = Settings(network_policy=True, operator_namespace="modelfit-system")
    d = zero_decision(make_node, ZERO, settings=settings)
    ingress = named(d, "NetworkPolicy", "qwen-epp")["spec"]["ingress"]
    operator = {"kubernetes.io/metadata.name": "modelfit-system"}
    assert {
        "from": [{"namespaceSelector": {"matchLabels": operator}}],
        "ports": [{"protocol": "TCP", "port": 9090}],
    } in (ingress)
    plain = zero_decision(make_node, {**SMALL, "routing": {"mode": "InferencePool"}}, settings=settings)
    assert all(
        9090 not in [p["port"] for p in r.get("ports", [])]
        for r in named(plain, "NetworkPolicy", "qwen-epp")["spec"]["ingress"]
    )


# ---- reading the picker --------------------------------------------------------------------------

EPP_METRICS = """# HELP inference_objective_request_total [ALPHA] Counter of inference objective requests.
# TYPE inference_objective_request_total counter
inference_objective_request_total{model_name="qwen",priority="0",target_model_name="qwen"} 7
inference_objective_request_total{model_name="other",priority="0",target_model_name="other"} 2
# HELP inference_objective_request_error_total [ALPHA] Counter of inference objective requests errors.
# TYPE inference_objective_request_error_total counter
inference_objective_request_error_total{error_code="ServiceUnavailable",model_name="qwen",target_model_name="qwen"} 1
# HELP inference_objective_running_requests [ALPHA] Inference objective number of running requests in each model.
# TYPE inference_objective_running_requests gauge
inference_objective_running_requests{model_name="qwen"} 1
# HELP inference_extension_flow_control_queue_size [ALPHA] Current number of requests being queued.
# TYPE inference_extension_flow_control_queue_size gauge
inference_extension_flow_control_queue_size{fairness_id="",inference_pool="qwen",model_name="qwen",priority="0",target_model_name="qwen"} 4
# HELP inference_pool_ready_pods [ALPHA] The number of ready pods in the inference server pool.
# TYPE inference_pool_ready_pods gauge
inference_pool_ready_pods{name="qwen"} 0
"""


def test_parse_activity_sums_the_pickers_series() -> None:
    assert parse_activity(EPP_METRICS) == Activity(served=9, failed=1, running=1, held=4)
    assert parse_activity("# nothing yet\n") == Activity()  # the families appear with the first request
    with pytest.raises(ValueError):
        parse_activity("inference_objective_request_total{model_name=} x\n")


def test_held_of_reads_only_the_held_count() -> None:
    """A model at zero is read four times a second: only the held family is looked at, the rest not parsed."""
    assert held_of(EPP_METRICS) == 4 == parse_activity(EPP_METRICS).held
    assert held_of("# nothing yet\n") == 0
    two = (
        'inference_extension_flow_control_queue_size{priority="0",target_model_name="a}b"} 2 1700000000000\n'
        "inference_extension_flow_control_queue_size 3\n"
        "inference_extension_flow_control_queue_size_bytes 999\n"  # another family with the same prefix
        "inference_extension_flow_control_queue_size NaN\n"
    )
    assert held_of(two) == 5
    with pytest.raises(ValueError):
        held_of('inference_extension_flow_control_queue_size{a="b"} many\n')


class _Picker(http.server.BaseHTTPRequestHandler):
    """A picker's /metrics: the body in 4 KiB writes with pauses, as a real one arrives (one read is not all)."""

    body = EPP_METRICS
    reads = 0

    def do_GET(self) -> None:
        _Picker.reads += 1
        data = _Picker.body.encode()
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(0, len(data), 4096):
            self.wfile.write(data[i : i + 4096])
            self.wfile.flush()
            time.sleep(0.001)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def picker_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Picker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


class _Kube:
    """The picker's pod as the API lists it: Ready, at 127.0.0.1 (its metrics port is patched to the server's)."""

    def __init__(self) -> None:
        self.lists: list[str] = []

    async def list(self, path: str, **params: str) -> list[Obj]:
        self.lists.append(params.get("labelSelector", ""))
        return [{"metadata": {"name": "qwen-epp-1"}, "status": {"podIP": "127.0.0.1", **pod()["status"]}}]


def test_the_watch_wakes_a_model_at_zero_with_a_held_request(
    picker_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelfit.zerowatch.PICKER_METRICS_PORT", picker_server)
    state = OperatorState()
    key = ("default", "qwen")
    state.seen[key] = _Seen(at=1.0)
    state.bodies[key] = {"spec": {**ZERO, "replicas": 0}, "status": {"readyReplicas": 0}}
    kube = _Kube()
    woken: list[Obj] = []

    async def act(body: Obj, *_: Any) -> Obj:
        woken.append(body)
        return {}

    watch = ZeroWatch(state, kube, act)  # type: ignore[arg-type]

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await watch.tick(session)
            assert woken == [state.bodies[key]]  # 4 held: reconciled at once, not after the resync's debounce
            assert state.seen[key].activity == Activity(served=9, failed=1, running=1, held=4)
            _Picker.body = "# empty\n"
            await watch.tick(session)
            assert len(woken) == 1 and not state.seen[key].pods_dirty  # nothing held at zero: nothing to do

    try:
        asyncio.run(run())
    finally:
        _Picker.body = EPP_METRICS
    assert kube.lists == ["app.kubernetes.io/name=endpoint-picker,app.kubernetes.io/instance=qwen-epp"]  # cached


def test_a_model_at_zero_is_read_every_tick_and_an_active_one_every_second(
    picker_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held request at zero waits for the read that sees it: such a model's picker is read every tick (its held
    count only, between full reads each second); an active model's once a second."""
    monkeypatch.setattr("modelfit.zerowatch.PICKER_METRICS_PORT", picker_server)
    state = OperatorState()
    zero, active = ("default", "qwen"), ("default", "busy")
    state.seen[zero] = _Seen(at=1.0)
    state.seen[active] = _Seen(at=1.0, last_busy=time.time())
    state.bodies[zero] = {"spec": {**ZERO, "replicas": 0}, "status": {}}
    state.bodies[active] = {"spec": ZERO, "status": {"readyReplicas": 1}}
    woken: list[Obj] = []

    async def act(body: Obj, *_: Any) -> Obj:
        woken.append(body)
        return {}

    watch = ZeroWatch(state, _Kube(), act)  # type: ignore[arg-type]

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            _Picker.body = "# empty\n"
            await watch.tick(session)  # both read in full
            assert _Picker.reads == 2 and state.seen[zero].activity == Activity()
            _Picker.body = EPP_METRICS.replace("} 7", "} 70")  # a full read would see 72 served
            await watch.tick(session)  # only the model at zero, its held count only: it wakes
            assert _Picker.reads == 3 and woken == [state.bodies[zero]]
            assert state.seen[zero].activity == Activity(held=4)
            assert state.seen[active].activity == Activity()  # not read again within its second

    _Picker.reads = 0
    try:
        asyncio.run(run())
    finally:
        _Picker.body = EPP_METRICS


def test_a_failed_wake_is_left_to_the_resync_loop(picker_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelfit.zerowatch.PICKER_METRICS_PORT", picker_server)
    state = OperatorState()
    key = ("default", "qwen")
    state.seen[key] = _Seen(at=1.0)
    state.bodies[key] = {"spec": {**ZERO, "replicas": 0}, "status": {}}

    async def act(*_: Any) -> Obj:
        raise RuntimeError("the API server went away")

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await ZeroWatch(state, _Kube(), act).tick(session)  # type: ignore[arg-type]

    asyncio.run(run())  # no exception out of the tick
    assert state.seen[key].pods_dirty  # 4 held: the resync loop tries again


def test_the_watch_puts_an_idle_model_to_sleep_and_ignores_other_models(
    picker_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("modelfit.zerowatch.PICKER_METRICS_PORT", picker_server)
    _Picker.body = "# empty\n"
    state = OperatorState()
    idle, other = ("default", "qwen"), ("default", "plain")
    state.seen[idle] = _Seen(at=1.0, activity=Activity(), last_busy=1.0)  # quiet since long ago
    state.seen[other] = _Seen(at=1.0)
    state.bodies[idle] = {"spec": ZERO, "status": {"readyReplicas": 1}}
    state.bodies[other] = {"spec": {**SMALL, "routing": {"mode": "InferencePool"}}, "status": {}}
    kube = _Kube()

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await ZeroWatch(state, kube).tick(session)  # type: ignore[arg-type]

    try:
        asyncio.run(run())
    finally:
        _Picker.body = EPP_METRICS
    assert state.seen[idle].pods_dirty and not state.seen[other].pods_dirty
    assert len(kube.lists) == 1


FILLER = "".join(
    f'inference_pool_per_pod_queue_size{{model_server_pod="chat-{i}",name="chat"}} 0\n' for i in range(3000)
)


def test_the_whole_body_is_read_and_a_huge_one_refused(picker_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """About 200 KB arrive in many pieces (the real picker's go_* and histogram series: a first read got a part)."""
    url = f"http://127.0.0.1:{picker_server}/metrics"

    async def read() -> Activity:
        async with aiohttp.ClientSession() as session:
            return await read_activity(session, url)

    _Picker.body = FILLER + EPP_METRICS + FILLER
    try:
        assert asyncio.run(read()) == Activity(served=9, failed=1, running=1, held=4)
        monkeypatch.setattr("modelfit.zerowatch.METRICS_LIMIT", 100_000)
        with pytest.raises(Unreadable, match="larger than 100000 bytes"):
            asyncio.run(read())
    finally:
        _Picker.body = EPP_METRICS


def test_an_unreadable_picker_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelfit.zerowatch.PICKER_METRICS_PORT", 1)  # nothing listens
    state = OperatorState()
    key = ("default", "qwen")
    state.seen[key] = _Seen(at=1.0, activity=QUIET, last_busy=1.0)
    state.bodies[key] = {"spec": ZERO, "status": {"readyReplicas": 1}}

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await ZeroWatch(state, _Kube()).tick(session)  # type: ignore[arg-type]

    asyncio.run(run())
    assert not state.seen[key].pods_dirty and state.seen[key].activity is None
    assert scaletozero.verdict(spec_of(ZERO), [pod()], None, 1.0, NOW).replicas is None
