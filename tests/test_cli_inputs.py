"""What a new user types: every bad value is one line naming the option and its range, never a traceback."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest
from pydantic import ValidationError

from modelfit import catalog, cli, cli_options, crd
from modelfit.api import ModelSource
from modelfit.cli import main

MODEL = ("qwen3.5-0.8b", "--quant", "Q4_0")


def cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) as the console script runs it: argparse's own errors exit via SystemExit."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_cli(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfit.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,  # type: ignore[arg-type]
    )


# (argv, option named in the error, text the error must contain)
BAD = [
    (("plan", *MODEL, "--context", "0"), "--context", "use max for the model's full context"),
    (("plan", *MODEL, "--context", "-5"), "--context", "from 256 to 16777216"),
    (("plan", *MODEL, "--context", "abc"), "--context", "max or a whole number"),
    (("plan", *MODEL, "--context", "100"), "--context", "from 256 to 16777216"),
    (("plan", *MODEL, "--context", "99999999"), "--context", "from 256 to 16777216"),
    (("plan", *MODEL, "--context", "4k"), "--context", "from 256 to 16777216"),
    (("plan", *MODEL, "--min-context", "0"), "--min-context", "from 256 to 16777216"),
    (("plan", *MODEL, "--context", "4096", "--min-context", "8192"), "--min-context", "above --context 4096"),
    (("plan", *MODEL, "--memory", "-5"), "--memory", "from 1Mi to 1Pi"),
    (("plan", *MODEL, "--memory", "2GB"), "--memory", "write 2Gi (binary) or 2G (decimal)"),
    (("plan", *MODEL, "--memory", "2gib"), "--memory", "write 2Gi"),
    (("plan", *MODEL, "--memory", "4"), "--memory", "a plain number is bytes"),
    (("plan", *MODEL, "--memory", "512m"), "--memory", "m means milli"),
    (("plan", *MODEL, "--memory", "0"), "--memory", "from 1Mi to 1Pi"),
    (("plan", *MODEL, "--memory", "inf"), "--memory", "from 1Mi to 1Pi"),
    (("plan", *MODEL, "--memory", "lots"), "--memory", "Kubernetes quantity"),
    (("plan", *MODEL, "--gpu-memory", "24GB"), "--gpu-memory", "write 24Gi"),
    (("plan", *MODEL, "--gpus", "0", "--gpu-memory", "24Gi"), "--gpu-memory", "--gpus is 0"),
    (("plan", *MODEL, "--gpus", "-1"), "--gpus", "from 0 to 64"),
    (("plan", *MODEL, "--gpus", "two"), "--gpus", "from 0 to 64"),
    (("plan", *MODEL, "--cpus", "0"), "--cpus", "from 0.001 (1m) to 4096"),
    (("plan", *MODEL, "--cpus", "-2"), "--cpus", "from 0.001 (1m) to 4096"),
    (("plan", *MODEL, "--cpus", "2cores"), "--cpus", "from 0.001 (1m) to 4096"),
    (("plan", *MODEL, "--parallel", "0"), "--parallel", "from 1 to 256"),
    (("plan", *MODEL, "--parallel", "1.5"), "--parallel", "from 1 to 256"),
    (("plan", *MODEL, "--parallel", "1000"), "--parallel", "from 1 to 256"),
    (("plan", *MODEL, "--ubatch", "1"), "--ubatch", "from 16 to 8192"),
    (("plan", *MODEL, "--cache-ram", "-1"), "--cache-ram", "MiB from 0 to 1048576"),
    (("plan", *MODEL, "--cache-ram", "lots"), "--cache-ram", "auto or a whole number of MiB"),
    (("plan", *MODEL, "--prompt-cache", "2000000"), "--cache-ram", "MiB from 0 to 1048576"),
    (("values", *MODEL, "--prompt-cache", "-1"), "--cache-ram", "MiB from 0 to 1048576"),
    (("plan", *MODEL, "--threads", "0"), "--threads", "auto or a whole number from 1 to 1024"),
    (("plan", *MODEL, "--threads", "max"), "--threads", "auto or a whole number from 1 to 1024"),
    (("values", *MODEL, "--threads", "2000"), "--threads", "from 1 to 1024"),
    (("plan", *MODEL, "--memory-bandwidth", "0"), "--memory-bandwidth", "GB/s from 0.1 to 10000"),
    (("plan", *MODEL, "--memory-bandwidth", "fast"), "--memory-bandwidth", "GB/s from 0.1 to 10000"),
    (("plan", *MODEL, "--memory-bandwidth", "nan"), "--memory-bandwidth", "GB/s from 0.1 to 10000"),
    (("plan", *MODEL, "--gpu-layers", "-1"), "--gpu-layers", "auto or a whole number from 0 to 1000"),
    (("plan", *MODEL, "--gpu-layers", "all"), "--gpu-layers", "auto or a whole number from 0 to 1000"),
    (("plan", *MODEL, "--node", "tpu"), "--node", "unknown node profile"),
    (("plan", "qwen3.5-0.8b", "--quant", "q3_xx"), "--quant", "known: Q4_0, Q4_K_M"),
    (("plan", "/nope/model.gguf", "--quant", "Q4_0"), "--quant", "catalog models only"),
    (("plan", *MODEL, "--kv-cache-type", "q2"), "--kv-cache-type", "invalid choice"),
    (("plan", *MODEL, "-o", "xml"), "--output", "invalid choice"),
    (("serve", *MODEL, "--port", "0"), "--port", "from 1 to 65535"),
    (("serve", *MODEL, "--port", "http"), "--port", "from 1 to 65535"),
    (("values", *MODEL, "--context", "0"), "--context", "use max for the model's full context"),
    (("values", *MODEL, "--parallel", "0"), "--parallel", "from 1 to 256"),
    (("values", *MODEL, "--replicas", "-1"), "--replicas", "from 0 to 1000"),
    (("values", *MODEL, "--gpu-layers", "x"), "--gpu-layers", "from 0 to 1000"),
    (("values", *MODEL, "--context", "4096", "--min-context", "8192"), "--min-context", "above --context"),
    (("plan", *MODEL, "--gpus", "1"), "--gpus", "needs --gpu-memory"),  # not a silent CPU plan
    (("serve", *MODEL, "--gpus", "2"), "--gpus", "needs --gpu-memory"),
    (("values", "https://host/m.gguf", "--quant", "Q4_0"), "--quant", "catalog models only"),
]


@pytest.mark.parametrize(("argv", "option", "text"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_value_is_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], option: str, text: str
) -> None:
    rc, out, err = cli_run(capsys, *argv)
    assert rc == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("modelfit: error: "), err
    assert f"argument {option}" in err or (option == "--output" and "argument -o/--output" in err), err
    assert text in err, err


def test_table_is_large_enough() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize(
    "argv",
    [
        ("--context", "0"),
        ("--context", "-5"),
        ("--memory", "-5"),
        ("--context", "abc"),
        ("--memory", "2GB"),
        ("--parallel", "0"),
        ("--bogus",),
    ],
)
def test_issue_inputs_in_a_real_process(argv: tuple[str, ...]) -> None:
    """The exact inputs from the report, through the console entry point."""
    p = subprocess_cli("plan", *MODEL, *argv)
    assert p.returncode == 2
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("modelfit: error: "), p.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("values", *MODEL, "--replicas", "-1"),
        ("values", *MODEL, "--gpu-layers", "x"),
        ("values", *MODEL, "--context", "0"),
    ],
)
def test_values_inputs_in_a_real_process(argv: tuple[str, ...]) -> None:
    """`python -m modelfit.cli` runs cli.py as __main__ while values.py imports modelfit.cli: one Rejected class."""
    p = subprocess_cli(*argv)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("modelfit: error: argument --") and len(p.stderr.splitlines()) == 1, p.stderr


def test_no_arguments_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli_run(capsys)
    assert rc == 2 and err.count("\n") == 1 and "required" in err


# ---- --context 0 and max ------------------------------------------------------------------------


def test_context_max_is_the_models_full_context(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_run(capsys, "plan", *MODEL, "--context", "max", "-o", "json")
    d = json.loads(out)
    assert rc == 0
    assert d["plan"]["context"] == d["model"]["context_length"] == 262144
    args = d["plan"]["args"]
    assert args[args.index("-c") + 1] == "262144"  # never -c 0: llama-server reads that as "the model's maximum"
    # the full context is what is counted: a 3 GiB f16 KV cache for this model
    assert d["memory"]["kv_cache_bytes"] == 3 * 2**30


def test_context_0_is_refused_not_planned_small(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_run(capsys, "plan", *MODEL, "--context", "0", "-o", "json")
    assert rc == 2 and out == ""
    assert "max" in err and "-c 0" not in out


# ---- quantities ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("2G", 2 * 10**9), ("2Gi", 2 * 2**30), ("2048Mi", 2 * 2**30), ("1.5Gi", 3 * 2**29), ("1Mi", 2**20)],
)
def test_memory_is_a_kubernetes_quantity(text: str, nbytes: int) -> None:
    assert cli_options.memory_arg(text) == nbytes


@pytest.mark.parametrize(("text", "millis"), [("2", 2000), ("1.5", 1500), ("1500m", 1500), ("1m", 1)])
def test_cpus_is_a_kubernetes_quantity(text: str, millis: int) -> None:
    assert cli_options.cpus_arg(text) == millis


@pytest.mark.parametrize("memory", ["2G", "2Gi", "2048Mi"])
def test_memory_spellings_plan(capsys: pytest.CaptureFixture[str], memory: str) -> None:
    rc, out, err = cli_run(capsys, "plan", *MODEL, "--memory", memory, "-o", "json")
    assert rc == 0, err
    assert json.loads(out)["fits"] is True


# ---- quant names: the same words in the CLI and the CRD -----------------------------------------


def _spellings(name: str) -> set[str]:
    """Every case of every letter, with _ or - between parts."""
    out: set[str] = set()
    for sep in ("_", "-"):
        base = name.replace("_", sep)
        letters = [i for i, c in enumerate(base) if c.isalpha()]
        for cases in itertools.product((str.upper, str.lower), repeat=len(letters)):
            chars = list(base)
            for i, f in zip(letters, cases, strict=True):
                chars[i] = f(chars[i])
            out.add("".join(chars))
    return out


QUANT_WORDS = sorted(set().union(*(_spellings(q) for q in catalog.RECIPES)))
NOT_QUANTS = ["Q3_K", "q4", "Q4__0", "Q4_K", "q4_k_m ", " F16", "Q4_0x", "IQ4_XS", "f32", "", "Q4 0"]


def _crd_quant_ok(word: str) -> bool:
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    doc = {"model": {"catalog": "qwen3.5-0.8b", "quant": word}}
    return not list(jsonschema.Draft7Validator(spec).iter_errors(doc))


def _cli_quant_ok(word: str) -> bool:
    try:
        cli_options.quant_arg(word)
    except Exception:  # noqa: BLE001
        return False
    return True


def test_cli_and_crd_accept_the_same_quant_words() -> None:
    for word in [*QUANT_WORDS, *NOT_QUANTS]:
        cli_ok, crd_ok = _cli_quant_ok(word), _crd_quant_ok(word)
        assert cli_ok == crd_ok, (word, cli_ok, crd_ok)
        assert cli_ok == (word in QUANT_WORDS), word
        if cli_ok:
            canonical = cli_options.quant_arg(word)
            assert canonical in catalog.RECIPES
            assert ModelSource.model_validate({"catalog": "qwen3.5-0.8b", "quant": word}).quant == canonical
        else:
            with pytest.raises(ValidationError):
                ModelSource.model_validate({"catalog": "qwen3.5-0.8b", "quant": word})


@pytest.mark.parametrize("word", ["q4_k_m", "Q4-K-M", "Q4_K_M"])
def test_quant_spellings_plan_the_same(capsys: pytest.CaptureFixture[str], word: str) -> None:
    rc, out, _ = cli_run(capsys, "plan", "qwen3.5-0.8b", "--quant", word, "-o", "json")
    assert rc == 0
    d = json.loads(out)
    assert "Q4_K_M" in d["plan"]["args"][d["plan"]["args"].index("-m") + 1]
    rc, out, _ = cli_run(capsys, "values", "qwen3.5-0.8b", "--quant", word)
    assert rc == 0 and "quant: Q4_K_M" in out


def test_crd_quant_is_structural_pattern() -> None:
    spec = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    quant = spec["properties"]["model"]["properties"]["quant"]
    assert quant["type"] == "string" and "enum" not in quant
    assert re.compile(quant["pattern"]).fullmatch("q4_k_m")


# ---- output ---------------------------------------------------------------------------------------


def test_table_units_are_what_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_run(capsys, "plan", *MODEL, "--memory", "8Gi")
    assert rc == 0
    assert re.search(r"\| System RAM\s+\| 8\.00 GiB$", out, re.MULTILINE), out
    assert re.search(r"\| Model size\s+\| 0\.\d\d GiB$", out, re.MULTILINE)
    assert re.search(r"\| KV cache\s+\| [\d,.]+ MiB", out)
    assert not re.search(r"\d GB\b", out), "GiB values must not be labelled GB"


@pytest.mark.parametrize("output", ["table", "json", "yaml"])
def test_closed_pipe_is_quiet(output: str) -> None:
    """`modelfit plan ... | head -1` where head has already gone: no traceback, the SIGPIPE status."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        p = subprocess.run(
            [sys.executable, "-m", "modelfit.cli", "plan", *MODEL, "-o", output],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert p.stderr == ""
    assert p.returncode == 141


def test_head_reads_one_line() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelfit.cli", "plan", *MODEL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == "Hardware Requirements\n"
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode in (0, 141)


def test_unexpected_error_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("planner exploded\nsecond line")

    monkeypatch.setattr(cli, "place", boom)
    monkeypatch.delenv("MODELFIT_DEBUG", raising=False)
    rc, _, err = cli_run(capsys, "plan", *MODEL)
    assert rc == 1
    assert err == "modelfit: error: unexpected RuntimeError: planner exploded\n"


# ---- the spec options are the spec's fields: same ranges, same words, every door ----------------------

PROBES = [-1, 0, 1, 15, 16, 255, 256, 1000, 1001, 1024, 1025, 8192, 1048576, 1048577, 16777216, 16777217]
WORDS = ["auto", "max", "x", "f16", "q8_0", "q4_0", "q2", "mmap", "none", "mlock", "on", "off", "cpu", "cuda", "tpu"]


@pytest.mark.parametrize("option", cli_options.SPEC_OPTIONS, ids=lambda o: o.flag)
def test_cli_accepts_what_the_spec_accepts(option: cli_options.SpecOption) -> None:
    """Each spec option takes exactly the values ModelDeploymentSpec takes (no hand copy of a range to drift)."""
    from modelfit.api import ModelDeploymentSpec

    if option.field == "adapt":
        return
    parser = cli.build_parser()

    def cli_ok(text: str) -> bool:
        try:
            args = parser.parse_args(["values", *MODEL, option.flag, text])
        except SystemExit:
            return False
        return not isinstance(getattr(args, option.field), cli_options.Rejected)

    def spec_ok(value: object) -> bool:
        try:
            ModelDeploymentSpec.model_validate(
                {"model": {"catalog": "qwen3.5-0.8b", "quant": "Q4_0"}, option.alias: value}
            )
        except ValidationError:
            return False
        return True

    accepted = 0
    with contextlib.redirect_stderr(io.StringIO()):
        for value in [*PROBES, *WORDS]:
            assert cli_ok(str(value)) == spec_ok(value), (option.flag, value)
            accepted += spec_ok(value)
    assert accepted >= 2


SAMPLES = {
    "context": ["--context", "8192"],
    "min_context": ["--min-context", "4096"],
    "parallel": ["--parallel", "2"],
    "threads": ["--threads", "3"],
    "kv_cache_type": ["--kv-cache-type", "q8_0"],
    "load_mode": ["--load-mode", "mmap"],
    "flash_attention": ["--flash-attention", "on"],
    "prompt_cache": ["--prompt-cache", "256"],
    "backend": ["--backend", "cpu"],
    "gpu_layers": ["--gpu-layers", "0"],
    "replicas": ["--replicas", "2"],
    "adapt": ["--adapt"],
}


def test_every_spec_option_on_every_door(capsys: pytest.CaptureFixture[str]) -> None:
    """plan, serve and values take the same spec options (plan had no --adapt); plan -f refuses each."""
    parser = cli.build_parser()
    assert set(SAMPLES) == {o.field for o in cli_options.SPEC_OPTIONS}
    for field, argv in SAMPLES.items():
        values = parser.parse_args(["values", *MODEL, *argv])
        assert getattr(values, field) is not None, argv
        if field == "replicas":  # pods: a values (and manifest) word, not a plan one
            continue
        for cmd in ("plan", "serve"):
            args = parser.parse_args([cmd, *MODEL, *argv])
            assert getattr(args, field) == getattr(values, field), (cmd, argv)
        rc, _, err = cli_run(capsys, "plan", "-f", "-", *argv)
        flag = cli_options.OPTIONS[field].flag
        assert rc == 2 and f"argument {flag}: not allowed with -f" in err, err
