"""Run a test file's ``__main__`` checks under Triton's interpreter in a child process.

The interpreter must be switched on before Triton is first imported, which in a pytest session has
long happened; a child process starts clean.
"""
from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(path: str, timeout_s: int = 600) -> None:
    tests = os.path.dirname(os.path.abspath(__file__))  # the child imports this module too, as pytest's pythonpath does
    paths = [tests, os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
