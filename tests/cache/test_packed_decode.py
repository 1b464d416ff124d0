"""Decoding a quantized HF cache straight from its packed codes (the Triton kernel) matches attending over the
dequantized copy. Triton's interpreter must be on before Triton is imported, so on a CPU the checks rerun in a
child process with ``TRITON_INTERPRET=1`` (as in tests/kernels/test_quant_decode.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import kvslim  # noqa: E402
from kvslim.cache import hf_cache  # noqa: E402
from kvslim.models import tiny_model  # noqa: E402

IN_PROCESS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _decode(policy: str, fused: bool, monkeypatch: pytest.MonkeyPatch, max_length: int | None = None,
            steps: int = 20) -> tuple[list[int], list, list[bool]]:
    model = tiny_model("llama", "gqa", seed=0).to(DEVICE, torch.bfloat16)
    calls = []
    real = hf_cache._packed_decode

    def counted(*args):
        out = real(*args) if fused else None
        calls.append(out is not None)
        return out

    monkeypatch.setattr(hf_cache, "_packed_decode", counted)
    ids = torch.randint(1, 256, (1, 100), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cache = kvslim.Cache(kvslim.policy(policy), model.config, max_length=max_length)
    tokens, logits = [], []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            token = out[:, -1:].argmax(-1)
            tokens.append(int(token))
            out = model(token, past_key_values=cache, use_cache=True).logits
            logits.append(out.float())
    return tokens, logits, calls


@pytest.mark.skipif(not IN_PROCESS, reason="CPU: runs in a child process (test_under_the_interpreter)")
@pytest.mark.parametrize(("policy", "max_length"), [("kivi4(residual=16,group=32)", None),
                                                     ("kivi2(residual=16,group=32)", None), ("int4", None),
                                                     ("kivi4(residual=16,group=32)", 128)])
def test_packed_decode_matches_the_dequantized_copy(policy: str, max_length: int | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing tails, and a static one (``max_length``: the tail is a fixed buffer read under its mask)."""
    fused_tokens, fused_logits, calls = _decode(policy, True, monkeypatch, max_length)
    assert calls and all(calls)  # every decoding step of every layer read the codes
    dense_tokens, dense_logits, _ = _decode(policy, False, monkeypatch, max_length)
    assert fused_tokens == dense_tokens
    for a, b in zip(fused_logits, dense_logits):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(IN_PROCESS, reason="the checks above run in this process")
def test_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout.splitlines()[-1]
