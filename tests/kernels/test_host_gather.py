"""The zero-copy gather kernel returns exactly the rows ``index_select`` does.

On a GPU it reads pinned host memory in process. On a CPU it runs under Triton's interpreter, which must be
switched on before Triton is first imported, so ``test_under_the_interpreter`` reruns this file in a child
process with ``TRITON_INTERPRET=1`` (as tests/kernels/test_quant_decode.py does).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from kvslim.kernels.host_gather import gather_rows, supports, zero_copy_works  # noqa: E402

IN_PROCESS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
in_process = pytest.mark.skipif(not IN_PROCESS, reason="CPU: runs in a child process (test_under_the_interpreter)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@in_process
@pytest.mark.parametrize(("rows", "width", "picked"), [(100, 128, 37), (1000, 256, 1), (7, 64, 0)])
def test_gather_equals_index_select(rows: int, width: int, picked: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    host = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
    if DEVICE.type == "cuda":
        host = host.pin_memory()
    index = torch.randint(0, rows, (picked,), generator=gen)
    out = gather_rows(host, index.to(DEVICE), DEVICE)
    assert torch.equal(out.cpu(), host[index])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mapped pinned memory needs a GPU")
def test_pinned_memory_is_mapped_here() -> None:
    assert zero_copy_works(DEVICE)


def test_only_power_of_two_rows_are_gathered() -> None:
    assert supports(torch.empty(4, 128)) and not supports(torch.empty(4, 96)) and not supports(torch.empty(4, 2, 64))


@pytest.mark.skipif(IN_PROCESS, reason="already under the interpreter or on a GPU")
def test_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
