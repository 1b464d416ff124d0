"""Which code a benchmark measured: the commit its JSON records.

On the device machine the benchmarks run in a copy of the working tree whose git HEAD can be older than the code
it holds (the copy keeps the session's base commit), so a run there records the wrong commit unless told:
``KVSLIM_COMMIT=$(git rev-parse HEAD)`` set where the command is composed wins over the copy's ``git rev-parse``.
"""
from __future__ import annotations

import os
import subprocess


def code_commit(given: str | None = None) -> str:
    """``given`` (a ``--commit`` flag), else env ``KVSLIM_COMMIT``, else ``git rev-parse HEAD`` ("" outside a checkout)."""
    if given:
        return given
    if os.environ.get("KVSLIM_COMMIT"):
        return os.environ["KVSLIM_COMMIT"]
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
