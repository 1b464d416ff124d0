"""What a RULER run is: :class:`RulerConfig`, checked in full before any model loads.

The defaults are the kvpress leaderboard's protocol: every task, 4k tokens, every budgeted method at
keep 0.75/0.5/0.25/0.125 (compression ratios 0.25/0.5/0.75/0.875), full once, both protocols.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ...models import load_config
from ..config import DTYPES, BenchConfig, Run, check_settings
from .protocols import PROTOCOLS
from .tasks import get_ruler_task, ruler_tasks

LEADERBOARD_KEEPS = [0.75, 0.5, 0.25, 0.125]
DEFAULT_POLICIES = ["full", "snapkv", "pyramidkv", "adakv", "streaming", "h2o", "tova", "knorm", "random"]
DEFAULT_SAMPLES = 50


@dataclass
class RulerConfig:
    """A RULER run: every task x length x sample through every policy run under every protocol.

    ``chat``: wrap inputs in the tokenizer's chat template (RULER's setting for instruct models); None
    uses it when the tokenizer has one. ``batch_size``: samples generated together (one task and length
    at a time, so a batch holds prompts of nearly equal length).

    ``engine``: generate through the paged engine instead (:mod:`.engine`), every prompt of a policy run,
    protocol and length at once, in a KV pool of ``kv_memory`` GiB (``batch_size`` does not apply). Its
    records sit beside the Hugging Face path's in the same run directory, so a directory holding both
    reports how often they answer alike.

    ``workers``: processes that run the policy runs at once on the same device (:mod:`.workers`), each with its
    own model (and engine and ``kv_memory`` pool); the records are the same as one process writes.
    """

    model: str = "qwen2.5-coder-0.5b"
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    keeps: list[float] = field(default_factory=lambda: list(LEADERBOARD_KEEPS))
    tasks: list[str] = field(default_factory=ruler_tasks)
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = DEFAULT_SAMPLES
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    out: str = "results/ruler"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 8
    chat: bool | None = None
    engine: bool = False
    kv_memory: float | None = None
    workers: int = 1
    report_only: bool = False

    def runs(self) -> list[Run]:
        return BenchConfig(policies=self.policies, keeps=self.keeps).runs()

    def validate(self) -> list[Run]:
        """Check everything that can be checked without loading weights; returns the policy runs."""
        model_config = load_config(self.model)  # names the accepted kinds of --model when it is none of them
        runs = self.runs()
        if not self.tasks:
            raise ValueError(f"no tasks given: e.g. --tasks {','.join(ruler_tasks()[:3])}")
        for name in self.tasks:
            get_ruler_task(name)
        bad = [p for p in self.protocols if p not in PROTOCOLS] or ([] if self.protocols else ["none"])
        if bad:
            raise ValueError(f"protocols {bad}: choose from {', '.join(PROTOCOLS)}")
        shortest = max(get_ruler_task(t).tokens_to_generate for t in self.tasks) + 64
        if not self.lengths or min(self.lengths) < shortest:
            raise ValueError(f"lengths {self.lengths}: RULER lengths count input and answer tokens; give at "
                             f"least {shortest}, e.g. 4k,8k")
        check_settings(self.model, model_config, self.lengths, self.dtype, "cpu" if self.report_only else self.device,
                       {"samples": self.samples, "batch_size": self.batch_size})  # a report reads no device
        if self.engine and (self.kv_memory is None or self.kv_memory <= 0):
            raise ValueError(f"kv_memory={self.kv_memory}: --engine runs every policy in a fixed KV pool; give its "
                             "size in GiB, e.g. --kv-memory 2")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers={self.workers!r}: give a positive whole number of worker processes, "
                             "e.g. --workers 4")
        if not self.engine and self.kv_memory is not None:
            raise ValueError("--kv-memory sizes the paged engine's KV pool: add --engine, or leave --kv-memory out")
        return runs

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def identity(self) -> dict[str, Any]:
        """Settings that change results: a resumed run must match them."""
        return {"suite": "ruler", **{k: v for k, v in asdict(self).items() if k in _IDENTITY}}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def command(self) -> str:
        """The ``kvslim bench`` line that reruns (or resumes) this run."""
        chat = "" if self.chat is None else " --chat" if self.chat else " --no-chat"
        engine = f" --engine --kv-memory {self.kv_memory:g}" if self.engine else ""
        workers = f" --workers {self.workers}" if self.workers > 1 else ""
        return (f"kvslim bench --suite ruler --model {self.model} --policies '{','.join(self.policies)}' "
                f"--keep {','.join(f'{k:g}' for k in self.keeps)} --tasks {','.join(self.tasks)} "
                f"--lengths {','.join(map(str, self.lengths))} --samples {self.samples} "
                f"--protocols {','.join(self.protocols)} --out {self.out} --device {self.device} "
                f"--dtype {self.dtype} --seed {self.seed} --batch-size {self.batch_size}{chat}{engine}{workers}")


_IDENTITY = ("model", "device", "dtype", "seed", "chat")
