"""Prompts prefilled together in one forward (``ModelRunner.prefill_batch``) store what each stores alone."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.engine import LLM, SamplingParams
from kvslim.engine.compression import Compression, PackedPrompts
from kvslim.engine.model_runner import ModelRunner

LENGTHS = (37, 64, 9, 50)
#: decode-time evictors: each prompt's decode state is split from the batch's layer states; the 9-token prompt is
#: shorter than their query windows (its remembered queries are left-padded in the batch), H2O keeps per-token scores
DECODING = [
    "tova(keep=0.25)",
    "h2o(keep=0.25,window=16)",
    "rkv(keep=0.3,window=16,interval=3)",
    "snapkv(keep=0.25,window=16,decode_budget=12)",
    "expected_attention(keep=0.3,history=16,future=32,decode_budget=12,interval=2)",
    "merge(h2o(keep=0.3,window=16))",
]
PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]


def _engine(model, spec: str, alone: bool, **kwargs) -> LLM:
    """``alone``: a step's prefill token budget of one token admits one prompt per step (prefills come before any
    decode step), so each prompt runs by itself through ``ModelRunner.prefill``."""
    return LLM(model, policy=spec, kv_memory=0.01, block_size=4, max_prefill_tokens=1 if alone else 32768, **kwargs)


def _stored(llm: LLM) -> list[tuple]:
    """Per running sequence: its held slots, pads, ring tokens, and the page bytes (and ring rows) it holds."""
    kv = llm.runner.kv
    out = []
    for seq in llm.scheduler.running:
        held = seq.slot_lens(llm.runner.num_layers, llm.runner.num_kv_heads)
        pages = _pages(llm, seq, held)
        ring = [getattr(kv, name)[:, seq.ring_row] for name in ("ring_k", "ring_v") if kv.ring and hasattr(kv, name)]
        out.append((held, seq.tail, seq.block_table, pages, ring))
    return out


def _pages(llm: LLM, seq, held: torch.Tensor) -> list[torch.Tensor]:
    """What a sequence holds in pages: its blocks across every layer, or with per-head block tables (per-head
    budgets) each layer's slots read through the head's own table, zero past what the head holds."""
    kv = llm.runner.kv
    if hasattr(kv, "block_tensors"):
        return [torch.cat([t.flatten().float() for t in kv.block_tensors(b)]) for b in seq.block_table]
    size = llm.blocks.block_size
    slots = torch.tensor([b * size + o for b in seq.block_table for o in range(size)])[: seq.kv_slots]
    out = []
    for layer in range(llm.runner.num_layers):
        mine = (torch.arange(len(slots))[:, None] < held[layer][None, :])[..., None]  # (T, H, 1)
        out += [torch.where(mine, t.float(), 0.0) for t in kv.read(layer, slots)]
    return out


def _assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for (held_a, tail_a, table_a, pages_a, ring_a), (held_b, tail_b, table_b, pages_b, ring_b) in zip(a, b):
        assert torch.equal(held_a, held_b)
        assert (tail_a is None) == (tail_b is None) and (tail_a is None or torch.equal(tail_a, tail_b))
        assert table_a == table_b
        for x, y in zip(pages_a + ring_a, pages_b + ring_b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _prefill_all(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> int:
    """Add the prompts and step until every one is prefilled; the number of steps that took."""
    for prompt in prompts:
        llm.add_request(prompt, params)
    steps = 0
    while llm.scheduler.waiting or any(s.prefilling for s in llm.scheduler.running):
        llm.step()
        steps += 1
    return steps


@pytest.mark.parametrize("spec", [
    "full",
    "kivi4(group=4,residual=8)",  # quantized pages and a residual ring per sequence
    "snapkv(keep=0.25,window=4)",
    "adakv(keep=0.3,window=4)",  # per-head lengths
    "pyramidkv(keep=0.3,window=4)",  # per-layer lengths
    "expected_attention(keep=0.25,history=16,future=32)",
    "streaming(keep=0.25,sinks=2)",  # a sliding window from the first decode step
    "snapkv(keep=0.3,window=4)+int8",
    "snapkv(keep=0.3,window=4)+kivi4(group=4,residual=8)",  # evicted, then quantized pages and a ring per prompt
    "snapkv(keep=0.25,window=16)",  # the 9-token prompt is shorter than the window: left-padded queries
    "expected_attention(keep=0.3,history=16,future=32)",  # the same, and padding queries weigh nothing
    "adakv(expected_attention(keep=0.3,history=16,future=32))",
    "keydiff(keep=0.3)",
    "knorm(keep=0.3)",
    "lagkv(keep=0.5,lag=4,sinks=2)",
    "merge(snapkv(keep=0.3,window=4))",  # evicted values folded into the kept ones
    "keydiff(keep=0.6)+snapkv(keep=0.5,window=4)",  # two evictors, one after the other
    "adakv(keep=0.3,window=4)+fp8",  # scales measured over each prompt's kept tokens
    "pyramidkv(keep=0.3,window=4)+kcache(n=6,full_layers=1,recent=4)",  # keys in device pages, values on the host
    "snapkv(keep=0.3,window=4)+quest(page=4,budget=16)",  # each block's key extrema
    *DECODING,
])
def test_batched_prefill_stores_what_one_at_a_time_stores(llama, spec: str, monkeypatch) -> None:
    _compare(llama, spec, PROMPTS, monkeypatch)


@pytest.mark.parametrize("spec", ["snapkv(keep=0.25,window=4)", "adakv(keep=0.3,window=4)",
                                  "pyramidkv(keep=0.3,window=4)+kivi4(group=4,residual=8)"])
def test_prompts_of_one_length_compress_as_one_tail(llama, spec: str, monkeypatch) -> None:
    """No padding: the evictor sees one whole tail of every prompt, as a padding-free kvslim.Cache prefill."""
    _compare(llama, spec, [p[:37] for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])], monkeypatch)


def test_the_evictor_runs_once_per_layer_for_the_batch(llama, monkeypatch) -> None:
    llm = _engine(llama, "adakv(keep=0.3,window=4)", alone=False)
    batches = []
    packed = Compression.compress_packed
    monkeypatch.setattr(Compression, "compress_packed", lambda self, i, q, k, v, prompts: batches.append(
        len(prompts.lengths)) or packed(self, i, q, k, v, prompts))
    monkeypatch.setattr(Compression, "__call__", lambda *args: pytest.fail("a prompt of the batch compressed alone"))
    _prefill_all(llm, PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True))
    assert batches == [len(PROMPTS)] * llm.runner.num_layers


@pytest.mark.parametrize("spec", ["random(keep=0.3)", "snapkv(keep=0.5,window=4)+pqcache(k=6,window=4)"])
def test_draws_shaped_by_the_batch_prefill_one_at_a_time(llama, spec: str) -> None:
    """Random scores and PQCache's k-means initialisation are drawn for the shape of what they get: a prompt compressed
    within a batch would draw other numbers than alone."""
    assert not _engine(llama, spec, alone=False).compression.batchable
    assert _engine(llama, "knorm(keep=0.3)", alone=False).compression.batchable


@pytest.mark.parametrize("spec", ["full", "snapkv(keep=0.25,window=4)", "kivi4(group=4,residual=8)"])
def test_prompts_of_far_apart_lengths_attend_one_by_one(llama, spec: str, monkeypatch) -> None:
    """Padding them to the longest would more than double the tokens: each attends alone, the rest is shared."""
    _compare(llama, spec, [PROMPTS[2], PROMPTS[1], PROMPTS[0][:5]], monkeypatch)


def _compare(llama, spec: str, prompts: list[list[int]], monkeypatch) -> None:
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    calls = []
    batch = ModelRunner.prefill_batch
    monkeypatch.setattr(ModelRunner, "prefill_batch", lambda self, seqs, compress: calls.append(len(seqs)) or batch(
        self, seqs, compress))
    together, alone = _engine(llama, spec, alone=False), _engine(llama, spec, alone=True)
    assert _prefill_all(together, prompts, params) == 1 and calls == [len(prompts)]
    assert _prefill_all(alone, prompts, params) == len(prompts) and calls == [len(prompts)]
    _assert_same(_stored(together), _stored(alone))
    for llm in (together, alone):
        while llm.has_unfinished:
            llm.step()
    tokens = lambda llm: [llm.finished[r].token_ids for r in sorted(llm.finished)]  # noqa: E731
    assert tokens(together) == tokens(alone)


@pytest.mark.parametrize("spec", DECODING)
def test_batched_prompts_evict_while_decoding_as_alone(llama, spec: str) -> None:
    """Each decoding step's evictions keep, for every sequence, the tokens it keeps when its prompt ran alone."""
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together, alone = _engine(llama, spec, alone=False), _engine(llama, spec, alone=True)
    for llm in (together, alone):
        _prefill_all(llm, PROMPTS, params)
    for _ in range(8):
        together.step()
        alone.step()
        _assert_same(_stored(together), _stored(alone))


def test_forks_of_batched_prompts_decode_as_alone(llama) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True, n=2)
    together = _engine(llama, "snapkv(keep=0.3,window=4)", alone=False).generate(PROMPTS[:3], params)
    alone = _engine(llama, "snapkv(keep=0.3,window=4)", alone=True).generate(PROMPTS[:3], params)
    assert [[c.token_ids for c in o.completions] for o in together] == [[c.token_ids for c in o.completions] for o in alone]
    assert all(len(o.completions) == 2 for o in together)


@pytest.mark.parametrize("spec", ["adakv(keep=0.3,window=4)", "snapkv(keep=0.3,window=4)", "full", *DECODING])
def test_suffixes_run_together_after_their_batched_prompts(llama, monkeypatch, spec: str) -> None:
    """The query-agnostic protocol: contexts compressed together, then every question in one more forward, each over
    its own context's kept slots (ragged heads with adakv) and its own tokens; questions of different lengths are
    padded there, which must change nothing."""
    calls, extends = [], []
    batch, extend = ModelRunner.prefill_batch, ModelRunner._extend
    monkeypatch.setattr(ModelRunner, "prefill_batch", lambda self, seqs, compress: calls.append(len(seqs)) or batch(
        self, seqs, compress))
    monkeypatch.setattr(ModelRunner, "_extend", lambda self, seqs, helds: extends.append(len(seqs)) or extend(
        self, seqs, helds))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    suffixes = [p[: 3 + 4 * i] for i, p in enumerate(reversed(PROMPTS))]
    apart = spec != "full"  # without compression a suffix is the rest of its prompt
    together = _engine(llama, spec, alone=False).generate(PROMPTS, params, suffixes)
    assert calls == [len(PROMPTS)] and extends == [len(PROMPTS)] * apart
    alone = _engine(llama, spec, alone=True).generate(PROMPTS, params, suffixes)
    assert extends[apart:] == [1] * len(PROMPTS) * apart
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.stats["peak_kv_blocks"] for o in together] == [o.stats["peak_kv_blocks"] for o in alone]


def test_a_step_mixes_batched_and_prefix_cached_prompts(llama, monkeypatch) -> None:
    """The second prompt shares the first one's prefix in the same step: it runs alone, after the batch that writes
    the blocks it reads."""
    shared = PROMPTS[1][:32]
    prompts = [shared + [5, 6, 7], PROMPTS[0], shared + [9], PROMPTS[2]]
    batched = []
    batch = ModelRunner.prefill_batch
    monkeypatch.setattr(ModelRunner, "prefill_batch", lambda self, seqs, compress: batched.append(
        [s.request_id for s in seqs]) or batch(self, seqs, compress))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = _engine(llama, "full", alone=False).generate(prompts, params)
    assert batched == [["req-0", "req-1", "req-3"]]
    assert outs[2].stats["cached_prompt_tokens"] == 32
    alone = _engine(llama, "full", alone=True).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]


def test_a_chunked_step_batches_only_whole_fresh_prompts(llama, monkeypatch) -> None:
    """With chunked prefill a long prompt is split (runs alone) while short ones after it run whole, together."""
    batched = []
    batch = ModelRunner.prefill_batch
    monkeypatch.setattr(ModelRunner, "prefill_batch", lambda self, seqs, compress: batched.append(
        sorted(len(s) for s in seqs)) or batch(self, seqs, compress))
    long = torch.randint(1, 256, (90,), generator=torch.Generator().manual_seed(7)).tolist()
    prompts = [PROMPTS[2], PROMPTS[0], long, PROMPTS[3]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    spec = "snapkv(keep=0.3,window=4)"
    chunked = _engine(llama, spec, alone=False, chunked_prefill=True, max_num_batched_tokens=64).generate(prompts, params)
    assert batched and batched[0] == [len(PROMPTS[2]), len(PROMPTS[0])]
    alone = _engine(llama, spec, alone=True).generate(prompts, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in alone]


@pytest.mark.parametrize("spec", ["kvzip(keep=0.3,chunk=16)", "auto(keep=0.3,window=4)",
                                  "snapkv(keep=0.5,window=4)+think(ratio=0.5)"])
def test_methods_with_state_across_layers_prefill_one_at_a_time(llama, spec: str) -> None:
    """KVzip's probes, auto's ledger and ThinK's channels carry a prompt from layer to layer."""
    assert not _engine(llama, spec, alone=False).compression.batchable


def _packed(lengths: list[int], heads: int = 2, q_heads: int = 4, dim: int = 8) -> tuple[torch.Tensor, ...]:
    """Random packed queries (Hq,N,D), keys and values (H,N,D) of prompts of these lengths."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(h, sum(lengths), dim, generator=gen) for h in (q_heads, heads, heads))


def _left_padded(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Packed (heads,N,D) -> the left-padded batch (B,heads,T,D) a Hugging Face forward of these prompts holds."""
    out = x.new_zeros(len(lengths), x.shape[0], max(lengths), x.shape[-1])
    start = 0
    for row, n in zip(out, lengths):
        row[:, row.shape[1] - n:] = x[:, start:start + n]
        start += n
    return out


def test_packed_prompts_are_laid_out_as_kvslim_cache_lays_out_a_padded_batch() -> None:
    """kvslim.Cache's first forward over a left-padded batch drops the padding from the layer (its real columns
    selected) and keeps each prompt's length as its budget's base; the queries stay left-padded."""
    lengths, observed = [5, 9, 3], 4
    q, k, v = _packed(lengths)
    prompts = PackedPrompts.of(lengths, k.shape[0], observed, torch.tensor)
    real = torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths)[:, None]  # (B, T) the attention mask
    hf = LayerKV(0)
    hf.append(_left_padded(k, lengths), _left_padded(v, lengths))
    hf.select(real[:, None].expand(-1, k.shape[0], -1))
    packed = prompts.layer(0, k, v)
    for ours, theirs in zip(packed.dense(k.dtype), hf.dense(k.dtype)):
        assert torch.equal(ours, theirs)
    assert packed.state["prompt"].tolist() == lengths
    window = real[:, None, -observed:, None]  # padding queries are never attended with: only the real ones count
    assert torch.equal(prompts.queries(q) * window, _left_padded(q, lengths)[:, :, -observed:] * window)


ROPE = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)


@pytest.mark.parametrize("lengths", [[37, 64, 9, 50], [20, 20, 20]])
@pytest.mark.parametrize("spec", [
    "snapkv(keep=0.25,window=16)", "adakv(keep=0.3,window=4)", "pyramidkv(keep=0.3,window=4)",
    "expected_attention(keep=0.25,history=16,future=32)", "keydiff(keep=0.3)", "knorm(keep=0.3)",
    "lagkv(keep=0.5,lag=4,sinks=2)", "streaming(keep=0.25,sinks=2)", "merge(keydiff(keep=0.3))",
])
def test_packed_hook_keeps_what_each_prompt_keeps_alone(spec: str, lengths: list[int]) -> None:
    compression = Compression(kvslim.policy(spec), num_layers=4, scaling=8 ** -0.5, rope=ROPE)
    q, k, v = _packed(lengths)
    prompts = compression.packed(lengths, k.shape[0], torch.tensor)
    for layer in (0, 3):  # PyramidKV's budgets differ by layer
        kept_k, kept_v, lens = compression.compress_packed(layer, q, k, v, prompts)
        start = 0
        for b, n in enumerate(lengths):
            span = slice(start, start + n)
            alone_k, alone_v, alone_lens = compression(layer, q[:, span], k[:, span], v[:, span])
            start += n
            assert torch.equal(lens[b], alone_lens)
            for h, held in enumerate(alone_lens.tolist()):
                torch.testing.assert_close(kept_k[b, h, :held], alone_k[h, :held], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(kept_v[b, h, :held], alone_v[h, :held], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[37, 64, 9, 50], [20, 20, 20]])
@pytest.mark.parametrize("spec", DECODING)
def test_packed_decode_states_are_each_prompts_own(spec: str, lengths: list[int]) -> None:
    """Each prompt's decode-time state split from a batch is the one its prefill alone leaves: the same entries, shapes
    and values (no padding queries remembered, per-token scores as wide as its own kept rows), widened by its suffix."""
    compression = Compression(kvslim.policy(spec), num_layers=3, scaling=8 ** -0.5, rope=ROPE)
    q, k, v = _packed(lengths)
    prompts = compression.packed(lengths, k.shape[0], torch.tensor)
    for layer in range(3):
        compression.compress_packed(layer, q, k, v, prompts)
    appended = list(range(len(lengths)))
    together = compression.take_packed_states(appended)
    start = 0
    for b, n in enumerate(lengths):
        span = slice(start, start + n)
        start += n
        for layer in range(3):
            compression(layer, q[:, span], k[:, span], v[:, span])
        alone = compression.take_states(appended[b])
        assert len(together[b]) == len(alone)
        for ours, theirs in zip(together[b], alone):
            assert ours.keys() == theirs.keys()
            for name in theirs:
                assert ours[name].shape == theirs[name].shape, name
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
