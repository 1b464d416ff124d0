"""The engine loop: add requests, step (prefill or batched decode; with chunked prefill, decode beside prompt chunks),
hand back tokens and finished requests, and record their latencies."""
from __future__ import annotations

import time
from itertools import count, pairwise
from typing import Any

import torch

from ..cache.tier import KVTier, open_tier
from ..methods import Method, policy as build_policy
from ..methods.kvzip import RepeatPrompt, repeat_prompt
from .admission import LengthAwareAdmission
from .block_manager import BlockManager, kv_budget, num_blocks_for
from .compression import Compression
from .head_blocks import HeadBlockManager
from .head_kv import HeadKV
from .kv_store import dense_block_bytes
from .latency import LatencyStats, percentiles
from .model_runner import ModelRunner
from .outputs import Completion, RequestOutput
from .parallel import ParallelRunner, RanksOutOfStep
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Metrics, Scheduler, Step
from .sequence import Sequence
from .tier_link import TierLink, check_policy


class StepFailed(RuntimeError):
    """An engine step raised: the requests it ran (``request_ids``) are dropped and their blocks freed, so the
    engine can go on with the others. ``__cause__`` is the original exception."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {type(cause).__name__}: {cause}")
        self.request_ids = request_ids


def _repeat_prompt(tokenizer: Any) -> RepeatPrompt:
    """KVzip's repeat instructions in the model's tokens; without a tokenizer the copy follows the prompt directly."""
    return RepeatPrompt() if tokenizer is None else repeat_prompt(tokenizer)


class LLMEngine:
    """Continuous batching over a paged KV pool, with a kvslim method compressing each prompt.

    ``kv_memory`` (GiB) fixes the pool; when None the pool takes ``kv_fraction`` of a GPU's free memory
    (on CPU: see :func:`~kvslim.engine.block_manager.kv_budget`). With a quantizer in the policy (``kivi4``, ``snapkv+int8``...) blocks hold codes, so the
    same memory holds more tokens; the residual ring's rows (see :mod:`kvslim.engine.kv_store`) come out of
    the same memory and cap ``max_num_seqs``. ``block_size`` defaults to 16 slots (KIVI: its key run, 32).
    A ``tokenizer`` (``encode``/``decode``/``eos_token_id``) is needed for text prompts, stop strings and
    output text; without one, prompts are token id lists.

    ``kv_tier`` (``"memory"``, ``"disk:PATH"``, ``"redis://HOST:PORT"`` or a :class:`~kvslim.cache.tier.KVTier`)
    puts a block tier below the pool (see :mod:`kvslim.engine.tier_link`): prompt blocks missing from device
    memory are loaded from it instead of recomputed, and computed ones are written to it in the background,
    so engines sharing a tier reuse each other's prefixes. It applies where prefix sharing does (no evictor).
    Call :meth:`close` to finish the tier's pending writes. On CUDA, decode steps replay CUDA graphs
    unless ``enforce_eager`` (see :class:`~kvslim.engine.model_runner.DecodeGraphs`).

    ``tensor_parallel_size`` N > 1 splits the model's heads and MLP over N processes
    (:mod:`kvslim.engine.parallel`), each with its own KV pool of ``kv_memory`` holding its KV heads;
    ``device`` says where they run (``cuda``: rank r on ``cuda:r``; ``cpu``: gloo), by default where the
    model is. :meth:`close` stops them. KV byte counts (``block_bytes``, a request's ``peak_kv_bytes``...)
    are then per device.

    ``chunked_prefill`` (vLLM's ``enable_chunked_prefill``) runs each step's decode tokens and prompt chunks
    together, up to ``max_num_batched_tokens`` tokens (default 2048), so a long prompt does not stall the
    sequences decoding beside it (see :mod:`kvslim.engine.scheduler`); greedy outputs are the same as without
    it. It is off by default: each step then prefills whole prompts (up to ``max_prefill_tokens``) or decodes.
    The decode part of a step still replays a CUDA graph; the chunks run eagerly after it.

    Fresh prompts prefilled in the same step share one forward (see :meth:`ModelRunner.prefill_batch`; the
    method must keep no state across a prompt's layers, which rules out KVzip, auto and ThinK; decode-time
    compression's states are split per prompt after it), which divides a prefill's host cost, its bound on a GPU,
    by the prompts sharing it.
    ``max_prefill_tokens`` (default 32768: eight 4k-token prompts) thus also bounds that forward's activations:
    the packed hidden states and MLP intermediates are those of one prompt of that many tokens, which the engine
    runs alone anyway when given one (and padded attention holds at most twice the tokens).

    ``length_aware`` admits a request only when the pool also holds the output every running sequence is still
    expected to write (see :mod:`kvslim.engine.admission`): fewer preemptions when outputs run long.

    ``head_blocks`` (on by default): a policy whose layers or KV heads keep different numbers of tokens (AdaKV, auto,
    PyramidKV, KVzip's request-wide budget) over model-dtype pages gets a block table per (layer, KV head)
    (:mod:`kvslim.engine.head_kv`), so each head holds the blocks of what it kept, not of the longest head. Then
    ``block_bytes``, block counts and ``peak_kv_blocks`` are per (layer, KV head) block (decode graphs read each
    head's own table). With tensor parallelism, a KV tier, decode-time compression or ``head_blocks=False`` such
    policies keep one table per sequence, every head padded to the longest.
    """

    def __init__(self, model: Any, tokenizer: Any = None, policy: "str | Method" = "full", kv_memory: float | None = None,
                 block_size: int | None = None, max_num_seqs: int = 256, max_prefill_tokens: int = 32768,
                 kv_fraction: float = 0.9, kv_tier: "str | KVTier | None" = None, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, device: "str | torch.device | None" = None,
                 chunked_prefill: bool = False, max_num_batched_tokens: int | None = None, length_aware: bool = False,
                 head_blocks: bool = True):
        if max_num_batched_tokens is not None and not chunked_prefill:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} is the token budget of a chunked-prefill "
                             "step: pass chunked_prefill=True too (without it a step prefills whole prompts)")
        if chunked_prefill and tensor_parallel_size > 1:
            raise ValueError("chunked_prefill keeps each prompt's chunk state in one process: use it with "
                             "tensor_parallel_size=1")
        self.runner = self._runner(model, enforce_eager, tensor_parallel_size, device, kv_tier)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.tokenizer = tokenizer
        self.policy = build_policy(policy)
        self.compression = Compression(self.policy, self.runner.num_layers, self.runner.scaling, self.runner.inv_freq,
                                       _repeat_prompt(tokenizer) if self.policy.probes else None)
        if isinstance(self.runner, ParallelRunner) and (self.policy.probes or self.compression.decoding is not None
                                                        or self.compression.whole_request
                                                        or self.compression.thin is not None):
            self.runner.shutdown()
            raise ValueError(f"{self.policy.spec} under tensor parallelism: KVzip's probes, decode-time compression, "
                             "auto's budgets (weighed over all KV heads) and ThinK's thin key pages run in one process "
                             "only; use tensor_parallel_size=1 or another method")
        self.runner.set_format(self.compression.storage)
        if self.compression.decoding is not None:  # decode-time compression scores from each step's queries
            self.runner.keep_queries = True
        kv = self.runner.kv
        block_size = block_size or kv.default_block_size()
        #: per-(layer, KV head) blocks (:mod:`kvslim.engine.head_kv`): for per-head or per-layer budgets over
        #: model-dtype pages, where one block table per sequence would pad every head to the longest
        self.head_blocks = head_blocks and self._head_layout(tensor_parallel_size, kv_tier)
        budget = kv_budget(kv_memory, self.runner.device, kv_fraction)
        if self.head_blocks:
            kv = self.runner.kv = HeadKV(self.runner.num_layers, self.runner.num_kv_heads, self.runner.head_dim,
                                         self.runner.dtype, self.runner.device, block_size, self.runner.max_model_len,
                                         budget)
        self.block_bytes = kv.block_bytes(block_size)
        self.host_block_bytes = kv.host_block_bytes(block_size)  # what offloading stores keep in host memory
        #: what the same block would take in the model dtype (a full cache's bytes, for the stats)
        self.dense_block_bytes = self.block_bytes if self.head_blocks else dense_block_bytes(
            self.runner.num_layers, self.runner.num_kv_heads, self.runner.head_dim, self.runner.dtype, block_size)
        rows = kv.rows_for(budget, max_num_seqs)
        num_blocks = num_blocks_for(self.block_bytes, budget - rows * kv.row_bytes)
        self.runner.allocate(num_blocks, block_size, rows)
        self.blocks = (HeadBlockManager(num_blocks, block_size, rows, kv.tables) if isinstance(kv, HeadKV)
                       else BlockManager(num_blocks, block_size, rows))
        admission = LengthAwareAdmission(self.blocks, self.compression) if length_aware else None
        self.scheduler = Scheduler(self.blocks, self.compression, min(max_num_seqs, rows or max_num_seqs),
                                   max_prefill_tokens, self.runner.max_model_len, kv.grows,
                                   token_budget=(2048 if max_num_batched_tokens is None else max_num_batched_tokens)
                                   if chunked_prefill else None,
                                   chunkable=self.compression.chunkable, admission=admission)
        self.latency = LatencyStats()
        self.requests: dict[str, list[Sequence]] = {}
        self.finished: dict[str, RequestOutput] = {}
        self.eos = self._eos_ids(model, tokenizer)
        self._ids = count()
        if kv_tier is not None:
            check_policy(self.compression)
        self.tier = open_tier(kv_tier) if isinstance(kv_tier, str) else kv_tier
        self.tier_link = None if self.tier is None else TierLink(self.tier, self.blocks, kv, model, self.policy.spec)
        #: whether the last step ran a prefill (with chunked prefill, perhaps beside decodes): benchmarks time
        #: prefill and decode apart
        self.last_step_prefill = False

    def _head_layout(self, tensor_parallel_size: int, kv_tier: Any) -> bool:
        """Whether the policy's (layer, KV head)s keep different numbers of tokens in model-dtype pages, and nothing
        that needs one block table per sequence is asked for (tensor parallelism, a KV tier, decode-time
        compression, a sliding window): those keep the dense layout."""
        c = self.compression
        return (c.uneven and c.storage is None and c.decoding is None and c.window is None and tensor_parallel_size == 1
                and kv_tier is None)

    @staticmethod
    def _runner(model: Any, enforce_eager: bool, tensor_parallel_size: int, device: "str | torch.device | None",
                kv_tier: Any) -> "ModelRunner | ParallelRunner":
        if tensor_parallel_size == 1:
            asked = None if device is None else torch.device(device)
            if asked is not None and (asked.type, asked.index or model.device.index) != (model.device.type, model.device.index):
                raise ValueError(f"device={device}: a one-process engine runs where the model is ({model.device}); "
                                 "move the model there or leave device out")
            return ModelRunner.from_hf(model, enforce_eager)
        if kv_tier is not None:
            raise ValueError("kv_tier: a KV tier stores whole blocks of one process; use it with tensor_parallel_size=1")
        return ParallelRunner(model.eval(), tensor_parallel_size, device or model.device, enforce_eager)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    # -- requests -----------------------------------------------------------------------------------
    def encode(self, prompt: "str | list[int]") -> list[int]:
        """A prompt's token ids; raises ValueError for an empty prompt or an id outside the vocabulary (the
        embedding lookup would raise inside a step, and take the whole batch with it)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer=..., or give token id lists")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token {ids[bad]} (position {bad}) is not in the model's vocabulary: "
                             f"token ids are 0..{self.vocab_size - 1}")
        return ids

    def check(self, num_prompt_tokens: int, params: SamplingParams, suffix_tokens: int = 0) -> None:
        """Raise RequestTooLarge (a ValueError) if such a request (the last ``suffix_tokens`` of its prompt a suffix)
        could never run; reads no mutable state, so a server may call it from any thread before queuing the request."""
        if params.n > 1 and self.compression.decoding is not None:
            raise ValueError(f"n={params.n}: {self.policy.spec} compacts a sequence's blocks while decoding, which "
                             "completions sharing the prompt's blocks cannot; send n=1 requests")
        self.scheduler.check(num_prompt_tokens, params.max_tokens, params.n, suffix_tokens)

    def encode_suffix(self, suffix: "str | list[int]") -> list[int]:
        """A suffix's token ids (text without the tokenizer's special tokens: it continues a prompt); raises
        ValueError where the policy cannot keep a suffix apart from what it compresses."""
        if self.compression.storage is not None:
            raise ValueError(f"suffix: {self.policy.spec} stores pages in {self.compression.storage.name}'s format; a "
                             "suffix is appended uncompressed over model-dtype pages only: use an eviction method alone "
                             "here, or kvslim.Cache.appended() for the hybrid")
        if isinstance(self.runner, ParallelRunner):
            raise ValueError("suffix: requests with a suffix run in one process only; use tensor_parallel_size=1")
        if isinstance(suffix, str) and self.tokenizer is not None:
            suffix = list(self.tokenizer.encode(suffix, add_special_tokens=False))
        return self.encode(suffix)

    def add_request(self, prompt: "str | list[int]", params: SamplingParams, request_id: str | None = None,
                    suffix: "str | list[int] | None" = None) -> str:
        """Queue a request; raises ValueError for a bad prompt and RequestTooLarge (a ValueError) if it could
        never fit.

        ``suffix``: tokens after the prompt that the policy does not compress: the prompt is prefilled and
        compressed alone, then the suffix is prefilled uncompressed after what was kept, attending to it, and the
        answer follows (the query-agnostic protocol: a context compressed once, a question read from it; what
        ``kvslim.generate_ids(suffix_ids=...)`` does through ``kvslim.Cache.appended``). Without an evictor (the
        full cache) that is the same computation as one prompt, and it runs as one.
        """
        ids = self.encode(prompt)
        suffix_ids = [] if suffix is None else self.encode_suffix(suffix)
        kept_apart = len(suffix_ids) if self.compression.evict is not None else 0
        ids += suffix_ids
        self.check(len(ids), params, kept_apart)
        request_id = request_id or f"req-{next(self._ids)}"
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(ids, params, request_id, generator=generator, suffix_tokens=kept_apart)
        self.scheduler.add(seq)
        self.requests[request_id] = [seq]
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (a client went away)."""
        for seq in self.requests.get(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        self._collect(request_id)

    @property
    def has_unfinished(self) -> bool:
        return not self.scheduler.idle

    def metrics(self) -> Metrics:
        metrics = self.scheduler.metrics()
        metrics.tier = None if self.tier is None else self.tier.stats.as_dict()
        metrics.latency = self.latency.as_dict()
        return metrics

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (between requests): a benchmark that runs the same prompts again
        measures them computed, not found."""
        self.blocks.reset_prefix_cache()

    def capture_graphs(self) -> None:
        """Capture every decode CUDA graph the engine can replay now, instead of on the first step of each batch
        size: a benchmark keeps capture time out of what it times. Nothing to do without graphs (CPU, eager)."""
        runner = self.runner
        if isinstance(runner, ModelRunner) and runner.graphs is not None and not runner.enforce_eager:
            runner.graphs.capture(self.scheduler.max_num_seqs)

    def close(self) -> None:
        """Finish the KV tier's queued writes and release it; stop tensor-parallel workers."""
        if self.tier is not None:
            self.tier.close()
        if isinstance(self.runner, ParallelRunner):
            self.runner.shutdown()

    # -- one step -----------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, int]]:
        """Run one step (prefills, a decode step, or with chunked prefill both); returns (sequence, new token) for
        every token produced (a prompt chunk that is not its prompt's last produces none).

        If the step raises, the requests it ran are dropped (blocks freed) and :class:`StepFailed` names
        them; the engine stays usable for every other request. Only :class:`RanksOutOfStep` (tensor-parallel
        ranks left apart by an earlier failure) passes through as it is: nothing can run after it.
        """
        step = self.scheduler.schedule()
        if not step.decode and not step.prefill:
            return []
        self.last_step_prefill = bool(step.prefill)
        try:
            return self._run(step)
        except RanksOutOfStep:
            raise
        except Exception as err:
            for seq, _ in step.prefill:  # blocks registered for this step's prefills may hold no keys
                self.blocks.forget(seq, seq.num_prefilled)
            seqs = step.decode + [seq for seq, _ in step.prefill]
            raise StepFailed(self._drop({seq.request_id for seq in seqs}), err) from err

    def _run(self, step: Step) -> list[tuple[Sequence, int]]:
        seqs: list[Sequence] = []
        rows: list[torch.Tensor] = []
        if step.decode:
            self.runner.copy_blocks(step.copies)
            logits = self.runner.decode(self.runner.prepare_decode(step.decode))
            for seq in step.decode:
                self.runner.kv.advance(seq)
                self._slide(seq)
            self._evict_decoded(step.decode)
            seqs, rows = list(step.decode), list(logits)
        rows_of = self._prefill_batch([seq for seq, tokens in step.prefill if self._batchable(seq, tokens)])
        done, last = [], []
        for seq, tokens in step.prefill:
            row = rows_of[seq] if seq in rows_of else self._prefill(seq, tokens)
            if row is not None:
                done.append(seq)
                last.append(row)
        if done:
            forked, logits = self._fork(done, torch.stack(last))
            seqs, rows = seqs + forked, rows + list(logits)
        if not seqs:
            return []
        logits = torch.stack(rows)
        tokens = sample(logits, seqs)
        for seq, token in zip(seqs, tokens):
            self._append(seq, token)
        return list(zip(seqs, tokens))

    def _drop(self, request_ids: set[str]) -> list[str]:
        """Finish every sequence of these requests as failed, freeing their blocks; returns the requests dropped
        (a request that finished earlier in the failed step stays in ``finished``)."""
        dropped = []
        for request_id in sorted(request_ids):
            seqs = self.requests.pop(request_id, None)
            if seqs is None:
                continue
            for seq in seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "error")
            dropped.append(request_id)
        return dropped

    def _batchable(self, seq: Sequence, tokens: int) -> bool:
        """Whether this step's prefill of ``seq`` may share a forward with others (``ModelRunner.prefill_batch``): its
        whole prompt from token 0 (nothing cached, not split into chunks), in one process, with a method that keeps
        no state across a prompt's layers, and no KV tier (which may give it a prefix when it starts)."""
        return (isinstance(self.runner, ModelRunner) and self.tier_link is None and self.compression.batchable
                and not seq.num_prefilled and not seq.num_cached_tokens and tokens >= seq.prefill_len)

    def _prefill_batch(self, seqs: list[Sequence]) -> dict[Sequence, torch.Tensor]:
        """Prefill whole fresh prompts in one forward; each one's last token's logits. Run before the step's other
        prefills: they may read these prompts' blocks (a prefix shared in the same step), never the reverse, since
        these read nothing cached."""
        if len(seqs) < 2:
            return {}
        compress = self.compression if self.compression.acts else None
        logits, held, tails = self.runner.prefill_batch(seqs, compress)  # type: ignore[union-attr]
        states: list[list[dict] | None] = [None] * len(seqs)
        if self.compression.decoding is not None:
            states = self.compression.take_packed_states([len(seq) - seq.compressed_len for seq in seqs])
        for i, seq in enumerate(seqs):
            seq.tail = None if tails is None else tails[i]
            seq.num_prefilled = seq.prefill_len
            self._prefilled(seq, held[i], states[i])
        return dict(zip(seqs, logits))

    def _prefill(self, seq: Sequence, tokens: int) -> torch.Tensor | None:
        """Run up to ``tokens`` more of the sequence's prompt; its last token's logits once the whole prompt has run,
        else None (a chunk: its keys and values wait in the pages for the next one)."""
        if not seq.num_prefilled:  # its first chunk
            if self.tier_link is not None:
                seq.num_tier_tokens = self.tier_link.load(seq, self.compression.shareable(len(seq)))
                self.blocks.register(seq, seq.num_cached_tokens)  # what the tier wrote
            seq.num_prefilled = min(seq.num_cached_tokens, len(seq) - 1)
        start, end = seq.num_prefilled, min(seq.prefill_len, seq.num_prefilled + tokens)
        compress = self.compression if self.compression.acts else None
        logits, held, seq.tail = self.runner.prefill(seq, compress, start, end)
        seq.num_prefilled = end
        if end < seq.prefill_len:
            return None
        self._prefilled(seq, held)
        return logits

    def _prefilled(self, seq: Sequence, held: torch.Tensor, states: list[dict] | None = None) -> None:
        """A prompt's prefill has ended with ``held`` (L, H) page slots: size its blocks, start what decodes after.
        ``states``: its decode-time method states per layer when it was prefilled in a batch (else the last
        prefill's, :meth:`Compression.take_states`)."""
        seq.prefill_queries = None
        if self.tier_link is not None:
            self.tier_link.save(seq)
        seq.set_held(held)
        self.blocks.trim(seq, seq.kv_slots)
        if self.compression.thin is not None:
            self.runner.kv.set_channels(seq, self.compression.take_channels())  # type: ignore[union-attr]
        appended = len(seq) - seq.compressed_len
        if self.compression.decoding is not None:
            if states is None:
                states = self.compression.take_states(appended)
            seq.method_state = self.compression.decode_eviction.start(states)  # type: ignore[union-attr]
        window = self.compression.start_window(seq.compressed_len, appended)
        if window is not None:
            seq.sinks, seq.window_budget = window
            seq.window_start = seq.sinks

    def _fork(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Add the other n-1 completions of freshly prefilled requests; they share the prompt's blocks."""
        out, rows = [], []
        for seq, row in zip(seqs, logits):
            siblings = self.requests[seq.request_id]
            extra = seq.params.n - len(siblings) if not seq.output_token_ids else 0
            for k in range(extra):
                child = seq.fork()
                if seq.params.seed is not None:
                    child.generator = torch.Generator().manual_seed(seq.params.seed + k + 1)
                self.scheduler.running.append(child)  # first, so a failure below still frees what it took
                siblings.append(child)
                ring_row = self.blocks.fork(seq, child)
                if ring_row is not None:
                    self.runner.kv.copy_row(seq.ring_row, ring_row)  # type: ignore[union-attr]
                out.append(child)
                rows.append(row)
            out.append(seq)
            rows.append(row)
        return out, torch.stack(rows)

    def _evict_decoded(self, seqs: list[Sequence]) -> None:
        """Decode-time compression: give the method this step's queries; on a step that evicts, the kept tokens are
        written back left-aligned and the blocks past them freed (see :mod:`kvslim.engine.decode_eviction`)."""
        evictor = self.compression.decode_eviction
        if evictor is None:
            return
        for seq in evictor.step(seqs, self.runner.step_queries, self.runner):  # type: ignore[arg-type]
            self.blocks.trim(seq, seq.kv_slots)

    def _slide(self, seq: Sequence) -> None:
        """StreamingLLM: keep sinks + the newest ``window_budget - sinks`` slots; hand back passed blocks."""
        if seq.window_budget is None:
            return
        if seq.sinks + seq.kv_slots - seq.window_start > seq.window_budget:
            seq.window_start += 1
            passed = seq.window_start // self.blocks.block_size - 1
            if passed >= 0 and passed * self.blocks.block_size >= seq.sinks:
                self.blocks.drop(seq, passed)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        now = time.perf_counter()
        seq.token_times.append(now)
        seq.first_token_time = seq.first_token_time or now
        params, produced = seq.params, len(seq.output_token_ids)
        reason = None
        if params.stop and self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_token_ids)
            cut = min((i for i in (seq.text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text, reason = seq.text[:cut], "stop"
        if reason is None and (token in self.eos or token in params.stop_token_ids) and not params.ignore_eos:
            reason = "stop"
        if reason is None and produced >= params.max_tokens:
            reason = "length"
        if reason is not None:
            seq.finish_time = now
            self.scheduler.finish(seq, reason)
            self._collect(seq.request_id)

    def _collect(self, request_id: str) -> None:
        """Move a request whose completions are all done into ``finished``."""
        seqs = self.requests.get(request_id)
        if not seqs or not all(s.finished for s in seqs):
            return
        del self.requests[request_id]
        self.finished[request_id] = self._output(request_id, seqs)
        self.latency.add(seqs[0].arrival, [s.token_times for s in seqs])

    def _output(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        completions = []
        for seq in seqs:
            ids = seq.output_token_ids
            if seq.finish_reason == "stop" and ids and (ids[-1] in self.eos or ids[-1] in seq.params.stop_token_ids):
                ids = ids[:-1]
            text = seq.text if seq.params.stop and seq.finish_reason == "stop" else self.detokenize(ids)
            completions.append(Completion(text, ids, seq.finish_reason or "abort"))
        first = seqs[0]
        end = max((s.finish_time or time.perf_counter()) for s in seqs)
        produced = sum(len(s.output_token_ids) for s in seqs)
        ttft = (first.first_token_time - first.arrival) if first.first_token_time else None
        per_token = [(s.finish_time - s.first_token_time) / (len(s.output_token_ids) - 1)
                     for s in seqs if s.finish_time and s.first_token_time and len(s.output_token_ids) > 1]
        gaps = [b - a for s in seqs for a, b in pairwise(s.token_times)]
        itl_p50, itl_p99 = percentiles(gaps)
        full_blocks = self.blocks.blocks_for(len(first))
        peak_bytes = max(s.peak_blocks for s in seqs) * self.block_bytes + self.runner.kv.row_bytes
        return RequestOutput(request_id, first.prompt_token_ids, completions, {
            "policy": self.policy.spec,
            "prompt_tokens": first.num_prompt_tokens,
            "cached_prompt_tokens": first.num_cached_tokens,
            "tier_prompt_tokens": first.num_tier_tokens,
            "completion_tokens": produced,
            "ttft_s": ttft,
            "latency_s": end - first.arrival,
            "tpot_s": sum(per_token) / len(per_token) if per_token else None,
            "itl_p50_s": itl_p50,
            "itl_p99_s": itl_p99,
            "preemptions": sum(s.preemptions for s in seqs),
            "peak_kv_blocks": max(s.peak_blocks for s in seqs),
            "peak_kv_bytes": peak_bytes,
            "peak_kv_host_bytes": max(s.peak_blocks for s in seqs) * self.host_block_bytes,
            "full_kv_bytes": full_blocks * self.dense_block_bytes,
        })

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
