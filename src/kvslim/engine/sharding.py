"""What one tensor-parallel rank holds of the model and of the policy (Megatron/vLLM's split).

Rank ``r`` of ``N`` owns KV heads ``[r*H/N, (r+1)*H/N)`` and the query heads of their groups. Every
rank's shard is an ordinary Hugging Face module tree whose linears are narrower, so
:class:`~kvslim.engine.model_runner.ModelRunner` runs it unchanged (it counts heads from ``q_proj``):

* q/k/v and gate/up are **column-parallel**: each rank computes its heads' and its MLP columns' outputs, no
  communication;
* o_proj and down_proj are **row-parallel** (:class:`RowParallelLinear`): each rank multiplies its slice of
  the input and one all-reduce sums the partial outputs (one after attention, one after the MLP);
* the embedding is **vocab-parallel** (:class:`VocabParallelEmbedding`): each rank looks up the ids in its
  vocabulary rows, zeros elsewhere, and an all-reduce sums them;
* the LM head is column-parallel over the vocabulary (:class:`ParallelLMHead`): rank 0 gathers the logits,
  since only it samples.

Norms and RoPE are replicated. A model on the meta device (a random-weight preset too large for one
device) is never materialized whole: each rank draws random values for its shards only.

Policies: per-head methods (SnapKV, the quantizers) see only the rank's heads and need nothing else;
PyramidKV's layer budgets depend on the prompt length alone, so every rank computes the same ones. AdaKV
ranks all heads of a layer against each other, so :class:`ShardedAdaKV` exchanges each rank's best scores
and keeps exactly what the single-process AdaKV keeps.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods import Chain, Method
from ..methods.adakv import AdaKV


def check_divisible(config: Any, size: int) -> None:
    """A clear error when ``size`` ranks cannot each own whole KV heads and an equal share of the MLP."""
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if size < 1:
        raise ValueError(f"tensor_parallel_size={size}: give a positive number of processes")
    if kv_heads % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the model's {kv_heads} KV heads: each rank owns whole "
                         "KV heads and their KV pool (KV heads are not replicated)")
    if config.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size={size} must divide the MLP width {config.intermediate_size}")


class RowParallelLinear(nn.Linear):
    """``x[..., cols] @ W[:, cols].T`` on each rank, summed by one all-reduce; the bias is added once, after it."""

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + rows)`` of the embedding; other ids give zeros, and the all-reduce fills them in."""

    def __init__(self, weight: Tensor, start: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        dist.all_reduce(out)
        return out


class ParallelLMHead(nn.Module):
    """Logits of rows ``[r*rows, (r+1)*rows)`` of the vocabulary (the last rank's rows padded with zeros to equal
    size); rank 0 gathers them into the whole ``vocab``. Other ranks return their own shard, which nobody reads."""

    def __init__(self, weight: Tensor, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab = vocab

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.weight)
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
        dist.gather(logits, parts, dst=0)
        return logits if parts is None else torch.cat(parts, -1)[..., : self.vocab]


def _rows(weight: Tensor, rank: int, size: int) -> tuple[Tensor, int]:
    """Rank's share of ``weight``'s rows (vocabulary rows: the last share padded with zeros) and where it starts."""
    per = -(-weight.shape[0] // size)
    start = rank * per
    part = weight[start : start + per]
    if part.shape[0] < per:
        part = torch.cat([part, part.new_zeros(per - part.shape[0], *part.shape[1:])])
    return part, start


def _column(linear: nn.Linear, rank: int, size: int, device: torch.device) -> nn.Linear:
    per = linear.out_features // size
    out = nn.Linear(linear.in_features, per, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight[rank * per : (rank + 1) * per].to(device, copy=True), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias[rank * per : (rank + 1) * per].to(device, copy=True), requires_grad=False)
    return out


def _row(linear: nn.Linear, rank: int, size: int, device: torch.device) -> RowParallelLinear:
    per = linear.in_features // size
    out = RowParallelLinear(per, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(linear.weight[:, rank * per : (rank + 1) * per].to(device, copy=True), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.to(device, copy=True), requires_grad=False)
    return out


def shard_model(model: Any, rank: int, size: int, device: torch.device, seed: int = 0) -> Any:
    """Rank ``rank``'s shard of a Hugging Face Llama-family model, on ``device``; ``model`` itself is left as it is.

    The shard is a shallow copy (new modules, the replicated tensors shared until moved) whose attention,
    MLP, embedding and LM head hold only this rank's slices. A model on the meta device gets random values
    (normal, the config's ``initializer_range``; norms 1), drawn for this rank's slices only.
    """
    check_divisible(model.config, size)
    tensors = [*model.parameters(), *model.buffers()]
    # New Parameter objects over the same data: moving the shard must not move the caller's model.
    memo = {id(t): nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t for t in tensors}
    shard = copy.deepcopy(model, memo)
    meta = model.model.embed_tokens.weight.is_meta
    place = torch.device("meta") if meta else device  # meta slices stay shapes until _randomize draws them
    for layer in shard.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (_column(p, rank, size, place) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = _row(attn.o_proj, rank, size, place)
        mlp.gate_proj, mlp.up_proj = _column(mlp.gate_proj, rank, size, place), _column(mlp.up_proj, rank, size, place)
        mlp.down_proj = _row(mlp.down_proj, rank, size, place)
    embed, start = _rows(model.model.embed_tokens.weight, rank, size)
    shard.model.embed_tokens = VocabParallelEmbedding(embed.to(place, copy=True), start)
    shard.lm_head = ParallelLMHead(_rows(model.lm_head.weight, rank, size)[0].to(place, copy=True), model.config.vocab_size)
    return _randomize(shard, device, seed + rank) if meta else shard.to(device)


def _randomize(shard: Any, device: torch.device, seed: int) -> Any:
    """Random values for a meta shard: every tensor is allocated on ``device`` and drawn there (seconds for a 70B
    shard on a GPU); RoPE's frequencies are computed again, since the meta ones hold nothing."""
    shard = shard.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    std = float(getattr(shard.config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in shard.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
    with torch.device(device):
        shard.model.rotary_emb = type(shard.model.rotary_emb)(shard.config)
    return shard


@dataclasses.dataclass
class ShardedAdaKV(AdaKV):
    """AdaKV on a rank that holds some of each layer's KV heads: keeps the same tokens as AdaKV over all of them.

    AdaKV keeps the layer's ``total`` best scores over every head (flattened head by head; ties go to the
    earlier head and token). Rank r holds heads ``[r*h, (r+1)*h)``, so the flattened order is rank by rank.
    Only the ``total`` best scores of any rank can be among the layer's best, so each rank sends those
    (sorted) and nothing else; from all of them every rank finds the same threshold (the ``total``-th best
    score), keeps its scores above it, and of the scores equal to it takes what earlier ranks left over.
    """

    def keep_layer_top(self, scores: Tensor, total: Tensor) -> Tensor:
        total = total.clone()
        dist.all_reduce(total)  # the layer's budget: every rank's heads' budgets
        width = min(int(total.max()), scores.shape[-1])
        best = scores.topk(width, dim=-1).values  # (B, width), sorted
        gathered = [torch.empty_like(best) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, best)
        everyone = torch.stack(gathered)  # (ranks, B, width)
        flat = everyone.transpose(0, 1).flatten(1)
        threshold = flat.sort(-1, descending=True).values.gather(-1, (total - 1).clamp(min=0)[:, None])  # (B, 1)
        above = (everyone > threshold).sum(-1)  # (ranks, B): exact, fewer than ``total`` on any rank
        ties = (everyone == threshold).sum(-1)  # enough of each rank's ties to fill the budget
        wanted = total - above.sum(0)  # (B,) ties the layer keeps, earliest first
        before = ties.cumsum(0) - ties
        rank = dist.get_rank()
        quota = (wanted - before[rank]).clamp(min=0)
        equal = scores == threshold
        tie_order = equal.long().cumsum(-1) - 1
        keep = (scores > threshold) | (equal & (tie_order < quota[:, None]))
        return keep & (total > 0)[:, None]


def shard_policy(policy: Method) -> Method:
    """The policy a rank runs: AdaKV (alone or in a hybrid) becomes :class:`ShardedAdaKV`; the rest is per head."""
    if isinstance(policy, Chain):
        return Chain([shard_policy(p) for p in policy.parts])
    if type(policy) is AdaKV:
        return ShardedAdaKV(**{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)})
    return policy
