"""`modelfit plan` output: the table rows and the JSON contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelfit.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def test_table_has_every_seed_row(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--node", "cpu")
    assert rc == 0
    for row in (
        "Model size",
        "VRAM available",
        "VRAM used",
        "System RAM",
        "Min RAM required",
        "GPU layers",
        "Context size",
        "Backend",
        "Flash attention",
        "Reading from disk",
        "KV cache",
        "Recurrent state",
        "Compute buffers",
        "Memory request / limit",
        "Threads",
        "llama-server -m",
    ):
        assert row in out, row
    assert "0 / 25" in out and "262,144" in out


def test_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(
        capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--node", "cpu", "--context", "262144", "-o", "json"
    )
    assert rc == 0
    d = json.loads(out)
    assert set(d["model"]) >= {"name", "architecture", "file_bytes", "layers", "context_length", "parameters"}
    assert set(d["plan"]) >= {
        "backend",
        "gpu_layers",
        "total_layers",
        "context",
        "parallel",
        "load_mode",
        "flash_attention",
        "kv_cache_type",
        "threads",
        "args",
    }
    assert set(d["memory"]) >= {
        "weights_bytes",
        "repack_bytes",
        "kv_cache_bytes",
        "recurrent_bytes",
        "compute_bytes",
        "cache_ram_bytes",
        "overhead_bytes",
        "total_bytes",
        "vram_bytes",
    }
    assert set(d["resources"]) == {"requests", "limits"}
    assert d["fits"] is True and d["reasons"]
    assert d["memory"]["total_bytes"] > 3.5 * 2**30  # the real ~4 GB, not the seed page's 0.5 GB
    assert d["memory"]["kv_cache_bytes"] == 3 * 2**30


def test_memory_limit_makes_it_fit(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--memory", "2Gi", "-o", "json")
    d = json.loads(out)
    assert rc == 0 and d["fits"]
    assert int(d["resources"]["limits"]["memory"].removesuffix("Mi")) <= 2048


def test_does_not_fit_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "plan", "llama-3.1-8b", "--quant", "q8_0", "--memory", "1Gi", "-o", "json")
    assert rc == 3 and json.loads(out)["fits"] is False


def test_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "no-such-model"]) == 2
    assert "catalog" in capsys.readouterr().err
    assert main(["plan", "qwen3.5-0.8b", "--quant", "q3_xx"]) == 2
    assert "unknown quantization" in capsys.readouterr().err
    assert main(["plan", "/nope/model.gguf"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_yaml() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "modelfit.cli", "plan", "gemma-3-1b", "--quant", "Q4_K_M", "-o", "yaml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "architecture: gemma3" in out


def test_3b_on_a_small_node_keeps_answer_quality(capsys: pytest.CaptureFixture[str]) -> None:
    """`modelfit plan llama-3.2-3b --quant Q4_K_M --node cpu-small` does not quantize the KV cache to q4_0."""
    rc, out = run(capsys, "plan", "llama-3.2-3b", "--quant", "Q4_K_M", "--node", "cpu-small", "-o", "json")
    d = json.loads(out)
    assert rc == 0 and d["fits"] and d["plan"]["kv_cache_type"] == "q8_0"
    assert d["plan"]["args"][d["plan"]["args"].index("-ctk") + 1] == "q8_0"
    assert any("f16 would need" in r for r in d["reasons"])
    rc, out = run(
        capsys,
        "plan",
        "llama-3.2-3b",
        "--quant",
        "Q4_K_M",
        "--node",
        "cpu-small",
        "--kv-cache-type",
        "q4_0",
        "-o",
        "json",
    )
    d = json.loads(out)
    assert rc == 0 and d["plan"]["kv_cache_type"] == "q4_0" and d["plan"]["context"] == 55808


@pytest.mark.parametrize(("flag", "value"), [("--cache-ram", "512"), ("--prompt-cache", "512"), ("--cache-ram", "0")])
def test_prompt_cache_option(capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--context", "8192", flag, value, "-o", "json")
    d = json.loads(out)
    assert rc == 0 and d["plan"]["cache_ram_mib"] == int(value)
    assert d["memory"]["cache_ram_bytes"] == int(value) * 2**20
    assert d["plan"]["args"][d["plan"]["args"].index("--cache-ram") + 1] == value


def test_prompt_cache_auto_by_default_and_in_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--context", "8192", "--memory", "8Gi")
    assert rc == 0
    mib = int(out.split("--cache-ram ")[-1].split()[0])
    assert mib > 0 and f"prompt cache {mib} MiB (--cache-ram)" in out
    # Min RAM required is the minimum (no prompt cache); the planned cache's request follows
    assert f"with the {mib} MiB prompt cache planned)" in out
    rc, auto = run(
        capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--context", "8192", "--memory", "8Gi", "--cache-ram", "auto"
    )
    assert auto == out


# ---- `modelfit plan -f`: a ModelDeployment placed as the operator places it ----------------------


def manifest(spec: dict[str, object], name: str = "llama", profile: str | None = None) -> dict[str, object]:
    meta: dict[str, object] = {"name": name, "namespace": "default"}
    if profile is not None:
        meta["annotations"] = {"modelfit.io/node-profile": profile}
    return {"apiVersion": "modelfit.io/v1alpha1", "kind": "ModelDeployment", "metadata": meta, "spec": spec}


def plan_file(
    capsys: pytest.CaptureFixture[str], tmp_path: object, docs: list[dict[str, object]], *argv: str
) -> tuple[int, str, str]:
    import pathlib

    import yaml

    path = pathlib.Path(str(tmp_path)) / "md.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    rc = main(["plan", "-f", str(path), *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


AGREEMENT_CASES = [
    # (modelfit values options, what the operator does on cpu-small)
    (("--context", "131072"), "NoNodeFits"),  # the issue's case: an explicit context is the minimum
    (("--context", "131072", "--adapt"), "Adapted"),
    (("--context", "131072", "--no-adapt"), "NoNodeFits"),
    (("--context", "8192"), "Planned"),
    (("--context", "max"), "Planned"),
    (("--context", "max", "--adapt", "--min-context", "8192"), "Planned"),
    (("--context", "32768", "--adapt", "--kv-cache-type", "q4_0"), "Planned"),  # q4_0 KV reaches it
    (("--context", "65536", "--adapt", "--min-context", "16384", "--parallel", "2"), "Adapted"),
    (("--context", "8192", "--threads", "1"), "Planned"),
    (("--context", "8192", "--threads", "auto"), "Planned"),
]


@pytest.mark.parametrize(("options", "reason"), AGREEMENT_CASES)
def test_values_plan_file_and_operator_agree(
    capsys: pytest.CaptureFixture[str], tmp_path: object, options: tuple[str, ...], reason: str
) -> None:
    """`modelfit values`, `modelfit plan -f` of its ModelDeployment, `modelfit plan` with the same options and
    placement.place on the profile agree (plain `plan` once said fits at context 30208 for --context 131072)."""
    import yaml

    from modelfit import catalog
    from modelfit.api import ModelDeploymentSpec
    from modelfit.nodes import profile
    from modelfit.placement import place
    from modelfit.render import model_file

    rc = main(["values", "llama-3.2-3b", "--quant", "Q4_K_M", "--node", "cpu-small", *options])
    out = capsys.readouterr().out
    assert rc == 0
    values = yaml.safe_load(out)
    ep = values["expectedPlan"]
    spec = {k: v for k, v in values["modelDeployment"].items() if k != "nodeProfile"}

    # the operator: its reconcile's call, on one node of the profile
    md = ModelDeploymentSpec.model_validate(spec)
    facts = catalog.catalog_facts("llama-3.2-3b", "Q4_K_M")
    placed = place(md, facts, [profile("cpu-small")], model_file(md, facts.file_bytes).path, 0.0)
    assert placed.result is not None and placed.reason == reason

    # `modelfit plan -f` of the same ModelDeployment (as charts/modeldeployment renders it)
    rc, out, err = plan_file(capsys, tmp_path, [manifest(spec, profile="cpu-small")], "-o", "json")
    d = json.loads(out)
    assert rc == (0 if placed.fits else 3)
    assert d["placement"]["reason"] == reason and d["placement"]["node"] == "cpu-small"
    assert d["placement"]["message"] == placed.message == ep["message"]
    assert (err == "") == placed.fits

    # `modelfit plan` with the options themselves
    rc, out = run(capsys, "plan", "llama-3.2-3b", "--quant", "Q4_K_M", "--node", "cpu-small", *options, "-o", "json")
    p = json.loads(out)
    assert rc == (0 if placed.fits else 3)
    assert p["placement"]["reason"] == reason and p["placement"]["message"] == placed.message

    res = placed.result
    for what, values_says, file_says, plan_says, operator_says in (
        ("fits", ep["fits"], d["fits"], p["fits"], placed.fits),
        ("context", ep["context"], d["plan"]["context"], p["plan"]["context"], res.plan.context),
        ("kv", ep["kvCacheType"], d["plan"]["kv_cache_type"], p["plan"]["kv_cache_type"], res.plan.kv_cache_type),
        (
            "memory",
            ep["memoryRequest"],
            d["resources"]["requests"]["memory"],
            p["resources"]["requests"]["memory"],
            res.resources.requests["memory"],
        ),
        ("args", ep["args"], d["plan"]["args"], p["plan"]["args"], res.plan.args),
    ):
        assert values_says == file_says == plan_says == operator_says, what


def test_plan_file_issue_case_reports_the_shortfall(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    spec = {"model": {"catalog": "llama-3.2-3b", "quant": "Q4_K_M"}, "context": 131072}
    rc, out, err = plan_file(capsys, tmp_path, [manifest(spec)], "--node", "cpu-small")
    assert rc == 3
    assert out.startswith("ModelDeployment default/llama: NoNodeFits: no node fits the model at the requested context")
    assert "cpu-small: short by " in out and "| Fits" in out and "NO (short by" in out
    assert err.startswith("modelfit: ModelDeployment default/llama: NoNodeFits:") and err.count("\n") == 1


def test_plan_file_chooses_among_nodes_and_plans_every_document(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    spec = {"model": {"catalog": "llama-3.2-3b", "quant": "Q4_K_M"}, "context": 131072}
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "skipped"}}
    docs = [manifest(spec), other, manifest({**spec, "adapt": True}, name="adapting")]
    rc, out, _ = plan_file(capsys, tmp_path, docs, "--node", "cpu-small", "--node", "cpu-large", "-o", "json")
    assert rc == 0
    d = json.loads(out)
    assert [x["modelDeployment"]["name"] for x in d] == ["llama", "adapting"]
    assert [x["placement"]["node"] for x in d] == ["cpu-large", "cpu-large"]
    assert all(x["placement"]["reason"] == "Planned" and x["plan"]["context"] == 131072 for x in d)
    # only the small node: the strict one does not fit, the adapting one shrinks its context
    rc, out, _ = plan_file(capsys, tmp_path, docs, "--node", "cpu-small", "--memory", "4Gi", "-o", "json")
    d = json.loads(out)
    assert rc == 3 and [x["placement"]["reason"] for x in d] == ["NoNodeFits", "Adapted"]
    assert d[1]["plan"]["context"] < 131072 and d[1]["fits"] is True


def test_plan_file_default_node_is_the_annotated_profile(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 8192}
    rc, out, _ = plan_file(capsys, tmp_path, [manifest(spec, profile="cpu-small")], "-o", "json")
    assert rc == 0 and json.loads(out)["placement"]["node"] == "cpu-small"
    rc, out, _ = plan_file(capsys, tmp_path, [manifest(spec)], "-o", "json")
    assert rc == 0 and json.loads(out)["placement"]["node"] == "cpu"


def test_plan_file_from_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    import yaml

    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "context": 4096}
    monkeypatch.setattr(sys, "stdin", io.StringIO(yaml.safe_dump(manifest(spec))))
    rc, out = run(capsys, "plan", "-f", "-", "--node", "cpu-small", "-o", "yaml")
    assert rc == 0
    d = yaml.safe_load(out)
    assert d["placement"]["message"].startswith("cpu on cpu-small:") and d["plan"]["context"] == 4096


@pytest.mark.parametrize(
    ("docs", "argv", "error"),
    [
        ([manifest({"model": {"catalog": "llama-3.2-3b"}})], (), "default/llama: spec.model: Value error"),
        ([manifest({"model": {"catalog": "llama-3.2-3b", "quant": "Q4_K_M"}, "context": 10})], (), "spec.context"),
        ([manifest({"model": {"catalog": "llama-3.2-3b", "quant": "Q4_K_M"}}, name="Bad_Name")], (), "Bad_Name"),
        ([{"apiVersion": "v1", "kind": "ConfigMap"}], (), "no ModelDeployment"),
        ([{**manifest({}), "apiVersion": "modelfit.io/v9"}], (), "apiVersion 'modelfit.io/v9'"),
        ([manifest({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}})], ("--context", "4096"), "--context"),
        ([manifest({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}})], ("qwen3.5-0.8b",), "argument model"),
        ([manifest({"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}})], ("--node", "tpu"), "unknown node"),
    ],
)
def test_plan_file_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: object,
    docs: list[dict[str, object]],
    argv: tuple[str, ...],
    error: str,
) -> None:
    rc, out, err = plan_file(capsys, tmp_path, docs, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("modelfit: error: ") and err.count("\n") == 1 and error in err, err


def test_plan_file_not_yaml_and_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    import pathlib

    bad = pathlib.Path(str(tmp_path)) / "bad.yaml"
    bad.write_text("spec: [\n")
    for path, error in ((bad, "not YAML"), (bad.with_name("none.yaml"), "No such file")):
        rc = main(["plan", "-f", str(path)])
        err = capsys.readouterr().err
        assert rc == 2 and error in err and err.count("\n") == 1, err


def test_plan_needs_a_model_or_a_file_and_one_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan"]) == 2
    assert "or -f FILE is required" in capsys.readouterr().err
    assert main(["plan", "qwen3.5-0.8b", "--node", "cpu", "--node", "cpu-small"]) == 2
    assert "several only with -f" in capsys.readouterr().err


def test_threads_and_memory_bandwidth_options(capsys: pytest.CaptureFixture[str]) -> None:
    """--threads is spec.threads; --memory-bandwidth is the node's bandwidth label: auto reaches it."""

    def threads(*opts: str) -> tuple[int, str]:
        rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--node", "cpu-large", *opts, "-o", "json")
        d = json.loads(out)
        assert rc == 0 and d["plan"]["args"][d["plan"]["args"].index("-t") + 1] == str(d["plan"]["threads"])
        return int(d["plan"]["threads"]), d["resources"]["requests"]["cpu"]

    assert threads() == (4, "4")  # the 20 GB/s budget
    assert threads("--threads", "3") == (3, "3")
    assert threads("--memory-bandwidth", "60") == (10, "10")  # ceil(60 / 6)
    assert threads("--memory-bandwidth", "5") == (2, "2")  # at least 2 for prompts
    assert threads("--memory-bandwidth", "500") == (16, "16")  # at most the node's CPUs


def test_serve_dry_run_passes_the_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    from modelfit_dev.synth import ensure_model

    model = ensure_model("llama-tiny", "F16")
    rc = main(["serve", str(model), "--threads", "1", "--llama-server", str(fake), "--dry-run"])
    out = capsys.readouterr().out.split()
    assert rc == 0 and out[0] == str(fake) and out[out.index("-t") + 1] == "1"


def test_plan_issue_case_context_is_the_minimum(capsys: pytest.CaptureFixture[str]) -> None:
    """An explicit --context is the least that fits, as in a ModelDeployment: no silent shrink to 30208."""
    rc = main(["plan", "llama-3.2-3b", "--quant", "Q4_K_M", "--node", "cpu-small", "--context", "131072"])
    out, err = capsys.readouterr()
    assert rc == 3 and re.search(r"\| Context size +\| 131,072$", out, re.MULTILINE)
    assert re.search(r"\| Fits +\| NO \(short by 6,28\d\.\d MiB\)$", out, re.MULTILINE), out
    assert err == (
        "modelfit: does not fit cpu-small: NoNodeFits: no node fits the model at the requested context: "
        "cpu-small: short by 6289Mi\n"
    )


def test_plan_cpu_request_must_fit_the_node_as_with_f(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    """--threads 64 on 2 CPUs: the pod's CPU request does not fit, as `plan -f` says (it said Fits yes)."""
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--threads", "64", "--cpus", "2", "-o", "json")
    d = json.loads(out)
    assert rc == 3 and d["fits"] is False and d["placement"]["reason"] == "NoNodeFits"
    assert d["placement"]["message"].endswith("cpu: short by 62 CPU")
    assert d["reasons"][0] == "does not fit: the pod requests 64 CPU but the node has 2 free"
    spec = {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, "threads": 64}
    rc, out, _ = plan_file(capsys, tmp_path, [manifest(spec)], "--cpus", "2", "-o", "json")
    assert rc == 3 and json.loads(out)["placement"] == d["placement"]
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--threads", "64", "--cpus", "2")
    assert rc == 3 and "| Fits                            | NO (no node fits" in out


def test_plan_backend_the_node_lacks_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A plan that fits memory but not the spec (backend cuda on a CPU node) says NO, in JSON and the table."""
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--backend", "cuda", "-o", "json")
    d = json.loads(out)
    assert rc == 3 and d["fits"] is False and "backend cuda is not available" in d["placement"]["message"]
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--backend", "cuda")
    assert (
        rc == 3 and "Fits" in out and "NO (no node fits" in out and "| Fits                            | yes" not in out
    )


def test_plan_without_quant_says_which_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "-o", "json")
    d = json.loads(out)
    assert rc == 0 and d["model"]["quant"] == "Q4_K_M"
    assert d["reasons"][0].startswith("quant Q4_K_M: the default, as --quant was not given")
    rc, out = run(capsys, "plan", "qwen3.5-0.8b")
    assert rc == 0 and "| Quantization" in out and "  - quant Q4_K_M: the default, as --quant was not given" in out
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_k_m", "-o", "json")
    assert not any(r.startswith("quant ") for r in json.loads(out)["reasons"])  # named: nothing to explain


def test_plan_knobs_tune_the_placed_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """--ubatch is no spec word: the placement's plan, planned again with it."""
    rc, out = run(
        capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--context", "8192", "--ubatch", "1024", "-o", "json"
    )
    d = json.loads(out)
    args = d["plan"]["args"]
    assert rc == 0 and d["fits"] and args[args.index("-ub") + 1] == "1024" and d["plan"]["ubatch"] == 1024
    rc, out = run(capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--context", "8192", "-o", "json")
    assert json.loads(out)["memory"]["compute_bytes"] < d["memory"]["compute_bytes"]


def test_serve_places_like_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """serve plans this machine with the same placement: a CPU request beyond it is refused; --port reaches args."""
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    from modelfit_dev.synth import ensure_model

    model = str(ensure_model("llama-tiny", "F16"))
    rc = main(["serve", model, "--threads", "64", "--cpus", "2", "--llama-server", str(fake), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 3 and "modelfit: the model does not fit this machine: NoNodeFits:" in err and "short by 62 CPU" in err
    rc = main(["serve", model, "--threads", "1", "--port", "9000", "--llama-server", str(fake), "--dry-run"])
    out = capsys.readouterr().out.split()
    assert rc == 0 and out[out.index("--port") + 1] == "9000"
