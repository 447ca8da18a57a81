"""Drift the generation does not show: children deleted, or edited while no operator watched (issue 17, item 6)."""

from __future__ import annotations

import copy

from modelfit.decide import first_difference
from modelfit.kube import path_for
from modelfit.reconciler import OperatorState
from test_handlers import CPU_LARGE, SEED, FakeKube, _merge, deploy_path, go, md

SERVICE = path_for("v1", "Service", "default", "qwen")


def settled() -> tuple[FakeKube, dict, dict]:
    k = FakeKube([CPU_LARGE])
    body = md(SEED)
    patch = go(body, k, OperatorState())
    body = {**body, "status": _merge({}, patch)}
    return k, body, copy.deepcopy(k.objects[deploy_path()])


def test_a_restart_with_nothing_changed_applies_nothing():
    k, body, _ = settled()
    applies = k.applies
    go(body, k, OperatorState())  # a new process
    assert k.applies == applies


def test_an_edit_made_while_the_operator_was_down_is_restored_on_its_first_look():
    k, body, before = settled()
    live = k.objects[deploy_path()]
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "example.com/hand-edited:1"
    live["metadata"]["generation"] = 7
    go(body, k, OperatorState())  # the first generation seen is no longer the baseline
    assert k.objects[deploy_path()]["spec"] == before["spec"]


def test_a_deleted_service_is_recreated():
    k, body, _ = settled()
    st = OperatorState()
    go(body, k, st)
    del k.objects[SERVICE]
    applies = k.applies
    go(body, k, st)  # no event: a reconcile alone does not look (the Service watch tells)
    assert SERVICE not in k.objects and k.applies == applies
    st.child_deleted(("default", "qwen"))  # the Service watch's DELETED event
    go(body, k, st)
    assert SERVICE in k.objects


def test_first_difference_ignores_defaults_and_quantity_spellings():
    want = {
        "replicas": 1,
        "template": {"spec": {"containers": [{"image": "a", "resources": {"limits": {"cpu": "1000m"}}}]}},
    }
    live = copy.deepcopy(want)
    live["progressDeadlineSeconds"] = 600
    live["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "1"
    live["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    assert first_difference(want, live, "spec") is None
    live["template"]["spec"]["containers"][0]["image"] = "b"
    assert first_difference(want, live, "spec") == "spec.template.spec.containers[0].image is 'b', not 'a'"
    live["template"]["spec"]["containers"].append({})
    assert "has 2 items, not 1" in (first_difference(want, live, "spec") or "")
    assert first_difference({"replicas": 1}, {"replicas": 3}, "spec") == "spec.replicas is 3, not 1"
