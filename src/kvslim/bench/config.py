"""What a benchmark run is: :class:`BenchConfig`, checked in full before any model loads.

Checking first matters because loading a model and generating samples takes a while: a typo in the
last policy name should cost milliseconds, not a model load.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..methods import Method, policy as build_policy
from ..methods.fp8_static import kv_cache_dtype_spec
from ..models import load_config
from .tasks import get_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*$")


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,4k"`` -> ``[1024, 2048, 4096]``; plain numbers are tokens, ``k`` means 1024."""
    lengths = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        match = _LENGTH.match(item)
        if not match:
            raise ValueError(f"cannot read length {item!r}: write tokens as 1500 or 1k, 1.5k (k = 1024)")
        tokens = float(match.group(1)) * (1024 if match.group(2) else 1)
        if tokens < 1 or tokens != int(tokens):
            raise ValueError(f"length {item!r} is {tokens} tokens: give a positive whole number of tokens")
        lengths.append(int(tokens))
    if not lengths:
        raise ValueError(f"no lengths in {text!r}: give a comma-separated list such as 1k,2k,4k")
    return lengths


def parse_list(text: str) -> list[str]:
    """Split a comma-separated option, keeping commas inside parentheses (``snapkv(keep=0.1,window=8)``)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [i for i in items + [cur.strip()] if i]


def parse_policies(text: str, kv_cache_dtype: str = "auto", kv_scale: str | None = None) -> list[str]:
    """``--policies`` with vLLM's ``--kv-cache-dtype`` (and ``--kv-scale``) applied to each: ``snapkv`` with fp8_e5m2
    runs as ``snapkv+fp8_e5m2``, ``full`` as ``fp8_e5m2``."""
    return [kv_cache_dtype_spec(spec, kv_cache_dtype, kv_scale) for spec in parse_list(text)]


def parse_keeps(text: str) -> list[float]:
    try:
        return [float(k) for k in parse_list(text)]
    except ValueError:
        raise ValueError(f"cannot read keep fractions {text!r}: write them as 0.5,0.25,0.125") from None


@dataclass(frozen=True)
class Run:
    """One policy at one budget: ``keep`` is None for policies that take no budget (full, pure quantizers)."""

    policy: str
    keep: float | None

    def build(self) -> Method:
        return build_policy(self.policy) if self.keep is None else build_policy(self.policy, keep=self.keep)

    @property
    def label(self) -> str:
        return self.policy if self.keep is None else f"{self.policy}@{self.keep:g}"


@dataclass
class BenchConfig:
    """A benchmark: every (task, length, sample) through every policy run, written to ``out``.

    ``chat=False`` feeds the task's plain prompt, which ends in an answer prefix ("The pass key is").
    ``chat=True`` puts instruction, context and question in the tokenizer's chat template and starts the
    assistant turn with the answer prefix. Plain is the default because SmolLM2-135M-Instruct answers
    passkey far better that way (:data:`kvslim.bench.harness.CHAT_NOTE` has the numbers).
    ``ppl_tokens``: continuation tokens scored per perplexity sample (at most half the sample).
    """

    model: str = "smollm2-135m"
    policies: list[str] = field(default_factory=lambda: ["full", "snapkv", "streaming"])
    keeps: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    samples: int = 20
    out: str = "results/bench"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 1
    chat: bool = False
    ppl_tokens: int = 256

    def runs(self) -> list[Run]:
        """Policy runs in order, after checking every name and parameter (``ValueError`` names valid ones).

        A policy that builds without a budget (``full``, ``kivi2``, ``snapkv(budget=64)``) runs once;
        one that needs ``keep`` (``snapkv``, ``snapkv+kivi4``) runs once per keep fraction.
        """
        if not self.keeps or any(not 0 < k <= 1 for k in self.keeps):
            raise ValueError(f"keep fractions {self.keeps} must each be in (0, 1], e.g. 0.5,0.25,0.125")
        runs: list[Run] = []
        for spec in self.policies:
            try:
                build_policy(spec)
                candidates = [Run(spec, None)]
            except ValueError:
                candidates = [Run(spec, k) for k in dict.fromkeys(self.keeps)]
                for run in candidates:
                    run.build()  # raises the registry's message (valid names or parameters)
            runs += [r for r in candidates if r not in runs]
        if not runs:
            raise ValueError("no policies given: e.g. --policies full,snapkv,streaming")
        return runs

    def validate(self) -> list[Run]:
        """Check everything that can be checked without loading weights; returns the policy runs."""
        model_config = load_config(self.model)  # names the accepted kinds of --model when it is none of them
        runs = self.runs()
        if not self.tasks:
            raise ValueError("no tasks given: e.g. --tasks passkey,needle")
        for name in self.tasks:
            get_task(name)
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths {self.lengths} must be positive token counts")
        check_settings(self.model, model_config, self.lengths, self.dtype, self.device,
                       {"samples": self.samples, "batch_size": self.batch_size, "ppl_tokens": self.ppl_tokens})
        return runs

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def identity(self) -> dict[str, Any]:
        """The settings that change results: a resumed run must match them or it would mix incomparable lines."""
        return {k: v for k, v in asdict(self).items() if k in _IDENTITY}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def command(self) -> str:
        """The ``kvslim bench`` line that reruns (or resumes) this benchmark."""
        parts = [
            "kvslim bench", f"--model {self.model}", f"--policies '{','.join(self.policies)}'",
            f"--keep {','.join(f'{k:g}' for k in self.keeps)}", f"--tasks {','.join(self.tasks)}",
            f"--lengths {','.join(map(str, self.lengths))}", f"--samples {self.samples}", f"--out {self.out}",
            f"--device {self.device}", f"--dtype {self.dtype}", f"--seed {self.seed}",
            f"--batch-size {self.batch_size}", f"--ppl-tokens {self.ppl_tokens}",
        ]
        return " ".join(parts + (["--chat"] if self.chat else []))


def default_dtype(dtype: str | None, device: str) -> str:
    """``--dtype``, else bfloat16 on a GPU and float32 on the CPU (as every kvslim entry point loads models)."""
    return dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def check_settings(model: str, model_config: Any, lengths: list[int], dtype: str, device: str,
                   counts: dict[str, int]) -> None:
    """What every benchmark checks before loading weights: lengths within the model's context, positive counts,
    a known dtype and a device that exists here; ``ValueError`` naming the fix."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and max(lengths) > limit:
        raise ValueError(f"length {max(lengths)} exceeds {model}'s context of {limit} tokens")
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {', '.join(DTYPES)}")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}; valid devices: cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")


_IDENTITY = ("model", "device", "dtype", "seed", "chat", "ppl_tokens")
