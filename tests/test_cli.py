"""The command line: clear one-line errors, machine-readable listings, calculator figures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import kvslim
from kvslim.cli import main


def test_methods_json_lists_every_method_with_paper_and_parameters(capsys):
    assert main(["methods", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    for name in ("full", "random", "streaming", "h2o", "tova", "snapkv", "pyramidkv", "adakv", "think", "knorm"):
        assert listed[name]["summary"] and listed[name]["paper"]
    assert {p["name"] for p in listed["snapkv"]["parameters"]} >= {"keep", "budget", "window", "sinks", "kernel"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calc", "--model", "llama-3.1-8b", "--context", "10", "--policy", "nope"], "valid methods: adakv"),
        (["calc", "--model", "llama-3.1-8b", "--context", "10", "--policy", "snapkv", "--keep", "1.5"], "must be in (0, 1]"),
        (["calc", "--model", "llama-3.1-8b", "--context", "10", "--policy", "snapkv(bogus=1)"], "valid parameters"),
        (["calc", "--model", "no-such-model", "--context", "10"], "llama-3.1-8b"),
        (["calc", "--model", "llama-3.1-8b", "--context", "0"], "context"),
        (["run", "--policy", "snapkv", "--keep", "0.25", "--prompt-file", "/no/such/file"], "does not exist"),
        (["calc", "--model", "llama-3.1-8b", "--context", "10", "--kv-cache-dtype", "fp16"],
         "--kv-cache-dtype 'fp16' is not one of auto, fp8, fp8_e4m3, fp8_e5m2"),
        (["calc", "--model", "llama-3.1-8b", "--context", "10", "--kv-cache-dtype", "fp8", "--kv-scale", "tensor"],
         "--kv-scale 'tensor' is not one of per-tensor, per-head"),
        (["run", "--policy", "snapkv+kivi4", "--keep", "0.25", "--kv-cache-dtype", "fp8_e5m2"], "already stores the KV as kivi4"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "kvslim.cli", "calc", "--model", "x", "--context", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown model" in proc.stderr


def test_calc_policy_figure_matches_the_method(capsys):
    assert main(["calc", "--model", "llama-3.1-8b", "--context", "4096", "--policy", "pyramidkv", "--keep", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["full_bytes"] == 4096 * 131072
    assert out["policy_bytes"] == kvslim.policy("pyramidkv", keep=0.25).expected_bytes(kvslim.KVShape(32, 32, 8, 128), 4096)


@pytest.mark.parametrize(("kv_cache_dtype", "scales"), [("fp8_e4m3", 1), ("fp8", 1), ("fp8_e5m2", 8)])
def test_calc_with_kv_cache_dtype_counts_one_byte_per_element_and_the_scales(kv_cache_dtype, scales, capsys):
    argv = ["calc", "--model", "llama-3.1-8b", "--context", "4096", "--kv-cache-dtype", kv_cache_dtype, "--json"]
    assert main(argv + (["--kv-scale", "per-head"] if scales > 1 else [])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy_bytes"] == out["full_bytes"] // 2 + 32 * 2 * scales * 4  # bf16 -> 1 byte; float32 scales


def test_methods_explains_the_kv_cache_dtype_flag(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fp8_e5m2" in out and "--kv-cache-dtype" in out and "per-head" in out


@pytest.mark.parametrize(
    "spec, params, message",
    [
        ("", {}, "non-empty"),
        ("snapkv", {}, "exactly one of keep"),
        ("snapkv", {"keep": 0.5, "budget": 3}, "exactly one of keep"),
        ("snapkv", {"keep": 0.0}, "(0, 1]"),
        ("h2o", {"keep": 0.5, "recent": 1.5}, "recent"),
        ("snapkv(keep=abc)", {}, "not a valid"),
        ("full", {"keep": 0.5}, "no part takes parameter keep"),
        ("snapkv+", {"keep": 0.5}, "cannot parse"),
    ],
)
def test_policy_errors_name_the_fix(spec, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        kvslim.policy(spec, **params)


def test_spec_round_trips():
    p = kvslim.policy("streaming(sinks=8)", keep=0.1)
    assert kvslim.policy(p.spec).spec == p.spec
