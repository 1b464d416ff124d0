"""What ``kvslim bench`` does around any suite: check everything before loading weights, run, survive Ctrl-C."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from ..models import resolve
from .store import check_config


def launch(make_config: Callable[[], Any], run: Callable[..., dict[str, Any]], progress: bool
           ) -> tuple[Any, dict[str, Any] | int]:
    """``(config, summary)``, or ``(config, exit code)``: 2 with one line for bad input (before any model loads),
    130 after Ctrl-C (finished samples stay in the run directory, and the same command resumes)."""
    config = None
    try:
        config = make_config()
        config.validate()
        check_config(Path(config.out), config.identity())
        if not resolve(config.model).real_weights:
            raise ValueError(f"model {config.model!r} has random weights and no tokenizer: benchmark a real model "
                             "(smollm2-135m, qwen2.5-coder-0.5b, a model directory, a .gguf file)")
    except ValueError as err:
        print(f"kvslim bench: error: {err}", file=sys.stderr)
        return config, 2
    try:
        return config, run(config, progress=progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished samples are kept in {config.out}; rerun the same command to resume",
              file=sys.stderr)
        return config, 130
