"""`modelfit plan` output: the table rows and the JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert rc == 0 and d["plan"]["kv_cache_type"] == "q4_0" and d["plan"]["context"] == 56320


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
    assert "with --cache-ram 0)" in out  # Min RAM required, with and without the cache
    rc, auto = run(
        capsys, "plan", "qwen3.5-0.8b", "--quant", "q4_0", "--context", "8192", "--memory", "8Gi", "--cache-ram", "auto"
    )
    assert auto == out
