"""CUDA-graph decode computes what eager decode computes (GPU only; CPU runs always decode eagerly).

Every decode step of a graph engine also runs the eager forward on the same batch and the last hidden
states are compared; then the whole greedy output is compared with an engine that never replays a graph. Requests
end at different steps, so batches shrink and are padded up to the captured sizes.
"""
from __future__ import annotations

import pytest
import torch

from kvslim.engine import LLM, SamplingParams
from kvslim.engine.head_kv import HeadKV
from kvslim.models import tiny_model
from qwen_shaped import qwen_shaped

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

#: (prompt tokens, output tokens): KIVI keeps 128 ring tokens, so 150+ token prompts pack during decode
REQUESTS = ((5, 30), (150, 12), (170, 21))


def _run(llm: LLM) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    ids = [llm.add_request(torch.randint(1, 256, (n,), generator=gen).tolist(), SamplingParams(max_tokens=m, ignore_eos=True))
           for n, m in REQUESTS]
    while llm.has_unfinished:
        llm.step()
    return [llm.finished.pop(i).token_ids for i in ids]


@pytest.mark.parametrize("policy", ["full", "kivi2", "kivi4", "int4(group=16)", "fp8", "fp8_e4m3", "fp8_e5m2(scale=per-head)",
                                    "snapkv(keep=0.5)", "quest(budget=64)", "streaming(budget=64,sinks=4)",
                                    "think(ratio=0.5)", "snapkv(keep=0.5)+think(ratio=0.25)",
                                    "adakv(keep=0.5)", "pyramidkv(keep=0.5)", "kvzip(keep=0.5)"])
def test_graph_decode_equals_eager(policy: str) -> None:
    _graph_equals_eager(tiny_model("llama", "gqa").cuda(), policy)


@pytest.mark.parametrize("policy", ["think(ratio=0.5)", "snapkv(keep=0.5)+think(ratio=0.5)"])
def test_think_graph_decode_equals_eager_at_qwen_shapes(policy: str) -> None:
    """ThinK's Triton path with Qwen2.5-0.5B's heads: 32 of 64 key channels, a group of 7 padded to 16."""
    _graph_equals_eager(qwen_shaped().cuda(), policy)


@pytest.mark.parametrize("policy", ["adakv(keep=0.25)", "kvzip(keep=0.25)"])
def test_head_blocks_graph_decode_equals_eager_at_qwen_shapes(policy: str) -> None:
    """Per-(layer, KV head) tables (ragged budgets) replayed: Qwen2.5-0.5B's 7 query heads per KV head."""
    graphed = _graph_equals_eager(qwen_shaped().cuda(), policy)
    assert isinstance(graphed.runner.kv, HeadKV)


def _graph_equals_eager(model: torch.nn.Module, policy: str) -> LLM:
    graphed = LLM(model, policy=policy, kv_memory=0.02)
    graphs = graphed.runner.graphs
    assert graphs is not None
    replay, errors = graphs.run, []

    def both(batch):  # the eager forward first: it writes the same keys and values the replay then writes again
        eager = graphed.runner.forward_decode(batch)
        hidden = replay(batch)
        errors.append(float((hidden - eager).abs().max() / eager.abs().max()))
        return hidden

    graphs.run = both
    outputs = _run(graphed)
    assert {1, 4} <= set(graphs.graphs), "batches of 3 (padded to 4) and 1 replayed their graphs"
    # not bit-equal: a replayed batch is padded (3 -> 4 rows), which can change the paged kernel's split count and
    # so the order its TF32 dots are summed in (measured on an H200: up to 1.1e-4 with ThinK's narrow keys)
    assert max(errors) < 5e-4, f"graph hidden states differ from eager by {max(errors):.1e}"
    eager = LLM(model, policy=policy, kv_memory=0.02)
    eager.runner.enforce_eager = True
    assert _run(eager) == outputs
    return graphed


def test_enforce_eager_captures_nothing() -> None:
    llm = LLM(tiny_model("llama", "gqa").cuda(), kv_memory=0.02)
    llm.runner.enforce_eager = True
    _run(llm)
    assert llm.runner.graphs is not None and not llm.runner.graphs.graphs


def test_capture_graphs_captures_every_size_up_front() -> None:
    """A benchmark captures before it times: every size a batch of up to max_num_seqs runs in, and no larger."""
    llm = LLM(tiny_model("llama", "gqa").cuda(), kv_memory=0.02, max_num_seqs=20)
    llm.capture_graphs()
    assert sorted(llm.runner.graphs.graphs) == [1, 2, 4, 8, 16, 32]
    before = dict(llm.runner.graphs.graphs)
    _run(llm)
    assert llm.runner.graphs.graphs == before  # nothing captured while running


@pytest.mark.parametrize("policy", ["full", "snapkv(keep=0.5)", "rkv(keep=0.5,window=4,interval=4)"])
def test_decode_beside_prompt_chunks_replays_graphs(policy: str) -> None:
    """With chunked prefill a step decodes (a graph replay) and then runs prompt chunks eagerly: the same tokens as
    an eager engine that prefills whole prompts."""
    model = tiny_model("llama", "gqa").cuda()
    chunked = LLM(model, policy=policy, kv_memory=0.02, chunked_prefill=True, max_num_batched_tokens=32)
    replays = []
    replay = chunked.runner.graphs.run

    def counted(batch):
        hidden = replay(batch)
        replays.append(hidden is not None)
        return hidden

    chunked.runner.graphs.run = counted
    outputs = _run(chunked)
    assert any(replays) and all(replays)
    eager = LLM(model, policy=policy, kv_memory=0.02)
    eager.runner.enforce_eager = True
    assert _run(eager) == outputs


@pytest.mark.parametrize("policy", ["rkv(budget=64,window=4)", "tova(budget=64)",
                                    "snapkv(keep=0.5,window=4,decode_budget=48,interval=4)",
                                    "h2o(budget=64,window=4)"])
def test_decode_time_compression_replays_graphs(policy: str) -> None:
    """Decode-time compression scores from each step's queries: the replay writes them to a static buffer, the same
    queries the eager step computes, so the evictor keeps the same tokens as without graphs."""
    model = tiny_model("llama", "gqa").cuda()
    graphed = LLM(model, policy=policy, kv_memory=0.02)
    graphs = graphed.runner.graphs
    assert graphs is not None and not graphed.runner.enforce_eager
    replay, errors = graphs.run, []

    def both(batch):
        graphed.runner.forward_decode(batch)
        eager = graphed.runner.step_queries.clone()
        hidden = replay(batch)
        errors.append(float((graphs.queries[: len(eager)] - eager).abs().max() / eager.abs().max()))
        return hidden

    graphs.run = both
    outputs = _run(graphed)
    assert graphs.graphs, "decode steps replayed graphs"
    assert max(errors) < 1e-4, f"graph queries differ from eager by {max(errors):.1e}"
    eager = LLM(model, policy=policy, kv_memory=0.02)
    eager.runner.enforce_eager = True
    assert _run(eager) == outputs
