"""KVzip as its authors run it: chunk-local reconstruction scores, sinks kept, one budget over layers and heads."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvslim
from kvslim.cache.layer import LayerKV
from kvslim.methods import Observation
from kvslim.methods.kvzip import KVzip, RepeatPrompt, reconstruct, repeat_prompt
from kvslim.models import tiny_model

REPEAT = RepeatPrompt(first=(5, 6, 7), later=(8, 9), suffix=(10,))


def _reconstructed(model, prompt: torch.Tensor, spec: str) -> kvslim.Cache:
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    reconstruct(model, cache, prompt, prompt=REPEAT)
    return cache


def _reference_scores(prompt: torch.Tensor, chunk: int, sinks: int) -> list[torch.Tensor]:
    """Per layer (H, n) scores by an independent route: the model in eager attention over the context then each
    chunk's probe; the probe's attention renormalised over the sinks, its chunk and itself (softmax restricted to
    those columns), maxed over its rows and the KV head's query group, kept for the chunk's own tokens."""
    model = tiny_model("llama", "gqa", seed=0)
    model.set_attn_implementation("eager")
    n = prompt.shape[1]
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    scores = [torch.zeros(model.config.num_key_value_heads, n) for _ in range(model.config.num_hidden_layers)]
    for c, probe in enumerate(REPEAT.probes(prompt[0].tolist(), chunk)):
        with torch.no_grad():
            out = model(torch.cat([prompt, torch.tensor([probe])], 1), output_attentions=True)
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        columns = torch.zeros(n + len(probe), dtype=torch.bool)
        columns[:sinks], columns[lo:hi], columns[n:] = True, True, True
        for layer, attn in enumerate(out.attentions):
            rows = attn[0, :, n:, :]  # (Hq, P, n + P)
            local = rows[..., lo:hi] / rows[..., columns].sum(-1, keepdim=True)
            scores[layer][:, lo:hi] = local.amax(1).view(-1, group, hi - lo).amax(1)
    return scores


def _kept_positions(cache: kvslim.Cache, prompt: torch.Tensor) -> list[list[set[int]]]:
    """Per layer and KV head, the prompt positions held (each held key matched to the uncompressed prefill's)."""
    model = tiny_model("llama", "gqa", seed=0)
    with torch.no_grad():
        full = model(prompt, past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
    kept = []
    for layer in cache.layers:
        keys, _, valid = layer.dense(torch.float32)
        ref = full.layers[layer.layer_idx].keys[0]  # (H, n, D)
        heads = []
        for h in range(ref.shape[0]):
            held = keys[0, h][valid[0, h]]
            distance = (held[:, None, :] - ref[h][None]).abs().amax(-1)
            heads.append(set(distance.argmin(-1).tolist()))
        kept.append(heads)
    return kept


def test_each_chunk_is_scored_by_its_own_reconstruction_over_sinks_chunk_and_copy(prompt):
    """pair-uniform (every head keeps ``budget``): the 4 sinks, then each head's best reference scores."""
    chunk, budget = 40, 20
    cache = _reconstructed(tiny_model("llama", "gqa", seed=0), prompt,
                           f"kvzip(budget={budget},chunk={chunk},level=pair-uniform)")
    reference = _reference_scores(prompt, chunk, sinks=4)
    for layer_kept, scores in zip(_kept_positions(cache, prompt), reference):
        for h, held in enumerate(layer_kept):
            ranked = scores[h].clone()
            ranked[:4] = float("inf")
            assert held == set(ranked.topk(budget).indices.tolist())


def test_pair_level_shares_one_budget_over_every_layer_and_head(prompt):
    """The authors' default: the request's best (layer, head, token) scores fill layers x heads x budget, so the
    layers hold different lengths; every sink stays."""
    chunk, budget = 40, 30  # past the 4 sinks and the short last chunk, whose scores lead in every head
    cache = _reconstructed(tiny_model("llama", "gqa", seed=0), prompt, f"kvzip(budget={budget},chunk={chunk})")
    lengths = torch.stack([layer.lengths[0] for layer in cache.layers])  # (L, H)
    assert int(lengths.sum()) == lengths.numel() * budget
    assert len(set(lengths.flatten().tolist())) > 1
    reference = torch.stack(_reference_scores(prompt, chunk, sinks=4))  # (L, H, n)
    kept = _kept_positions(cache, prompt)
    held = torch.zeros_like(reference, dtype=torch.bool)
    for layer, heads in enumerate(kept):
        for h, positions in enumerate(heads):
            held[layer, h, list(positions)] = True
            assert set(range(4)) <= positions
    others = reference[:, :, 4:]
    assert float(others[held[:, :, 4:]].min()) >= float(others[~held[:, :, 4:]].max()) - 1e-6


def _plain_chunk_scores(obs: Observation, own: torch.Tensor, real: torch.Tensor, index: int, chunk: int, sinks: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk ``index``'s scores (B,H,T) and its tokens, the plain way: float32 logits of every query head against
    every held key and the probe's own, masked to the chunk's tokens, the sinks and the probe (causally, real
    keys), softmax, padding rows zeroed, max over rows and the KV head's query group."""
    group, valid = obs.group, obs.valid
    rank = valid.long().cumsum(-1) - 1
    in_chunk = valid & (rank >= index * chunk) & (rank < (index + 1) * chunk)
    counted = (in_chunk | valid & (rank < sinks)).repeat_interleave(group, 1)
    queries = obs.queries.float()
    keys = torch.cat([obs.keys.float(), own.float()], 2).repeat_interleave(group, 1)
    logits = queries @ keys.transpose(-1, -2) * obs.scaling
    q_len, held = queries.shape[2], obs.keys.shape[2]
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril() & real[:, None, :]
    allowed = torch.cat([counted[:, :, None, :].expand(-1, -1, q_len, -1),
                         causal[:, None].expand(-1, logits.shape[1], -1, -1)], -1)
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)[..., :held].nan_to_num(0.0)
    probs = probs * real[:, None, :, None]
    batch, q_heads = probs.shape[:2]
    return probs.amax(2).view(batch, q_heads // group, group, held).amax(2), in_chunk


def test_probe_scores_match_the_plain_masked_softmax_over_ragged_heads_and_padded_probes():
    """The scorer gathers the counted keys (sinks, the chunk) before its softmax: over ragged heads (held tokens
    left-aligned, padding columns after them), left-padded probe rows (one row entirely padding) and several chunks,
    its scores are those of the plain softmax over every held key, masked."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, group, dim, length, chunk, sinks = 2, 2, 3, 8, 23, 6, 3
    layer = LayerKV(0)
    layer.append(*(torch.randn(batch, heads, length, dim, generator=gen) for _ in range(2)))
    keep = torch.rand(batch, heads, length, generator=gen) > 0.25
    keep[..., :sinks + 1] = True
    layer.select(keep)  # ragged heads: each row's held tokens left-aligned, padding columns after them
    layer.state.update({"kvzip": None, "kvzip.chunks": 0})
    method = KVzip(keep=0.5, chunk=chunk, sinks=sinks)
    expected = torch.zeros(layer.dense(torch.float32)[2].shape)
    for index, width in enumerate([9, 11, 7, 10]):  # chunk 3: the last tokens of some rows only
        real = torch.ones(batch, width, dtype=torch.bool)
        real[0, :3] = False
        real[1, : width if index == 2 else 1] = False
        obs = Observation(layer, 1, torch.randn(batch, heads * group, width, dim, generator=gen), dim**-0.5, "probe")
        own = torch.randn(batch, heads, width, dim, generator=gen)
        method.on_probe(obs, own, real)
        scores, in_chunk = _plain_chunk_scores(obs, own, real, index, chunk, sinks)
        expected = torch.where(in_chunk, scores, expected)
        torch.testing.assert_close(layer.state["kvzip"], expected, rtol=1e-5, atol=1e-7)
    # the scores compared are not vacuously 0 (only row 1's chunk 2, read by padding alone, is)
    assert (expected[layer.dense(torch.float32)[2]] > 0).float().mean() > 0.7


def test_probes_quote_the_previous_chunk_after_the_continue_instruction():
    tokens = list(range(100, 120))
    probes = REPEAT.probes(tokens, 8)
    assert probes[0] == [5, 6, 7, 10, *tokens[:8]]
    assert probes[1] == [8, 9, *tokens[:8], 10, *tokens[8:16]]
    assert probes[2] == [8, 9, *tokens[8:16], 10, *tokens[16:]]


def test_level_is_checked():
    with pytest.raises(ValueError, match="level='layer' must be one of pair, pair-uniform"):
        KVzip(keep=0.25, level="layer")


def test_kvzip_through_generate_keeps_each_rows_budget_and_refuses_to_decode_unscored(llama):
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (60, 33)]
    _, cache, timing = kvslim.generate_ids(llama, prompts, "kvzip(chunk=16)", keep=0.25, max_new_tokens=1,
                                           repeat=RepeatPrompt(first=(3, 4)))
    totals = sum(layer.lengths.sum(-1) for layer in cache.layers)  # per row, over layers and heads
    heads = len(cache.layers) * cache.layers[0].lengths.shape[1]
    assert totals.tolist() == [15 * heads, 9 * heads]
    assert timing["kv_bytes_prefill"][0] < 60 * 2 * 2 * 2 * 16 * 4 / 3
    unscored = kvslim.Cache(kvslim.policy("kvzip", keep=0.25), llama.config)
    with torch.no_grad(), pytest.raises(ValueError, match="reconstruction pass"):
        llama(torch.tensor([prompts[0]]), past_key_values=unscored, use_cache=True)
        llama(torch.tensor([[1]]), past_key_values=unscored, use_cache=True)


class _CharTokenizer:
    """Characters as token ids, with a ChatML-like template: enough to pin how the assistant opening is read off."""

    chat_template = "chatml"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool, enable_thinking: bool) -> str:
        return f"<s>user\n{messages[0]['content']}</s>\n<s>assistant\n"


def test_repeat_prompt_ends_with_the_chat_templates_assistant_opening():
    prompt = repeat_prompt(_CharTokenizer())
    first, later, suffix = ("".join(map(chr, ids)) for ids in (prompt.first, prompt.later, prompt.suffix))
    assert first == "\n\nRepeat the previous context exactly."
    assert later == "\n\nRepeat the part of the previous context exactly, starting with "
    assert suffix == "</s>\n<s>assistant\n"
