"""Run a test file's ``__main__`` checks under Triton's interpreter in a child process.

The interpreter must be switched on before Triton is first imported, which in a pytest session has
long happened; a child process starts clean.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import torch


def run_interpreted(path: str, timeout_s: int = 600) -> None:
    tests = os.path.dirname(os.path.abspath(__file__))  # the child imports this module too, as pytest's pythonpath does
    paths = [tests, os.environ.get("PYTHONPATH", "")]
    # no GPU in the child, as in CI: on a GPU machine the interpreter would otherwise meet CUDA tensors
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]


def natively_or_interpreted(path: str, check: Callable[[], None], timeout_s: int = 300) -> None:
    """Run a Triton kernel's ``check`` in this process on a GPU; on a CPU, ``path``'s ``__main__`` (which runs the
    same check) in a child process under the interpreter."""
    if torch.cuda.is_available():
        check()
        return
    run_interpreted(path, timeout_s)


#: the page dtypes every Triton kernel check covers
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def each_dtype(check: Callable[[torch.dtype], None]) -> Callable[[], None]:
    """``check`` over :data:`KERNEL_DTYPES`: what a kernel test file runs natively or interpreted, and as its
    ``__main__``."""
    def run() -> None:
        for dtype in KERNEL_DTYPES:
            check(dtype)
    return run
