"""Run the (synchronous) engine on a background thread and feed each request's tokens to asyncio.

The engine steps only while some request is unfinished; every step's new tokens go to the queue of
the request they belong to, through the event loop that asked for them. Aborting (a client that
went away) frees the request's blocks before the next step.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from ..engine import LLMEngine, RequestOutput, SamplingParams


@dataclass
class Delta:
    """Text a completion gained in one step (``index`` among the request's ``n`` completions)."""

    index: int
    text: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.sent: dict[int, str] = {}  # seq_id -> text already sent
        self.generated_tokens = 0
        self.finished_requests = 0
        self.thread = threading.Thread(target=self._run, name="kvslim-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: "str | list[int]", params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request; raises ValueError (e.g. RequestTooLarge) at once if it can never run."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            request_id = self.engine.add_request(prompt, params)
            self.streams[request_id] = (asyncio.get_running_loop(), queue)
        self.wake.set()
        return request_id, queue

    def abort(self, request_id: str) -> None:
        with self.lock:
            if self.streams.pop(request_id, None) is not None:
                self.engine.abort(request_id)
                self.engine.finished.pop(request_id, None)

    def metrics(self) -> dict[str, Any]:
        with self.lock:
            m = self.engine.metrics()
        return {"waiting": m.waiting, "running": m.running, "blocks_used": m.blocks_used, "blocks_free": m.blocks_free,
                "preemptions": m.preemptions, "generated_tokens": self.generated_tokens,
                "finished_requests": self.finished_requests, "tier": m.tier}

    def _run(self) -> None:
        while True:
            self.wake.wait()
            with self.lock:
                if not self.engine.has_unfinished:
                    self.wake.clear()
                    continue
                updates = self.engine.step()
                self.generated_tokens += len(updates)
                messages = [(seq.request_id, self._delta(seq)) for seq, _ in updates]
                done = [(rid, self.engine.finished.pop(rid)) for rid in list(self.engine.finished) if rid in self.streams]
            for request_id, delta in messages:
                self._send(request_id, delta)
            for request_id, output in done:
                self.finished_requests += 1
                self._send(request_id, output)
                with self.lock:
                    self.streams.pop(request_id, None)

    def _delta(self, seq: Any) -> Delta:
        siblings = self.engine.requests.get(seq.request_id, [seq])
        index = next((i for i, s in enumerate(siblings) if s is seq), 0)
        ids = seq.output_token_ids
        if ids and ids[-1] in self.engine.eos and not seq.params.ignore_eos:
            ids = ids[:-1]
        text = seq.text if seq.params.stop and seq.finish_reason == "stop" else self.engine.detokenize(ids)
        previous = self.sent.pop(seq.seq_id, "") if seq.finished else self.sent.get(seq.seq_id, "")
        if not seq.finished:
            self.sent[seq.seq_id] = text
        return Delta(index, text[len(previous):] if text.startswith(previous) else "")

    def _send(self, request_id: str, item: "Delta | RequestOutput") -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)
