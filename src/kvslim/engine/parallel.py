"""Tensor parallelism: one process per rank over torch.distributed; rank 0 schedules, every rank runs its shard.

Rank 0 is the engine's own process: its :class:`ParallelRunner` stands where a
:class:`~kvslim.engine.model_runner.ModelRunner` stands, so the scheduler, the block manager and the
sampler exist once, on rank 0. Ranks 1..N-1 are processes started here (``spawn``) that only execute:
for each runner call, rank 0 broadcasts the call's name and arguments (:meth:`ParallelRunner.call`)
and then every rank, rank 0 included, runs the same :class:`Rank` method on its shard
(:func:`~kvslim.engine.sharding.shard_model`) and its own KV pool, which holds only its KV heads.

What is broadcast: a prefill sends the sequence's token ids, cached-prefix length, block table and ring
row (:class:`SeqView`); a decode step sends every sequence's last token, length, block table, slot counts,
window and ring state as a few batch tensors (:class:`DecodeStep`), and before it the step's copy-on-write
block copies. Each rank cuts the per-head fields to its heads and builds its decode batch with the
runner's own ``prepare_decode``. After a
prefill the ranks all-gather the slots each of their heads kept, so rank 0 holds every head's count and
the block manager sizes blocks for the longest head, exactly as in one process.

Collectives inside the model (the all-reduces of :mod:`~kvslim.engine.sharding`) run on the default
group: NCCL on CUDA (rank r on ``cuda:r``), gloo on the CPU; the control messages go over a gloo group,
so on GPUs they never wait on the device. The model reaches the workers by pickling (CPU tensors
through shared memory, so a model loaded once on the host is shared, not copied); each rank then keeps
only its shard on its device.
"""
from __future__ import annotations

import gc
import socket
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from ..methods import Method
from ..methods.kcache import KCache
from ..methods.pqcache import PQCache
from .compression import Compression
from .kv_store import make_store
from .model_runner import ModelRunner
from .sequence import Sequence
from .sharding import check_divisible, shard_model, shard_policy

#: how long a worker waits for rank 0's next call: a server may sit idle for days, which must not end it
IDLE_TIMEOUT = timedelta(days=365)


class RanksOutOfStep(RuntimeError):
    """An earlier step failed on some ranks only: no later step can run, so the engine is broken for good
    (a server answers 503 instead of failing every later request one by one)."""


@dataclass
class SeqView:
    """What a rank's runner reads of a sequence (the fields of :class:`Sequence` that ``prefill`` and
    ``prepare_decode`` use): the token ids for a prefill, only the last one for a decode step (``length`` keeps the
    position); ``pad`` and ``tail`` (L, H) are per KV head, cut to a rank's heads by :meth:`heads`."""

    token_ids: list[int]
    length: int
    block_table: list[int]
    num_cached_tokens: int
    kv_slots: int
    pad: Tensor | None
    tail: Tensor | None
    window_start: int
    sinks: int
    ring_row: int
    compressed_len: int

    @classmethod
    def of(cls, seq: Sequence) -> "SeqView":
        """A sequence about to be prefilled."""
        return cls(list(seq.token_ids), len(seq), list(seq.block_table), seq.num_cached_tokens, seq.kv_slots, seq.pad,
                   seq.tail, seq.window_start, seq.sinks, seq.ring_row, seq.compressed_len)

    def heads(self, lo: int, hi: int) -> "SeqView":
        cut = lambda t: None if t is None else t[:, lo:hi]  # noqa: E731
        return replace(self, pad=cut(self.pad), tail=cut(self.tail))

    def __len__(self) -> int:
        return self.length

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    def slot_lens(self, num_layers: int, num_heads: int) -> Tensor:
        """(L, H) slots held per layer and KV head (as :meth:`Sequence.slot_lens`)."""
        lens = torch.full((num_layers, num_heads), self.kv_slots, dtype=torch.long)
        return lens if self.pad is None else lens - self.pad


@dataclass
class DecodeStep:
    """A decode step's batch as rank 0 broadcasts it: one tensor per field, (B, ...), not one object per sequence
    (pickling a small tensor per sequence cost about as much as a decode step at B=256)."""

    tokens: Tensor  # last token of each sequence
    lengths: Tensor
    tables: Tensor  # (B, M) block tables, -1 past ``widths``
    widths: Tensor
    kv_slots: Tensor
    window_start: Tensor
    sinks: Tensor
    ring_rows: Tensor
    pads: Tensor | None  # (B, L, H) int32, zeros for sequences whose heads hold equal counts; None when all do
    tails: Tensor | None  # (B, L, H) int32 ring tokens, for stores with a ring

    @classmethod
    def of(cls, seqs: list[Sequence]) -> "DecodeStep":
        widths = [len(s.block_table) for s in seqs]
        widest = max(widths)
        tables = torch.tensor([s.block_table + [-1] * (widest - len(s.block_table)) for s in seqs], dtype=torch.int32)
        ints = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        pads = None
        if any(s.pad is not None for s in seqs):
            zeros = torch.zeros_like(next(s.pad for s in seqs if s.pad is not None))
            pads = torch.stack([zeros if s.pad is None else s.pad for s in seqs]).int()
        tails = None if seqs[0].tail is None else torch.stack([s.tail for s in seqs]).int()  # type: ignore[misc]
        return cls(ints([s.last_token for s in seqs]), ints([len(s) for s in seqs]), tables, ints(widths),
                   ints([s.kv_slots for s in seqs]), ints([s.window_start for s in seqs]), ints([s.sinks for s in seqs]),
                   ints([s.ring_row for s in seqs]), pads, tails)

    def views(self, lo: int, hi: int) -> list[SeqView]:
        """Each sequence's view, per-head fields cut to KV heads [lo, hi)."""
        cut = lambda t, i: None if t is None else t[i, :, lo:hi].long()  # noqa: E731
        tables, widths = self.tables.tolist(), self.widths.tolist()
        columns = zip(self.tokens.tolist(), self.lengths.tolist(), self.kv_slots.tolist(), self.window_start.tolist(),
                      self.sinks.tolist(), self.ring_rows.tolist())
        return [SeqView([token], length, tables[i][: widths[i]], 0, slots, cut(self.pads, i), cut(self.tails, i), start,
                        sinks, row, length) for i, (token, length, slots, start, sinks, row) in enumerate(columns)]


class Rank:
    """One rank's shard of the model and its KV pool; every rank runs the same methods in the same order."""

    def __init__(self, model: Any, rank: int, size: int, device: torch.device, enforce_eager: bool):
        self.rank, self.size = rank, size
        self.runner = ModelRunner.from_hf(shard_model(model, rank, size, device), enforce_eager)
        heads = self.runner.num_kv_heads
        self.lo, self.hi = rank * heads, (rank + 1) * heads
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.hooks: dict[str, Compression] = {}

    def set_format(self, storage: Method | None) -> None:
        self.runner.set_format(storage)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        self.runner.allocate(num_blocks, block_size, rows)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.runner.copy_blocks(copies)

    def copy_row(self, src: int, dst: int) -> None:
        self.runner.kv.copy_row(src, dst)  # type: ignore[union-attr]

    def prefill(self, view: SeqView, policy: Method | None, start: int | None, end: int | None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Last-token logits (whole vocabulary on rank 0) and every rank's heads' slot and ring counts (L, H)."""
        hook = None if policy is None else self._hook(policy)
        logits, held, tail = self.runner.prefill(view.heads(self.lo, self.hi), hook, start, end)  # type: ignore[arg-type]
        return logits, self._gather_heads(held), None if tail is None else self._gather_heads(tail)

    def decode(self, step: DecodeStep) -> Tensor:
        return self.runner.decode(self.runner.prepare_decode(step.views(self.lo, self.hi)))  # type: ignore[arg-type]

    def _hook(self, policy: Method) -> Compression:
        """This rank's compression for ``policy`` (AdaKV sharded, see :func:`shard_policy`), built once per policy."""
        if policy.spec not in self.hooks:
            self.hooks[policy.spec] = Compression(shard_policy(policy), self.runner.num_layers, self.runner.scaling,
                                                  self.runner.inv_freq)
        return self.hooks[policy.spec]

    def _gather_heads(self, counts: Tensor) -> Tensor:
        """(L, h) counts of this rank's heads -> (L, H) of all heads, on every rank."""
        local = counts.to(self.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, 1).cpu()


def _init_group(rank: int, size: int, address: str, device: torch.device) -> Any:
    """Join the default group (NCCL on CUDA, else gloo) and make the gloo group the control messages travel on."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=address, rank=rank, world_size=size)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device(device_type, rank) if device_type == "cuda" else torch.device(device_type)


def _worker(rank: int, size: int, address: str, model: Any, device_type: str, enforce_eager: bool, threads: int) -> None:
    """Ranks 1..N-1: build the shard, then run whatever rank 0 broadcasts until it says ``exit``."""
    torch.set_num_threads(threads)
    device = _rank_device(device_type, rank)
    control = _init_group(rank, size, address, device)
    node = Rank(model, rank, size, device, enforce_eager)
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        name, args = message[0]
        if name == "exit":
            break
        getattr(node, name)(*args)
    dist.destroy_process_group()


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class ShardedKV:
    """The engine's view of a KV store split by heads: memory per device is one rank's (every rank's is the same),
    while a sequence's bookkeeping (which heads pack, how many slots they hold) is over all heads, as rank 0 keeps it."""

    def __init__(self, shard: Any, whole: Any, runner: "ParallelRunner"):
        self.shard, self.whole, self.runner = shard, whole, runner

    @property
    def row_bytes(self) -> int:
        return self.shard.row_bytes

    def block_bytes(self, block_size: int) -> int:
        return self.shard.block_bytes(block_size)

    def host_block_bytes(self, block_size: int) -> int:
        return self.shard.host_block_bytes(block_size)

    def default_block_size(self) -> int:
        return self.shard.default_block_size()

    def rows_for(self, budget: int, max_num_seqs: int) -> int:
        return self.shard.rows_for(budget, max_num_seqs)

    def grows(self, seq: Sequence) -> bool:
        return self.whole.grows(seq)

    def advance(self, seq: Sequence) -> None:
        self.whole.advance(seq)

    def copy_row(self, src: int, dst: int) -> None:
        self.runner.call("copy_row", src, dst)


class Workers:
    """Ranks 1..N-1 and the control group, apart from the runner so that a finalizer can stop them when an engine is
    dropped without ``close()`` (a finalizer must not hold the object it finalizes)."""

    def __init__(self, processes: list[Any]):
        self.processes = processes
        self.control: Any = None
        self.in_call = False  # a call is between its broadcast and its end

    def stop(self) -> None:
        """Ask the workers to exit, or, after a call that raised part-way (they may be inside a collective that will
        never complete), terminate them; then leave the process group."""
        if self.control is not None and not self.in_call:
            dist.broadcast_object_list([("exit", ())], src=0, group=self.control)
        else:
            for process in self.processes:
                process.terminate()
        for process in self.processes:
            process.join()
        if dist.is_initialized():
            dist.destroy_process_group()


class ParallelRunner:
    """Rank 0 of a tensor-parallel engine: the engine calls it as it calls a ModelRunner (see the module docstring).

    ``device``: ``cuda`` puts rank r on ``cuda:r`` (NCCL); ``cpu`` runs every rank on the CPU (gloo), each with
    an equal share of this process's intra-op threads (this process keeps one share too: ranks that each took
    every core would fight over them). One tensor-parallel engine per process at a time (it owns the default
    process group); :meth:`shutdown`, or collecting the runner, or the interpreter's exit stops the workers.
    """

    def __init__(self, model: Any, size: int, device: str | torch.device, enforce_eager: bool = False):
        check_divisible(model.config, size)
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, this machine has {torch.cuda.device_count()}")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"tensor parallelism runs on cuda or cpu, not {device.type!r}")
        if dist.is_initialized():
            gc.collect()  # an engine dropped without close() (one whose construction failed, say) stops when collected
        if dist.is_initialized():
            raise ValueError("a tensor-parallel engine is already running in this process: close() it first")
        address = _free_address()
        threads = max(1, torch.get_num_threads() // size)
        if device.type == "cpu":
            torch.set_num_threads(threads)
        context = mp.get_context("spawn")
        self.workers = Workers([context.Process(target=_worker, daemon=True,
                                                args=(r, size, address, model, device.type, enforce_eager, threads))
                                for r in range(1, size)])
        self.shutdown = weakref.finalize(self, self.workers.stop)  # also at exit; calling it again does nothing
        for process in self.workers.processes:
            process.start()
        here = _rank_device(device.type, 0)
        self.workers.control = _init_group(0, size, address, here)
        self.rank = Rank(model, 0, size, here, enforce_eager)
        local = self.rank.runner
        self.num_layers, self.num_kv_heads, self.head_dim = local.num_layers, local.num_kv_heads, local.head_dim
        self.total_kv_heads = local.num_kv_heads * size
        self.scaling, self.dtype, self.device, self.max_model_len = local.scaling, local.dtype, local.device, local.max_model_len
        self.inv_freq = local.inv_freq
        self.kv = self._sharded_kv(None)

    def call(self, name: str, *args: Any) -> Any:
        """Broadcast a :class:`Rank` method call to the workers and run it here too; this rank's result."""
        if self.workers.in_call:
            raise RanksOutOfStep("an earlier tensor-parallel step failed part-way, so the ranks are out of step: "
                               "close() this engine and start a new one")
        self.workers.in_call = True
        dist.broadcast_object_list([(name, args)], src=0, group=self.workers.control)
        result = getattr(self.rank, name)(*args)
        self.workers.in_call = False
        return result

    def set_format(self, storage: Method | None) -> None:
        if isinstance(storage, (KCache, PQCache)):
            raise ValueError(f"policy {storage.spec}: the tensor-parallel engine keeps pages in the model dtype or as "
                             "quantizer codes; the offloading stores (kcache, pqcache) run with tensor_parallel_size=1")
        self.call("set_format", storage)
        self.kv = self._sharded_kv(storage)

    def _sharded_kv(self, storage: Method | None) -> ShardedKV:
        """This rank's store for memory, an unallocated one over all heads for the sequences' bookkeeping."""
        whole = make_store(storage, self.num_layers, self.total_kv_heads, self.head_dim, self.dtype, self.device)
        return ShardedKV(self.rank.runner.kv, whole, self)

    def allocate(self, num_blocks: int, block_size: int, rows: int) -> None:
        self.call("allocate", num_blocks, block_size, rows)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self.call("copy_blocks", copies)

    def prefill(self, seq: Sequence, compress: Compression | None, start: int | None = None, end: int | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """As :meth:`ModelRunner.prefill` (whole prompts: chunked prefill runs in one process), with every rank's
        heads' counts (L, H)."""
        return self.call("prefill", SeqView.of(seq), None if compress is None else compress.policy, start, end)

    def prepare_decode(self, seqs: list[Sequence]) -> DecodeStep:
        return DecodeStep.of(seqs)

    def decode(self, step: DecodeStep) -> Tensor:
        return self.call("decode", step)
