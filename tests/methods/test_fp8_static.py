"""vLLM's fp8 KV formats (fp8_e4m3, fp8_e5m2) with static scales: error bounds, scale semantics, real bytes, and
the ``--kv-cache-dtype`` mapping."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.cache.fp8 import FP8_FORMATS, ScaledFloat8, static_scales
from kvslim.cache.quantized import QuantizedSegment
from kvslim.methods.fp8_static import kv_cache_dtype_spec, with_kv_cache_dtype

#: (mantissa bits, smallest subnormal) of each format: a code is off by at most half a step of either
FORMATS = {"fp8_e4m3": (3, 2.0**-9), "fp8_e5m2": (2, 2.0**-16)}
SPECS = [f"{fmt}(scale={scale})" for fmt in FORMATS for scale in ("per-tensor", "per-head")]


def _kv(seed: int, batch: int = 2, heads: int = 3, tokens: int = 64, dim: int = 32) -> torch.Tensor:
    """(B, H, T, D) with heads of very different ranges (what per-head scales are for)."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.tensor([0.05, 1.0, 20.0])[:heads].view(1, heads, 1, 1)
    return torch.randn(batch, heads, tokens, dim, generator=gen) * spread


def _round_trip(fmt: str, per_head: bool, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, tokens, _ = x.shape
    valid = torch.ones(batch, heads, tokens, dtype=torch.bool)
    scale = static_scales(x, valid, per_head, fmt)
    row_heads = torch.arange(batch * heads).repeat_interleave(tokens)
    codec = ScaledFloat8.encode(x.flatten(0, 2), row_heads, scale, heads, fmt)
    return codec.decode(row_heads).view_as(x), scale


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("per_head", [False, True])
def test_round_trip_error_is_within_half_a_step(fmt: str, per_head: bool) -> None:
    x = _kv(1)
    out, scale = _round_trip(fmt, per_head, x)
    mantissa, subnormal = FORMATS[fmt]
    row_scale = (scale if per_head else scale.expand(-1, x.shape[1]))[:, :, None, None]
    # half an ulp of a normal number, or half the subnormal step, in the scaled domain
    bound = x.abs() * 2.0 ** -(mantissa + 1) + row_scale * subnormal / 2 + 1e-12
    assert bool(((out - x).abs() <= bound).all())
    assert (out - x).norm() / x.norm() < {"fp8_e4m3": 0.04, "fp8_e5m2": 0.08}[fmt]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_per_head_scales_keep_a_quiet_head_that_per_tensor_scales_flush(fmt: str) -> None:
    """The loud head sets a per-tensor scale that puts a quiet one far below it among the subnormals (a few codes);
    its own scale gives it the whole range. fp8 is floating point, so it takes a ratio beyond the normal range:
    2**15 for e4m3, 2**30 for e5m2."""
    x = _kv(2)
    x[:, 0] *= {"fp8_e4m3": 1e-4, "fp8_e5m2": 1e-8}[fmt] / 0.05
    quiet = x[:, 0]
    errors = {per_head: float((_round_trip(fmt, per_head, x)[0][:, 0] - quiet).norm() / quiet.norm())
              for per_head in (False, True)}
    assert errors[True] < errors[False] / 2, errors


def test_scales_are_absmax_over_valid_tokens_divided_by_the_format_max() -> None:
    x = _kv(3)
    valid = torch.ones(x.shape[:3], dtype=torch.bool)
    valid[:, :, -1] = False
    x[:, :, -1] = 1e6  # a token not held does not set the scale
    for fmt, (_, top) in FP8_FORMATS.items():
        held = x[:, :, :-1].abs()
        per_head = static_scales(x, valid, True, fmt)
        assert per_head.shape == (2, 3) and per_head.dtype == torch.float32
        assert torch.equal(per_head, held.amax((2, 3)) / top)
        per_tensor = static_scales(x, valid, False, fmt)
        assert per_tensor.shape == (2, 1)
        assert torch.equal(per_tensor[:, 0], held.flatten(1).amax(-1) / top)


@torch.inference_mode()
@pytest.mark.parametrize("spec", SPECS)
def test_the_cache_keeps_prefill_scales_while_decoding_and_clamps_beyond_them(llama, spec: str) -> None:
    cache = kvslim.Cache(kvslim.policy(spec), llama.config)
    llama(torch.randint(1, 256, (1, 48)), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    scales = layer.state["fp8_key_scale"].clone(), layer.state["fp8_value_scale"].clone()
    for _ in range(3):
        llama(torch.randint(1, 256, (1, 1)), past_key_values=cache, use_cache=True)
    assert torch.equal(layer.state["fp8_key_scale"], scales[0])
    assert torch.equal(layer.state["fp8_value_scale"], scales[1])
    (segment,) = layer.segments
    heads = segment.lengths.shape[1]
    assert isinstance(segment, QuantizedSegment) and segment.tokens == 51 * heads
    method = kvslim.policy(spec)
    assert segment.keys.codes.dtype == FP8_FORMATS[method.fmt][0] and segment.keys.codes.element_size() == 1
    # a token far beyond the prefill range comes back clamped to the format's largest finite value
    loud = torch.full((1, heads, 1, segment.keys.codes.shape[-1]), 1e6)
    packed = method.packed_segment(layer, loud, loud, torch.ones(1, heads, 1, dtype=torch.bool))
    keys, values, _ = packed.dense()
    for out, scale in ((keys, scales[0]), (values, scales[1])):
        want = (scale if method.per_head else scale.expand(-1, heads)) * FP8_FORMATS[method.fmt][1]
        assert torch.equal(out[..., 0, :].float(), want[..., None].expand_as(out[..., 0, :]).to(out.dtype).float())


@torch.inference_mode()
@pytest.mark.parametrize("spec", SPECS + ["snapkv(keep=0.5,window=4)+fp8_e5m2"])
def test_cache_bytes_are_one_byte_per_element_plus_the_scales_as_calc_says(llama, spec: str) -> None:
    method = kvslim.policy(spec)
    cache = kvslim.Cache(method, llama.config)
    llama(torch.randint(1, 256, (1, 40)), past_key_values=cache, use_cache=True)
    shape = cache.shape
    quantizer = method.parts[-1] if isinstance(method, kvslim.methods.Chain) else method
    scales = 2 * shape.num_layers * (shape.num_kv_heads if quantizer.per_head else 1) * 4
    held = sum(int(layer.lengths.sum()) for layer in cache.layers)
    assert cache.nbytes() == 2 * held * shape.head_dim + scales
    assert cache.nbytes() == method.expected_bytes(shape, 40)


@pytest.mark.parametrize(("spec", "dtype", "scale", "want"), [
    ("snapkv(keep=0.25)", "fp8_e5m2", None, "snapkv(keep=0.25)+fp8_e5m2"),
    ("snapkv(keep=0.25)", "fp8", None, "snapkv(keep=0.25)+fp8_e4m3"),  # vLLM: fp8 is e4m3
    ("full", "fp8_e4m3", "per-head", "fp8_e4m3(scale=per-head)"),
    ("adakv(expected_attention,keep=0.25)", "fp8_e5m2", "per-tensor",
     "adakv(expected_attention,keep=0.25)+fp8_e5m2(scale=per-tensor)"),
    ("kivi4", "auto", None, "kivi4"),
])
def test_kv_cache_dtype_appends_the_format_to_the_policy(spec: str, dtype: str, scale: str | None, want: str) -> None:
    assert kv_cache_dtype_spec(spec, dtype, scale) == want
    assert kvslim.policy(kv_cache_dtype_spec(spec, dtype, scale)).spec == kvslim.policy(want).spec


def test_kv_cache_dtype_on_a_built_method_rebuilds_it() -> None:
    built = with_kv_cache_dtype(kvslim.policy("snapkv", keep=0.25), "fp8_e5m2", "per-head")
    assert built.spec == kvslim.policy("snapkv(keep=0.25)+fp8_e5m2(scale=per-head)").spec


@pytest.mark.parametrize(("spec", "dtype", "scale", "message"), [
    ("full", "fp8e4m3", None, "is not one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    ("full", "int8", None, "is not one of"),
    ("full", "fp8", "per-token", "--kv-scale 'per-token' is not one of per-tensor, per-head"),
    ("full", "auto", "per-head", "give it with --kv-cache-dtype"),
    ("snapkv+kivi4", "fp8", None, "already stores the KV as kivi4"),
    ("fp8", "fp8_e5m2", None, "already stores the KV as fp8"),
])
def test_bad_kv_cache_dtype_is_one_clear_error(spec: str, dtype: str, scale: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        kv_cache_dtype_spec(spec, dtype, scale)


def test_bad_scale_parameter_names_the_choices() -> None:
    with pytest.raises(ValueError, match="scale='tensor' must be one of per-tensor, per-head"):
        kvslim.policy("fp8_e4m3(scale=tensor)")
