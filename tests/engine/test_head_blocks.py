"""Per-(layer, KV head) blocks for per-head and per-layer budgets: the engine gives kvslim.Cache's tokens, holds its
kept bytes (up to each head's last, partly filled block), and admits more sequences into the same memory."""
from __future__ import annotations

import pytest
import torch

import kvslim
from kvslim.engine import LLM, SamplingParams
from kvslim.engine.head_blocks import HeadBlockManager
from kvslim.engine.sequence import Sequence
from kvslim.hf_compat import cache_arg
from hf_greedy import hf_greedy

PROMPTS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 71)]


@pytest.mark.parametrize("spec", [
    "adakv(keep=0.25,window=4)",  # ragged across heads
    "pyramidkv(keep=0.3,window=4)",  # ragged across layers
    "auto(keep=0.3,window=4)",  # budgets over layers and heads, set by the observed attention (kvzip: test_compression)
])
def test_head_blocks_match_hf_cache_path(llama, spec: str) -> None:
    llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=4)
    assert llm.head_blocks
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
    assert [out.token_ids for out in outs] == [hf_greedy(llama, spec, prompt, 24) for prompt in PROMPTS]
    assert llm.blocks.num_free == llm.blocks.num_blocks and len(llm.blocks.free_rows) == llm.blocks.rows
    assert (llm.blocks.host == -1).all() and bool((llm.runner.kv.tables == -1).all())  # every table row emptied


@torch.inference_mode()
def _hf_kept(model, spec: str, prompt: list[int]) -> tuple[torch.Tensor, int]:
    """Tokens each (layer, KV head) keeps after kvslim.Cache's prefill, and the bytes it holds."""
    cache = kvslim.Cache(kvslim.policy(spec), model.config)
    model(torch.tensor([prompt]), use_cache=True, **cache_arg(cache))
    stats = cache.stats()
    return torch.tensor(stats["tokens_kept_per_layer_head"])[:, 0], stats["nbytes"]


@pytest.mark.parametrize("spec", ["adakv(keep=0.25,window=4)", "pyramidkv(keep=0.3,window=4)"])
def test_bytes_after_prefill_are_the_hf_paths_kept_bytes(llama, spec: str) -> None:
    """Each head holds ceil(kept / block_size) blocks of its own: the engine's bytes are kvslim.Cache's plus exactly
    the empty slots of each head's last block (fewer than one block per (layer, KV head))."""
    block_size = 4
    kept, hf_bytes = _hf_kept(llama, spec, PROMPTS[1])
    llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=block_size)
    llm.add_request(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))
    llm.step()  # the prefill
    seq = llm.scheduler.running[0]
    assert torch.equal(seq.slot_lens(*kept.shape), kept)
    blocks = -(-kept // block_size)
    assert llm.blocks.held(seq) == llm.blocks.num_used == int(blocks.sum())
    slot_bytes = llm.block_bytes // block_size
    assert llm.blocks.num_used * llm.block_bytes == hf_bytes + int((blocks * block_size - kept).sum()) * slot_bytes
    dense = LLM(llama, policy=spec, kv_memory=0.01, block_size=block_size, head_blocks=False)
    dense.add_request(PROMPTS[1], SamplingParams(max_tokens=8, ignore_eos=True))
    dense.step()
    assert llm.blocks.num_used * llm.block_bytes < dense.blocks.num_used * dense.block_bytes  # the padding is gone


def test_chunked_prefill_over_head_blocks(llama) -> None:
    """Chunks are stored whole in every head's blocks and read back by the next chunk; the evictor then keeps what an
    unchunked prefill keeps: the same tokens."""
    spec = "adakv(keep=0.3,window=4)"
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (41, 19, 33)]
    llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=4, chunked_prefill=True, max_num_batched_tokens=8)
    assert llm.head_blocks
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
    assert [out.token_ids for out in outs] == [hf_greedy(llama, spec, prompt, 16) for prompt in prompts]
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_length_aware_admission_reserves_head_blocks(llama) -> None:
    """Six long outputs outgrow the pool: the default admission preempts (a recomputed prefill compresses the output
    so far too, so those tokens differ from kvslim.Cache's), length-aware admission reserves their growth in
    head-blocks and waits instead: no preemption, kvslim.Cache's tokens."""
    spec, params = "adakv(keep=0.3,window=4)", SamplingParams(max_tokens=48, ignore_eos=True)
    prompts = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (30, 33, 29, 32, 31, 28)]
    memory = 40 * LLM(llama, kv_memory=0.001, block_size=4).block_bytes / 2**30
    plain = LLM(llama, policy=spec, kv_memory=memory, block_size=4)
    aware = LLM(llama, policy=spec, kv_memory=memory, block_size=4, length_aware=True)
    assert plain.head_blocks and aware.head_blocks
    plain.generate(prompts, params)
    outs = aware.generate(prompts, params)
    assert aware.scheduler.preemptions == 0 < plain.scheduler.preemptions
    assert [out.token_ids for out in outs] == [hf_greedy(llama, spec, prompt, 48) for prompt in prompts]
    assert aware.blocks.num_free == aware.blocks.num_blocks


def _most_running(llama, spec: str, head_blocks: bool, kv_memory: float) -> int:
    llm = LLM(llama, policy=spec, kv_memory=kv_memory, block_size=4, head_blocks=head_blocks, max_num_seqs=16)
    assert llm.head_blocks == head_blocks
    for seed in range(16):
        prompt = torch.randint(1, 256, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
        llm.add_request(prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    most = 0
    while llm.has_unfinished:
        llm.step()
        most = max(most, len(llm.scheduler.running))
    assert all(out.stats["completion_tokens"] == 16 for out in llm.finished.values())  # preempted ones too
    assert llm.blocks.num_free == llm.blocks.num_blocks
    return most


def test_head_blocks_admit_more_sequences_into_the_same_memory(llama) -> None:
    spec = "adakv(keep=0.25,window=4)"
    memory = 96 * LLM(llama, policy=spec, kv_memory=0.01, block_size=4, head_blocks=False).block_bytes / 2**30
    assert _most_running(llama, spec, True, memory) > _most_running(llama, spec, False, memory)


def test_decode_appends_grow_only_the_full_heads_and_free_returns_every_block() -> None:
    layers, heads, block_size = 2, 2, 4
    tables = torch.full((2, layers, heads, 8), -1, dtype=torch.int32)
    blocks = HeadBlockManager(40, block_size, 2, tables)
    seq = Sequence(list(range(10)), SamplingParams())
    assert blocks.can_allocate(40) and not blocks.can_allocate(41)  # 10 blocks in each of the 4 heads, not 11
    blocks.allocate(seq, 10)
    assert blocks.num_used == 12 and seq.block_table == [seq.ring_row * 8 + j for j in range(3)]
    seq.set_held(torch.tensor([[10, 4], [7, 0]]))  # what the prefill kept per (layer, head)
    blocks.trim(seq, seq.kv_slots)
    assert blocks.counts[seq.ring_row].tolist() == [[3, 1], [2, 0]] and blocks.num_used == 6
    for _ in range(6):  # each decoded token adds a slot to every head: a block only where the last one is full
        lens = seq.slot_lens(layers, heads)
        before, device_before = blocks.counts[seq.ring_row].copy(), tables[seq.ring_row].clone()
        blocks.append_slot(seq)
        full = (lens >= torch.from_numpy(before) * block_size).numpy()
        assert (blocks.counts[seq.ring_row] - before == full).all()
        assert torch.equal(tables[seq.ring_row], device_before)  # the step's entries wait for one copy ...
        blocks.flush()  # ... which the scheduler makes once every sequence of the step has its slot
        assert torch.equal(tables[seq.ring_row], torch.from_numpy(blocks.host[seq.ring_row]))
        seq.kv_slots += 1
    assert blocks.counts[seq.ring_row].tolist() == [[4, 3], [4, 2]]  # ceil((kept + 6) / 4)
    assert len(set(blocks.host[seq.ring_row][blocks.host[seq.ring_row] >= 0].tolist())) == blocks.num_used == 13
    blocks.free_seq(seq)
    assert blocks.num_free == 40 and len(blocks.free_rows) == 2 and bool((tables == -1).all())


def test_a_step_waits_when_a_full_head_finds_no_block() -> None:
    tables = torch.full((1, 1, 2, 4), -1, dtype=torch.int32)
    blocks = HeadBlockManager(3, 4, 1, tables)
    seq = Sequence(list(range(8)), SamplingParams())
    blocks.allocate(seq, 4)  # one block per head: 2 of 3
    seq.set_held(torch.tensor([[4, 4]]))
    assert not blocks.can_append(seq)  # both heads are full, one block is free
    seq.set_held(torch.tensor([[4, 2]]))
    assert blocks.can_append(seq)


@pytest.mark.parametrize(("spec", "args"), [
    ("snapkv(keep=0.25)", {}),  # every head keeps the same: one table per sequence wastes nothing
    ("adakv(keep=0.25)+int8", {}),  # quantized pages
    ("adakv(keydiff(keep=0.5,decode_budget=24,interval=2))", {}),  # decode-time compression rewrites pages
    ("adakv(keep=0.25)", {"head_blocks": False}),
])
def test_other_policies_and_features_keep_one_table_per_sequence(llama, spec: str, args: dict) -> None:
    assert not LLM(llama, policy=spec, kv_memory=0.01, **args).head_blocks


def test_forks_share_head_blocks_and_copy_the_ones_they_write(llama) -> None:
    """n completions start from the prompt's head-blocks; each head copies its shared last block before writing it."""
    spec = "adakv(keep=0.25,window=4)"
    greedy = SamplingParams(max_tokens=12, n=2, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, n=3, temperature=1.0, seed=4, ignore_eos=True)
    runs = {}
    for head_blocks in (True, False):
        llm = LLM(llama, policy=spec, kv_memory=0.01, block_size=4, head_blocks=head_blocks)
        assert llm.head_blocks == head_blocks
        runs[head_blocks] = [[c.token_ids for c in out.completions] for out in llm.generate(PROMPTS[:1], greedy)]
        runs[head_blocks] += [[c.token_ids for c in out.completions] for out in llm.generate(PROMPTS[1:], sampled)]
        assert llm.blocks.num_free == llm.blocks.num_blocks
    assert runs[True][0] == [hf_greedy(llama, spec, PROMPTS[0], 12)] * 2
    assert runs[True] == runs[False]  # the same seeded samples from either layout


def test_a_fork_copies_only_the_shared_blocks_its_heads_write() -> None:
    tables = torch.full((2, 1, 2, 4), -1, dtype=torch.int32)
    blocks = HeadBlockManager(10, 4, 2, tables)
    parent = Sequence(list(range(8)), SamplingParams())
    blocks.allocate(parent, 8)
    parent.set_held(torch.tensor([[6, 8]]))  # head 0's last block is half full, head 1's full
    blocks.trim(parent, parent.kv_slots)
    child = parent.fork()
    blocks.fork(parent, child)
    assert blocks.num_used == 4 and (blocks.host[child.ring_row] == blocks.host[parent.ring_row]).all()
    copies = blocks.append_slot(child)
    shared = int(blocks.host[parent.ring_row, 0, 0, 1])
    assert copies == [(shared, int(blocks.host[child.ring_row, 0, 0, 1]))]  # head 0 copies, head 1 takes a new block
    assert blocks.counts[child.ring_row].tolist() == [[2, 3]] and blocks.num_used == 6
    assert blocks.append_slot(parent) == [] and blocks.num_used == 7  # its block is its own again; head 1 grows
    for seq in (parent, child):
        blocks.free_seq(seq)
    assert blocks.num_free == 10 and not blocks.ref_counts.any() and blocks.extra_refs == 0
