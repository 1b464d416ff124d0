"""Length-aware admission: reserve blocks for the output each running sequence is still expected to write.

The default admission (:mod:`kvslim.engine.scheduler`) keeps one block of headroom per running sequence.
When outputs run long, that fills the pool with sequences whose later growth cannot all fit: some decode
step finds no free block and preempts the newest sequence, whose prompt *and* output so far are prefilled
again later. With long outputs (thousands of tokens) each preemption throws away a lot of decoding.

:class:`LengthAwareAdmission` admits a sequence only if the free blocks cover its prefill and, for it and
every running sequence, the blocks still to come until its expected end. The expected output length is
``min(max_tokens, predicted)``, where ``predicted`` is a high quantile of the output lengths of the
requests this engine completed (:class:`OutputLengths`), so requests that stop early at EOS do not
reserve their whole ``max_tokens``. A sequence's growth is capped where its policy holds the cache
(:func:`block_cap`): a decode-time budget (R-KV, ``snapkv(decode_budget=...)``) or a sliding window
never holds more than its budget however long it writes, so such sequences reserve little.
"""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .compression import Compression
from .head_blocks import HeadBlockManager
from .sequence import Sequence


def block_cap(compression: Compression, n_prompt: int, block_size: int, appended: int = 0) -> int | None:
    """The most blocks a sequence of an ``n_prompt``-token prompt (and ``appended`` uncompressed suffix tokens after
    it) holds while decoding; None: it takes a block more every ``block_size`` tokens, however long it writes.

    A sliding window holds its budget's blocks, plus the one it is part way through and the sinks' block; a
    decode-time scorer holds its limit (``decode_budget``, else what the prefill kept, at least ``budget``) and
    grows by up to ``interval`` tokens between evictions.
    """
    def blocks(slots: int) -> int:
        return -(-slots // block_size)

    window = compression.start_window(n_prompt, appended)
    if window is not None:
        return blocks(window[1]) + 2
    method = compression.decoding
    if method is None:
        return None
    if method.decode_budget is not None:
        limit = method.decode_budget
    else:
        planned = max(method.planned_tokens(n_prompt, i, compression.num_layers) for i in range(compression.num_layers))
        limit = max(int(planned), method.budget or 0)
    return blocks(limit + appended + method.interval)


class OutputLengths:
    """A running ``quantile`` of the output lengths of the last ``window`` completed requests.

    Until ``min_samples`` requests have completed, it predicts nothing (admission then expects ``max_tokens``).
    """

    def __init__(self, quantile: float = 0.9, window: int = 256, min_samples: int = 8):
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile={quantile} must be in (0, 1], e.g. 0.9")
        self.quantile, self.min_samples = quantile, min_samples
        self.lengths: deque[int] = deque(maxlen=window)

    def observe(self, output_tokens: int) -> None:
        self.lengths.append(output_tokens)

    def predict(self) -> int | None:
        if len(self.lengths) < self.min_samples:
            return None
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]


class LengthAwareAdmission:
    """Blocks to hold back when admitting a sequence: every running sequence's expected remaining growth."""

    def __init__(self, blocks: "BlockManager | HeadBlockManager", compression: Compression,
                 lengths: OutputLengths | None = None):
        self.blocks, self.compression = blocks, compression
        self.lengths = lengths or OutputLengths()
        self._caps: dict[tuple[int, int], int | None] = {}  # block_cap by prompt and suffix: asked every step

    def cap(self, seq: Sequence) -> int | None:
        key = (seq.num_prompt_tokens - seq.suffix_tokens, seq.suffix_tokens)
        if key not in self._caps:
            self._caps[key] = block_cap(self.compression, key[0], self.blocks.block_size, key[1])
        return self._caps[key]

    def expected_output(self, seq: Sequence) -> int:
        """Output tokens ``seq`` is expected to write in all: ``min(max_tokens, predicted)``, and at least a block
        more than it has written (a sequence that outlived the prediction is not about to end)."""
        max_tokens = seq.params.max_tokens
        predicted = self.lengths.predict()
        if predicted is None:
            return max_tokens
        return min(max_tokens, max(predicted, len(seq.output_token_ids) + self.blocks.block_size))

    def future_blocks(self, seq: Sequence, held: int) -> int:
        """Blocks ``seq``, holding ``held`` now, still takes until its expected end. Counted from the blocks held,
        not the slots, so a sequence admitted but not yet prefilled counts its prompt (at most a block too many)."""
        remaining = max(0, self.expected_output(seq) - len(seq.output_token_ids))
        final = held + self.blocks.blocks_for(remaining)
        cap = self.cap(seq)
        return max(0, (final if cap is None else min(final, cap)) - held)

    def headroom(self, seq: Sequence, slots: int, running: list[Sequence]) -> int:
        """Slots to find free, beyond ``seq``'s ``slots`` after prefill, before admitting it. With nothing running
        it is admitted on its prefill alone: it fits the pool by itself (requests that cannot are refused when
        added), and waiting would not free anything."""
        if not running:
            return 0
        reserve = self._growth(seq, self.blocks.blocks_for(slots))
        reserve += sum(self._growth(s, self.blocks.held(s)) for s in running)
        return -(-reserve // self.blocks.heads) * self.blocks.block_size  # head-blocks: a slot takes one per head

    def _growth(self, seq: Sequence, held: int) -> int:
        """:meth:`future_blocks` of ``seq``, once for each completion it forks into: a prompt not yet prefilled
        (admitted, or about to be) becomes ``n`` sequences that grow apart."""
        return (1 if seq.output_token_ids else seq.params.n) * self.future_blocks(seq, held)

    def completed(self, seq: Sequence, reason: str) -> None:
        """Learn from a request that ended by itself (EOS, stop string or max_tokens); aborts say nothing."""
        if reason in ("stop", "length"):
            self.lengths.observe(len(seq.output_token_ids))
