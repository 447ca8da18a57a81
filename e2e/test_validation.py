"""Scenario 2: bad specs are rejected by the API server (schema, CEL) with a clear message;
specs that pass the schema but cannot be planned end in a condition with a reason, and the
operator keeps serving the others."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from _support import free_port, md, wait_condition

QWEN = {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}

# (id, spec, words the API server's message must contain)
BAD_SPECS = [
    ("context-wrong-string", {"context": "big"}, ["context must be max or a number"]),
    ("parallel-wrong-type", {"parallel": "two"}, ["spec.parallel", "integer"]),
    ("unknown-quant", {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q3_XYZ"}}, ["spec.model.quant", "quant must be one of", "Q4_K_M"]),
    ("negative-context", {"context": -5}, ["context must be max or a number between 256 and 16777216"]),
    ("two-model-sources", {"model": {**QWEN, "url": "http://127.0.0.1:1/x.gguf"}}, ["exactly one of catalog, url, huggingFace or pvc"]),
    ("no-model-source", {"model": {}}, ["exactly one of catalog, url, huggingFace or pvc"]),
    ("no-model", {"context": 4096, "model": None}, ["spec.model", "Required value"]),
    ("catalog-without-quant", {"model": {"catalog": "qwen3.5-0.8b"}}, ["catalog requires quant"]),
    ("owned-flag-in-serverArgs", {"serverArgs": ["--jinja", "-c", "4096"]}, ["serverArgs must not contain flags the plan owns"]),
    ("owned-flag-equals-form", {"serverArgs": ["--n-gpu-layers=99"]}, ["serverArgs must not contain flags the plan owns"]),
    ("parallel-zero", {"parallel": 0}, ["spec.parallel", "greater than or equal to 1"]),
    ("bad-kvCacheType", {"kvCacheType": "q3_k"}, ["spec.kvCacheType", "Unsupported value", "q8_0"]),
    ("replicas-negative", {"replicas": -1}, ["spec.replicas", "greater than or equal to 0"]),
    ("bad-service-type", {"service": {"type": "Ingress"}}, ["spec.service.type", "Unsupported value", "ClusterIP"]),
    ("bad-service-port", {"service": {"port": 70000}}, ["spec.service.port", "less than or equal to 65535"]),
    ("bad-backend", {"backend": "tpu"}, ["spec.backend", "Unsupported value", "cuda"]),
    ("bad-gpuLayers", {"gpuLayers": "all"}, ["gpuLayers must be auto or a number"]),
    ("url-not-http", {"model": {"url": "ftp://127.0.0.1/x.gguf"}}, ["spec.model.url", "should match", "https?"]),
    ("bad-sha256", {"model": {**QWEN, "sha256": "xyz"}}, ["spec.model.sha256", "should match"]),
    ("minContext-above-context", {"context": 4096, "minContext": 8192}, ["minContext must not exceed context"]),
    ("two-caches", {"modelCache": {"emptyDir": {}, "hostPath": {"path": "/models"}}}, ["at most one of emptyDir, pvc or hostPath"]),
    ("unknown-field", {"contextSize": 4096}, ['unknown field "spec.contextSize"']),
    ("zero-without-picker", {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, ["minReplicas 0 needs routing.mode InferencePool"]),
    ("idle-too-short", {"routing": {"mode": "InferencePool"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "idleSeconds": 1}}, ["spec.autoscaling.idleSeconds", "greater than or equal to 10"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "spec", "words"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_rejected(cluster, crd, namespace, case, spec, words):
    obj = md(case, namespace, **spec)
    if obj["spec"].get("model") is None:
        del obj["spec"]["model"]
    proc = cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert proc.returncode != 0, f"{case} was accepted: {proc.stdout}"
    for w in words:
        assert w in proc.stderr, f"{case}: {w!r} not in: {proc.stderr}"
    assert cluster.kubectl("-n", namespace, "get", "md", case, check=False).returncode != 0


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves a non-GGUF file (whatever the path), with Range support like a real file server."""

    body = b"<html>this is not a GGUF file, it is an error page</html>\n" * 200

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def corrupt_url():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/models/corrupt.gguf"
    srv.shutdown()
    srv.server_close()


def test_unplannable_specs_get_conditions(cluster, operator, pool, namespace, corrupt_url):
    pool.add("cpu", cpu="2", memory="2Gi")
    sel = {"nodeSelector": pool.selector}
    closed = f"http://127.0.0.1:{free_port()}/x.gguf"  # nothing listens there
    cases = {
        "unreachable": (md("unreachable", namespace, model={"url": closed}, **sel), "ModelUnreadable", closed),
        "corrupt": (md("corrupt", namespace, model={"url": corrupt_url}, **sel), "ModelUnreadable", "GGUF"),
        "fits-no-node": (
            md("fits-no-node", namespace, context=262144, kvCacheType="f16", adapt=False, **sel),
            "NoNodeFits",
            "short by",
        ),
    }
    for obj, _, _ in cases.values():
        cluster.apply(obj)
    cluster.apply(md("valid", namespace, context=4096, **sel))

    for name, (_, reason, words) in cases.items():
        obj = wait_condition(cluster, namespace, name, "Planned", "False", reason, timeout=60, operator=operator)
        planned = next(c for c in obj["status"]["conditions"] if c["type"] == "Planned")
        assert words in planned["message"], planned
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False"
        assert cluster.kubectl("-n", namespace, "get", "deployment", name, check=False).returncode != 0
    fits = cluster.get_json("-n", namespace, "md", "fits-no-node")
    assert {c["type"]: (c["status"], c["reason"]) for c in fits["status"]["conditions"]}["Unschedulable"] == (
        "True",
        "NoNodeFits",
    )

    # the operator kept serving the valid one
    wait_condition(cluster, namespace, "valid", "Ready", timeout=60, operator=operator)
    assert operator.running()
    # and an unplannable one recovers once it is fixed (the valid one leaves the node's CPUs to it)
    cluster.kubectl("-n", namespace, "delete", "md", "valid")
    cluster.kubectl("-n", namespace, "patch", "md", "fits-no-node", "--type=merge", "-p", '{"spec":{"context":4096}}')
    wait_condition(cluster, namespace, "fits-no-node", "Ready", timeout=60, operator=operator)
