"""spec.serverArgs: the flags the plan owns and the flags no spec may pass (``flags.REFUSED``), refused alike by
the operator (check_spec: Planned=False InvalidSpec), ``modelfit plan -f`` and the CRD's CEL rules."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from modelfit import crd, flags
from modelfit.api import ModelDeploymentSpec
from modelfit.cli import main, spec_of
from modelfit.decide import check_spec
from modelfit.flags import OWNED_FLAGS, REFUSED, REFUSED_FLAGS, flag_of
from modelfit.memory import LLAMA_CPP_BUILD

MODEL = {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}
REFUSED_SPELLINGS = sorted(REFUSED_FLAGS)


def problem(*args: str) -> str | None:
    return ModelDeploymentSpec.model_validate({"model": MODEL, "serverArgs": list(args)}).server_args_problem()


def forms(flag: str) -> list[list[str]]:
    """Every way an argument list can name ``flag``: apart from its value, joined by ``=`` or by a space in
    one argument, bare, and (a long flag) with ``_`` for ``-`` as llama-server reads it."""
    out = [[flag, "v"], [f"{flag}=v"], [f"{flag} v"], ["--jinja", flag]]
    if flag.startswith("--") and "-" in flag[2:]:
        out.append([flag[:2] + flag[2:].replace("-", "_"), "v"])
    return out


# ---- the table --------------------------------------------------------------------------------------


def test_table_rows_are_well_formed() -> None:
    assert {r.kind for r in REFUSED} == set(flags.KINDS)
    for r in REFUSED:
        assert r.spellings and r.why and not r.why.endswith("."), r
        for s in r.spellings:
            assert re.fullmatch(r"--?[a-z0-9][a-z0-9.-]*", s), s
    assert not OWNED_FLAGS & REFUSED_FLAGS.keys()


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--api-key", "use spec.apiKeySecretRef"),
        ("--api-key-file", "use spec.apiKeySecretRef"),
        ("-hft", "use spec.model.tokenSecretRef"),
        ("--hf-token", "use spec.model.tokenSecretRef"),
        ("--mmproj", "loads weights the plan does not count"),
        ("-mmu", "loads weights the plan does not count"),
        ("--lora", "loads weights the plan does not count"),
        ("-md", "loads weights the plan does not count"),
        ("-hfd", "draft model the plan does not count"),
        ("-ot", "which the plan splits by gpuLayers"),
        ("--n-cpu-moe", "which the plan splits by gpuLayers"),
        ("-hf", "set spec.model"),
        ("--model-url", "set spec.model"),
        ("--gpt-oss-20b-default", "set spec.model"),
        ("--rpc", "RPC servers"),
        ("--path", "over HTTP"),
        ("--tools", "run commands"),
        ("--slot-save-path", "/tmp"),
        ("--api-prefix", "probes"),
        ("--ssl-key-file", "probes speak HTTP"),
        ("--version", "exit"),
    ],
)
def test_each_refusal_says_why(flag: str, says: str) -> None:
    assert problem(flag, "v") == f"serverArgs: {flag} {REFUSED_FLAGS[flag].why}"
    assert says in REFUSED_FLAGS[flag].why


@pytest.mark.parametrize("flag", REFUSED_SPELLINGS)
def test_every_refused_flag_in_every_form(flag: str) -> None:
    for args in forms(flag):
        assert problem(*args) == f"serverArgs: {flag} {REFUSED_FLAGS[flag].why}", args


@pytest.mark.parametrize("flag", sorted(OWNED_FLAGS))
def test_every_owned_flag_in_every_form(flag: str) -> None:
    for args in forms(flag):
        assert problem(*args) == f"serverArgs contains flags the plan owns: {flag}; set the matching spec field instead"


@pytest.mark.parametrize(
    "args",
    [
        ["--jinja", "--temp", "0.7", "--top-p", "0.9", "--reasoning-format", "deepseek", "--log-verbosity", "3"],
        ["--chat-template-file", "/app/t.jinja", "--grammar-file", "/app/g.gbnf", "-jf", "/app/s.json"],
        ["--no-mmproj", "--no-mmproj-auto", "-kvo", "--kv-offload", "--no-agent", "-no-ag", "--no-ui-mcp-proxy"],
        ["--spec-default", "--draft-max", "16", "--alias", "qwen", "--log-file", "/tmp/llama.log", "--no-webui"],
        # prefixes of refused flags that are other flags, or none
        ["--hf-repo-x", "-hfx", "-mmx", "--api-keys", "--pathway", "-dev0", "--lora-init-without-apply"],
        ["--control-vector-layer-range", "0", "3", "--cache-reuse", "256", "--sleep-idle-seconds", "60"],
    ],
)
def test_harmless_flags_pass(args: list[str]) -> None:
    assert problem(*args) is None


def test_all_problems_named_once_in_order() -> None:
    got = problem("-c", "4096", "--api-key", "k", "--mmproj", "m", "--api_key=k2", "--ctx-size=1")
    assert got == (
        "serverArgs contains flags the plan owns: -c, --ctx-size; set the matching spec field instead; "
        f"serverArgs: --api-key {REFUSED_FLAGS['--api-key'].why}; serverArgs: --mmproj {REFUSED_FLAGS['--mmproj'].why}"
    )


def test_flag_of_reads_as_llama_server_does() -> None:
    assert flag_of("--ctx_size") == "--ctx-size" and flag_of("--api_key=a_b") == "--api-key"
    assert flag_of("-hf_x") == "-hf_x"  # llama-server maps _ to - in long flags only
    assert flag_of("--api-key sk-1") == "--api-key" and flag_of("sk-1") == "sk-1" and flag_of("") == ""


# ---- the CRD's rules: the same table -----------------------------------------------------------------


def _rules() -> list[dict[str, str]]:
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules: list[dict[str, str]] = spec["properties"]["serverArgs"]["x-kubernetes-validations"]
    return rules


def _listed(rule: str) -> set[str]:
    inner = re.search(r"!\[(.*?)\]\.exists", rule)
    assert inner is not None, rule
    return set(re.findall(r"'([^']+)'", inner.group(1)))


def test_crd_rules_refuse_the_tables() -> None:
    rules = _rules()
    assert len(rules) == 1 + len(flags.KINDS)
    assert _listed(rules[0]["rule"]) == OWNED_FLAGS
    for rule, kind in zip(rules[1:], flags.KINDS, strict=True):
        want = {s for r in REFUSED if r.kind == kind for s in r.spellings}
        assert _listed(rule["rule"]) == want
        assert all(s in rule["message"] for s in want) and flags.KINDS[kind] in rule["message"]
    for rule in rules:  # what flag_of reads: _ for - in long flags, then up to = or a space
        assert "self.map(a, a.startsWith('--') ? a.replace('_', '-') : a)" in rule["rule"]
        assert "a == f || a.startsWith(f + '=') || a.startsWith(f + ' ')" in rule["rule"]


# ---- the operator and `modelfit plan -f` say the same ------------------------------------------------


def _manifest(args: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "modelfit.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "qwen", "namespace": "default"},
        "spec": {"model": MODEL, "serverArgs": args},
    }


@pytest.mark.parametrize("args", [["--api-key", "sk-1"], ["--mmproj", "/models/mm.gguf"], ["--ctx_size", "9"]])
def test_operator_and_cli_refuse_alike(args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import yaml

    doc = _manifest(args)
    checked = check_spec(doc["metadata"], doc["spec"])
    assert isinstance(checked, tuple) and checked == ("InvalidSpec", problem(*args))
    with pytest.raises(ValueError) as exc:
        spec_of(doc)
    assert str(exc.value) == f"ModelDeployment default/qwen: {checked[1]}"
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", "-f", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"modelfit: error: ModelDeployment default/qwen: {checked[1]}\n"


# ---- llama-server's own flag list (the pinned llama.cpp source, when scripts/build-llama-server.sh fetched it) ----

# Refused spellings that llama.cpp b11434 no longer (or does not yet) know, for images set in spec.image.
OTHER_RELEASES = {
    "-hffd", "--hf-file-draft", "-mv", "--model-vocoder", "-hfv", "-hfrv", "--hf-repo-v", "-hffv", "--hf-file-v",
    "--embd-bge-small-en-default", "--embd-e5-small-en-default", "--embd-gte-small-default", "--license",
}  # fmt: skip
# Flags taking a file, path, URL or secret that stay allowed, and why.
ALLOWED = {
    # a file in the image: the root filesystem is read-only, and the pod mounts no node path for llama-server
    "-f", "--file", "-bf", "--binary-file", "--grammar-file", "-jf", "--json-schema-file", "--chat-template-file",
    "--ui-config-file", "--webui-config-file", "--ui-config", "--webui-config",
    "--log-file",  # llama-server's own log, in /tmp
    "-lcs", "--lookup-cache-static", "-lcd", "--lookup-cache-dynamic",  # read by --spec-type ngram-cache: refused
    "--image", "--audio", "--video", "--video-ffmpeg-dir",  # multimodal only: --mmproj is refused
    "-l", "--logit-bias",  # a token id, not a key
    # not llama-server's
    "--server-base", "-sysf", "--system-prompt-file", "--in-file", "--prompt-cache", "--save-all-logits",
    "--kl-divergence-base", "--context-file", "-o", "--output", "--output-file", "--positive-file", "--negative-file",
    "--tts-lang", "--tts-speaker-file", "--logits-output-dir", "--log-jsonl",
}  # fmt: skip


def _arg_cpp() -> str:
    cache = Path(os.environ.get("MODELFIT_CACHE", Path.home() / ".cache" / "modelfit"))
    path = cache / "llama" / f"{LLAMA_CPP_BUILD.lstrip('b')}.0.0" / "src" / "llama.cpp" / "common" / "arg.cpp"
    if not path.is_file():
        pytest.skip(f"{path} is missing: run scripts/build-llama-server.sh")
    return path.read_text()


def test_refused_spellings_are_llama_server_flags() -> None:
    known = set(re.findall(r'"(--?[a-zA-Z0-9][a-zA-Z0-9._-]*)"', _arg_cpp()))
    assert {s for s in REFUSED_FLAGS if s not in known} == OTHER_RELEASES


def test_every_flag_that_takes_a_file_url_or_secret_is_decided() -> None:
    """A llama.cpp bump that adds a flag reading a file, a URL or a key fails here until the table decides it."""
    opt = re.compile(r'common_arg\(\s*\{([^{}]*)\}\s*,\s*(?:\{[^{}]*\}\s*,\s*)?"([^"]*)"')
    undecided = []
    for m in opt.finditer(_arg_cpp()):
        names = re.findall(r'"([^"]+)"', m.group(1))
        if re.search(r"FNAME|FILE|PATH|URL|DIR|TOKEN|KEY\b|<user>|SERVERS|JSON", m.group(2)):
            undecided += [n for n in names if n not in REFUSED_FLAGS and n not in OWNED_FLAGS and n not in ALLOWED]
    assert not undecided
