"""KV-memory calculator: how many bytes a full KV cache costs, and what a compression policy would hold instead.

Exact integer byte counts come first; human-readable sizes are only a rendering of them, so the numbers can be
checked by hand (e.g. Llama-3.1-8B in bf16: 131072 bytes per token, 16 GiB for 128k tokens).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral
from typing import Any, Protocol

from kvslim.shape import KVShape

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


class SizedPolicy(Protocol):
    """What the calculator needs from a policy: the bytes it holds for one sequence after prefilling n_tokens."""

    def expected_bytes(self, shape: KVShape, n_tokens: int) -> int: ...


@dataclass(frozen=True)
class CalcResult:
    """KV-cache memory for one model geometry, context length and batch size; all sizes in bytes."""

    attention: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    context: int
    batch: int
    bytes_per_token_per_layer: int
    bytes_per_token: int
    full_bytes: int
    sliding_layers: int = 0  # layers that hold at most window - 1 tokens (Mistral, Gemma 2/3, Phi-3 ...)
    window: int | None = None
    policy: str | None = None
    policy_bytes: int | None = None
    policy_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (ints, floats, strings, None) for ``--json`` output and result files."""
        return asdict(self)


def calculate(shape: KVShape, context: int, batch: int, policy: SizedPolicy | None = None,
              windows: list[int | None] | None = None) -> CalcResult:
    """Bytes a full KV cache needs for ``batch`` sequences of ``context`` tokens, and what ``policy`` keeps.

    ``windows``: each layer's sliding window (None: global attention), as
    :func:`kvslim.cache.architecture.layer_windows` reads it; a sliding layer holds at most ``window - 1``
    tokens between steps, as transformers' cache and :class:`kvslim.Cache` do. A policy acts on what each layer
    holds; per-layer budgets (PyramidKV) are then averaged over the layers holding the same count.
    """
    context = _positive_int("context", context, "the number of tokens per sequence, e.g. 4096")
    batch = _positive_int("batch", batch, "the number of sequences, e.g. 1")
    held = [context if w is None else min(context, w - 1) for w in (windows or [None] * shape.num_layers)]
    if len(held) != shape.num_layers:
        raise ValueError(f"windows has {len(held)} layers, the model {shape.num_layers}")
    per_layer = shape.bytes_per_token // shape.num_layers
    full_bytes = per_layer * sum(held) * batch
    policy_bytes = None
    if policy is not None:  # each group of layers holding the same count, at its share of the layers
        groups = {n: held.count(n) for n in held}
        policy_bytes = batch * sum(_policy_bytes(policy, shape, n) * k // shape.num_layers for n, k in groups.items())
    sliding = [w for w in (windows or []) if w is not None]
    return CalcResult(
        attention=shape.attention,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=str(shape.dtype).removeprefix("torch."),
        context=context,
        batch=batch,
        bytes_per_token_per_layer=shape.bytes_per_token // shape.num_layers,
        bytes_per_token=shape.bytes_per_token,
        full_bytes=full_bytes,
        sliding_layers=len(sliding),
        window=min(sliding) if sliding else None,
        policy=None if policy is None else _policy_name(policy),
        policy_bytes=policy_bytes,
        policy_ratio=None if policy_bytes is None else policy_bytes / full_bytes,
    )


def _positive_int(name: str, value: Any, meaning: str) -> int:
    """Reject zero, negatives, floats and bools early, with a message that says what to pass instead."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer ({meaning}), got {value!r}")
    return int(value)


def _policy_bytes(policy: SizedPolicy, shape: KVShape, context: int) -> int:
    """One sequence's bytes under ``policy``, checked to be a byte count so totals stay exact."""
    held = policy.expected_bytes(shape, context)
    if isinstance(held, bool) or not isinstance(held, Integral) or held < 0:
        raise TypeError(f"{_policy_name(policy)}.expected_bytes() must return a non-negative int, got {held!r}")
    return int(held)


def _policy_name(policy: SizedPolicy) -> str:
    """A label for reports: the policy's ``name`` attribute if it has one, else its class name."""
    return str(getattr(policy, "name", None) or type(policy).__name__)


def format_bytes(n: int) -> str:
    """Human-readable size in binary units (1 KiB = 1024 B), e.g. ``16.00 GiB``."""
    size = float(n)
    for unit in _UNITS[:-1]:
        if abs(size) < 1024:
            return f"{n} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} {_UNITS[-1]}"


def _size(n: int) -> str:
    """Human size plus the exact count, so the table is both readable and checkable."""
    return f"{format_bytes(n)} ({n:,} B)"


def format_calc(result: CalcResult) -> str:
    """A small aligned table of a ``CalcResult`` for the terminal."""
    rows = [
        (
            "geometry",
            f"{result.attention}: {result.num_layers} layers x {result.num_kv_heads} KV heads "
            f"({result.num_heads} query heads) x head_dim {result.head_dim}, {result.dtype}",
        ),
        ("tokens", f"{result.context:,} context x {result.batch} batch"),
        ("per token, per layer", _size(result.bytes_per_token_per_layer)),
        ("per token, all layers", _size(result.bytes_per_token)),
        ("full KV cache", _size(result.full_bytes)),
    ]
    if result.sliding_layers:
        rows.insert(-1, ("sliding-window layers", f"{result.sliding_layers} of {result.num_layers} hold at most "
                                                  f"{result.window - 1:,} tokens"))
    if result.policy_bytes is not None:
        rows.append((f"with {result.policy}", f"{_size(result.policy_bytes)}, {result.policy_ratio:.2%} of full"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
