"""Run the (synchronous) engine on its own thread; the event loop only ever drops commands in its inbox.

The engine thread owns the engine: between steps it applies the queued commands (add a request, abort
one), it steps while any request is unfinished, and it hands each request's results to the asyncio queue
of the handler waiting for them. So the event loop never waits for a step (a long prefill holds nothing
it needs), ``/health`` and ``/metrics`` read the snapshot the thread publishes around every step, and
no lock is needed.

A step that raises fails only the requests it ran (their clients get a 500) and the loop goes on. If the
loop itself dies, :attr:`AsyncEngine.error` says why: ``/health`` answers 503, and so does every request
queued or sent after that.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import Any, Callable

from ..engine import LLMEngine, SamplingParams, StepFailed
from .errors import APIError

log = logging.getLogger("kvslim.server")


@dataclass
class Delta:
    """Text a completion gained (``index`` among the request's ``n`` completions)."""

    index: int
    text: str


@dataclass
class _Stream:
    """Where one request's results go: an asyncio queue, and the event loop that owns it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    deltas: bool  # streaming clients get text as it is produced; the others only the final output
    sent: dict[int, str] = field(default_factory=dict)  # completion index -> text already sent

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shut down): nobody waits for it
            pass

    def text(self, index: int, text: str, final: bool = False) -> None:
        """Send what ``text`` adds to what was sent; an incomplete UTF-8 character waits for its other bytes."""
        sent = self.sent.get(index, "")
        if (final or not text.endswith("\ufffd")) and len(text) > len(sent) and text.startswith(sent):
            self.sent[index] = text
            self.put(Delta(index, text[len(sent):]))


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.streams: dict[str, _Stream] = {}  # the engine thread's alone
        self.counts = {"generated_tokens": 0, "finished": 0, "aborted": 0, "failed": 0}
        #: why the engine loop stopped (None while it runs)
        self.error: str | None = None
        self.snapshot: dict[str, Any] = {}
        self._ids = count()
        self._publish()
        self.thread = threading.Thread(target=self._run, name="kvslim-engine", daemon=True)
        self.thread.start()

    # -- from the event loop: never blocks -----------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, deltas: bool) -> tuple[str, asyncio.Queue]:
        """Queue a checked request (see :meth:`LLMEngine.encode` and :meth:`LLMEngine.check`); its queue gets
        :class:`Delta` items (when ``deltas``), then its RequestOutput, or an APIError instead."""
        request_id = f"cmpl-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), deltas)
        self.inbox.put(partial(self._add, request_id, ids, params, stream))
        return request_id, stream.queue

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks before the next step (no-op once it finished)."""
        self.inbox.put(partial(self._abort, request_id))

    def metrics(self) -> dict[str, Any]:
        """The engine's counts after its last step, and the KV tier's counters and the latency percentiles now
        (kept under their own locks; no read waits for a step)."""
        tier = self.engine.tier
        return {**self.snapshot, "tier": None if tier is None else tier.stats.as_dict(),
                "latency": self.engine.latency.as_dict()}

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine thread after its current step."""
        self.inbox.put(None)
        self.thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._apply_commands():
                self._publish()  # what the commands changed (queued requests, blocks an abort freed)
                if self.engine.has_unfinished:
                    self._step()
        except Exception as err:
            log.exception("the engine loop stopped")
            self.error = f"the engine loop stopped: {type(err).__name__}: {err}"
            for stream in self.streams.values():
                stream.put(self.dead())
            self.streams.clear()
            for command in iter(self.inbox.get, None):  # answer every queued and later request with the 503
                command()

    def dead(self) -> APIError:
        """The answer to every request once the loop has stopped."""
        return APIError(503, f"{self.error}; restart the server", code="engine_stopped")

    def _apply_commands(self) -> bool:
        """Apply the queued commands, first waiting for one while no request is unfinished; False: stop."""
        wait = not self.engine.has_unfinished
        while True:
            try:
                command = self.inbox.get(block=wait)
            except queue.Empty:
                return True
            if command is None:
                return False
            command()
            wait = False

    def _add(self, request_id: str, ids: list[int], params: SamplingParams, stream: _Stream) -> None:
        if self.error is not None:
            return stream.put(self.dead())
        try:
            self.engine.add_request(ids, params, request_id)
        except ValueError as err:
            return stream.put(APIError(400, str(err)))
        self.streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        if self.streams.pop(request_id, None) is None:
            return
        self.engine.abort(request_id)
        self.engine.finished.pop(request_id, None)
        self.counts["aborted"] += 1

    def _step(self) -> None:
        try:
            updates = self.engine.step()
        except StepFailed as failure:
            cause = failure.__cause__
            log.error("%s", failure, exc_info=cause)
            error = APIError(500, f"the engine failed while running this request ({type(cause).__name__}: {cause}); "
                                  "other requests were not affected", code="engine_step_failed")
            failed = [self.streams.pop(r) for r in failure.request_ids if r in self.streams]
            self.counts["failed"] += len(failed)
            self._publish()  # before the answers: a client reading /metrics after its answer sees it counted
            for stream in failed:
                stream.put(error)
            return
        self.counts["generated_tokens"] += len(updates)
        for seq, _ in updates:
            stream = self.streams.get(seq.request_id)
            if stream is not None and stream.deltas and not seq.finished:
                siblings = self.engine.requests[seq.request_id]
                stream.text(siblings.index(seq), self.engine.detokenize(seq.output_token_ids))
        ours = [r for r in self.engine.finished if r in self.streams]
        done = [(self.engine.finished.pop(r), self.streams.pop(r)) for r in ours]
        self.counts["finished"] += len(done)
        self._publish()  # before the answers, as above
        for output, stream in done:
            if stream.deltas:
                for index, completion in enumerate(output.completions):
                    stream.text(index, completion.text, final=True)
            stream.put(output)

    def _publish(self) -> None:
        m = self.engine.scheduler.metrics()
        self.snapshot = {"waiting": m.waiting, "running": m.running, "blocks_used": m.blocks_used,
                         "blocks_free": m.blocks_free, "preemptions": m.preemptions, **self.counts}
