"""A rotated API key rolls the model's pods; the operator reads only the Secrets a spec names (issue 17, item 5)."""

from __future__ import annotations

import asyncio

from modelfit.kube import KubeError, path_for
from modelfit.reconciler import OperatorState, check_api_keys
from modelfit.render import API_KEY_ANNOTATION, HASH_ANNOTATION
from test_handlers import CPU_LARGE, SEED, FakeKube, _merge, deploy_path, go, md

SPEC = {**SEED, "apiKeySecretRef": {"name": "qwen-key", "key": "key"}}
SECRET = path_for("v1", "Secret", "default", "qwen-key")


class RecordingKube(FakeKube):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.events = []
        self.gets = []

    async def create(self, path, body):
        if body.get("kind") == "Event":
            self.events.append((body["reason"], body["message"]))
        return body

    async def get(self, path):
        self.gets.append(path)
        return await super().get(path)


def secret(version: str) -> dict:
    return {
        "metadata": {"name": "qwen-key", "namespace": "default", "resourceVersion": version},
        "data": {"key": "eA=="},
    }


def template(k: FakeKube) -> dict:
    return k.objects[deploy_path()]["spec"]["template"]["metadata"]["annotations"]


def test_a_changed_key_secret_rolls_the_pods_and_is_not_a_new_plan():
    k, st = RecordingKube([CPU_LARGE]), OperatorState()
    k.objects[SECRET] = secret("100")
    body = md(SPEC)
    first = go(body, k, st)
    st.bodies[("default", "qwen")] = body = {**body, "status": _merge({}, first)}
    assert template(k)[API_KEY_ANNOTATION] == "100"
    pods_before, applies = template(k)[HASH_ANNOTATION], k.applies

    # Nothing changed: the check reads the Secret, marks nothing, and a reconcile applies nothing.
    st.seen[("default", "qwen")].pods_dirty = False
    assert asyncio.run(check_api_keys(st, k, recheck=0)) == 0
    assert not st.seen[("default", "qwen")].pods_dirty

    k.objects[SECRET] = secret("101")  # the key rotated
    assert asyncio.run(check_api_keys(st, k, recheck=0)) == 1
    assert st.seen[("default", "qwen")].pods_dirty  # the resync loop reconciles it on its next tick
    second = go(body, k, st)
    assert template(k)[API_KEY_ANNOTATION] == "101" and template(k)[HASH_ANNOTATION] != pods_before
    assert k.applies > applies
    assert second.get("plan", {}).get("hash") is None  # the plan (its hash) is the same: only the pods roll
    reasons = [r for r, _ in k.events]
    assert reasons.count("PlanChanged") == 1 and reasons.count("ApiKeyRotated") == 1


def test_the_check_reads_only_named_secrets_and_rereads_after_its_interval():
    k, st = RecordingKube([CPU_LARGE]), OperatorState()
    k.objects[SECRET] = secret("1")
    st.bodies[("default", "qwen")] = md(SPEC)
    st.bodies[("default", "plain")] = md(SEED, name="plain")  # no key: no Secret read
    asyncio.run(check_api_keys(st, k))
    asyncio.run(check_api_keys(st, k))  # within the interval: not read again
    assert k.gets == [SECRET]
    asyncio.run(check_api_keys(st, k, recheck=0))
    assert k.gets == [SECRET, SECRET]
    del st.bodies[("default", "qwen")]
    asyncio.run(check_api_keys(st, k, recheck=0))
    assert k.gets == [SECRET, SECRET] and not st.key_versions


def test_no_rbac_on_the_secret_is_not_a_rotation():
    k, st = RecordingKube([CPU_LARGE]), OperatorState()
    st.bodies[("default", "qwen")] = md(SPEC)
    k.fail_get[SECRET] = KubeError(403, "forbidden")
    assert asyncio.run(check_api_keys(st, k, recheck=0)) == 0
    assert asyncio.run(check_api_keys(st, k, recheck=0)) == 0


def test_a_failed_read_of_the_key_secret_never_rolls_the_pods():
    k, st = RecordingKube([CPU_LARGE]), OperatorState()
    k.objects[SECRET] = secret("100")
    body = md(SPEC)
    first = go(body, k, st)
    body = {**body, "status": _merge({}, first)}
    pods = template(k)[HASH_ANNOTATION]
    k.fail_get[SECRET] = KubeError(0, "cannot reach the API server")
    go(body, k, st)
    assert template(k)[API_KEY_ANNOTATION] == "100" and template(k)[HASH_ANNOTATION] == pods
    del k.fail_get[SECRET]
    del k.objects[SECRET]  # deleted: the pods keep what they run with (Degraded SecretNotFound says why)
    go(body, k, st)
    assert template(k)[HASH_ANNOTATION] == pods
