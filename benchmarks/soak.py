"""Bounded soak of ``kvslim serve``: many clients, good and bad requests, a KV tier that crashes midway.

Starts a loopback ``redis-server`` (see :mod:`kvslim.bench.redis_server`) and ``kvslim serve`` on it as a
separate process, then runs ``--clients`` concurrent clients for ``--duration`` seconds. Each client loops
over requests drawn (seeded) from four classes:

* normal: a greedy completion, streamed or not, expected 200 with text;
* malformed: token ids outside the vocabulary, a NaN or tiny temperature, a 2**70 seed, an unknown model,
  broken JSON, a missing field, ``n`` past the cap, expected 400 or 404;
* cancelled: a stream closed after its first event, or a request given up after a short client timeout;
* oversized: a body over the server's limit (413), a prompt longer than the context in characters, or
  ``max_tokens`` past the context (400).

Redis is killed (SIGKILL) a third of the way through and restarted at half time. A separate prober
process times ``GET /health`` every 50 ms. At the end, once the engine is idle, ``/metrics`` must show no KV
block held (``blocks_leaked``); every request that was not cancelled on purpose must have been answered
(``lost``), with the status its class expects (``failed`` counts the others). Normal answers to the same
prompt are compared with the first one (``text_mismatches``: greedy decoding in different batches may
differ by float rounding, so this is reported, not required to be 0).

    python benchmarks/soak.py --model smollm2-135m --clients 200 --duration 150 \\
        --out benchmarks/results/soak_cpu_smollm2.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from kvslim.bench.redis_server import RedisServer, free_port
from kvslim.models import load_config

#: Prompts share a preamble of two full KV blocks and go on with one of 24 topics asked by one of 20 students:
#: new full blocks keep coming (written to the tier, or dropped while it is down) and evicted ones are looked up.
PREAMBLE = ("You are a patient teaching assistant for a course on large language model serving systems. Answer the "
            "student's question plainly, in one short sentence, without lists, code or follow-up questions.")
TOPICS = (
    ["a KV cache", "paged attention", "continuous batching", "a hash chain", "quantization", "Redis",
     "a load balancer", "the event loop", "a token", "SSE streaming", "prefix sharing", "a block table",
     "preemption", "a residual ring", "top-p sampling", "a stop string", "an OpenAI error body", "tokenization",
     "back-pressure", "a health check", "a prefill", "a decode step", "copy-on-write", "an eviction policy"])
PROMPTS = [f"{PREAMBLE} Student {s} asks question {i}: what is {topic}, and why does it matter to a server?"
           for s in range(20) for i, topic in enumerate(TOPICS)]
CLASSES = {"normal": 0.5, "malformed": 0.2, "cancelled": 0.2, "oversized": 0.1}
EXPECTED = {"normal": {200}, "malformed": {400, 404}, "oversized": {400, 413}}


def malformed(rng: random.Random, model: str) -> tuple[str, bytes]:
    prompt = rng.choice(PROMPTS)
    bodies: list[Any] = [
        {"model": model, "prompt": [-1, 5]},
        {"model": model, "prompt": [10**9]},
        {"model": model, "prompt": prompt, "temperature": 1e-40},
        {"model": model, "prompt": prompt, "seed": 2**70},
        {"model": "gpt-4o", "prompt": prompt},
        {"model": model, "prompt": prompt, "n": 10**6},
        {"model": model},
        {"model": model, "messages": [{"role": "user"}]},
    ]
    raw = ['{"prompt": "hi", "temperature": NaN}', '{"prompt": ']
    choice = rng.randrange(len(bodies) + len(raw))
    if choice >= len(bodies):
        return "/v1/completions", raw[choice - len(bodies)].encode()
    body = bodies[choice]
    return "/v1/chat/completions" if "messages" in body else "/v1/completions", json.dumps(body).encode()


def oversized(rng: random.Random, model: str, max_len: int) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return json.dumps({"model": model, "prompt": "x" * (8 * 32 * max_len + 1)}).encode()  # over the body limit
    if kind == 1:
        return json.dumps({"model": model, "prompt": "y " * (16 * max_len + 1)}).encode()  # refused before tokenizing
    return json.dumps({"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 10 * max_len}).encode()


class Soak:
    def __init__(self, url: str, model: str, max_len: int, max_tokens: int, seed: int):
        self.url, self.model, self.max_len, self.max_tokens, self.seed = url, model, max_len, max_tokens, seed
        self.sent: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)
        self.failures: list[str] = []
        self.texts: dict[str, str] = {}
        self.mismatches = 0
        self.latencies: list[float] = []  # seconds from sending a normal request to its answer

    def answered(self, kind: str, status: int, detail: str = "") -> None:
        self.statuses[kind][status] += 1
        if status in EXPECTED[kind]:
            self.ok[kind] += 1
        else:
            self.failed[kind] += 1
            self.failures.append(f"{kind}: {status} {detail[:200]}")

    def check_text(self, prompt: str, text: str) -> None:
        first = self.texts.setdefault(prompt, text)
        self.mismatches += first != text

    async def client(self, http: httpx.AsyncClient, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while time.monotonic() < deadline:
            kind = rng.choices(list(CLASSES), weights=list(CLASSES.values()))[0]
            self.sent[kind] += 1
            started = time.perf_counter()
            try:
                await self.request(http, rng, kind)
                if kind == "normal":
                    self.latencies.append(time.perf_counter() - started)
            except httpx.TimeoutException as err:
                self.lost[kind] += 1
                self.failures.append(f"{kind}: lost ({type(err).__name__})")
            except httpx.HTTPError as err:
                self.lost[kind] += 1
                self.failures.append(f"{kind}: lost ({type(err).__name__}: {err})")

    async def request(self, http: httpx.AsyncClient, rng: random.Random, kind: str) -> None:
        headers = {"content-type": "application/json"}
        if kind == "malformed":
            path, content = malformed(rng, self.model)
            reply = await http.post(path, content=content, headers=headers)
            return self.answered(kind, reply.status_code, reply.text)
        if kind == "oversized":
            content = oversized(rng, self.model, self.max_len)
            reply = await http.post("/v1/completions", content=content, headers=headers)
            return self.answered(kind, reply.status_code, reply.text)
        prompt = rng.choice(PROMPTS)
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens}
        if kind == "cancelled":
            if rng.random() < 0.5:
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
                    async for _ in reply.aiter_lines():
                        break  # the first event came: leave
            else:
                try:
                    await http.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 1.0))
                except httpx.TimeoutException:
                    pass
            self.cancelled[kind] += 1
            return None
        if rng.random() < 0.5:
            reply = await http.post("/v1/completions", json=body)
            if reply.status_code == 200:
                self.check_text(prompt, reply.json()["choices"][0]["text"])
            return self.answered(kind, reply.status_code, reply.text)
        pieces, status = [], 0
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
            status = reply.status_code
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # an error after the 200 went out
                        return self.answered(kind, 500, line)
                    pieces += [c.get("text", "") for c in chunk["choices"]]
        if status == 200:
            self.check_text(prompt, "".join(pieces))
        return self.answered(kind, status)


def probe_health(url: str, duration: float, out: Connection) -> None:
    """GET /health every 50 ms for ``duration`` seconds; sends back (seconds into the run, latency, error) per
    probe. It runs in a process of its own, so the 200 clients' event loop does not delay it."""
    probes = []
    begin = time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as http:
        while time.monotonic() - begin < duration:
            started, error = time.perf_counter(), ""
            try:
                reply = http.get("/health")
                if reply.status_code != 200:
                    error = f"{reply.status_code} {reply.text[:200]}"
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"
            probes.append((time.monotonic() - begin, time.perf_counter() - started, error))
            time.sleep(0.05)
    out.send(probes)


async def crash_tier(redis: RedisServer, kill_at: float, restart_at: float, events: dict[str, float]) -> None:
    start = time.monotonic()
    await asyncio.sleep(kill_at)
    redis.kill()
    events["tier_killed_at_s"] = round(time.monotonic() - start, 1)
    await asyncio.sleep(restart_at - kill_at)
    await asyncio.to_thread(redis.start)
    events["tier_restarted_at_s"] = round(time.monotonic() - start, 1)


def _percentiles(values: list[float], digits: int) -> dict[str, float]:
    ordered = sorted(values) or [float("nan")]
    quantiles = {"p50": 0.5, "p99": 0.99, "max": 1.0}
    return {name: round(ordered[int(q * (len(ordered) - 1))], digits) for name, q in quantiles.items()}


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if line and not line.startswith("#"))}


async def soak(args: argparse.Namespace, url: str, redis: RedisServer, max_len: int) -> dict[str, Any]:
    run = Soak(url, args.model, max_len, args.max_tokens, args.seed)
    deadline = time.monotonic() + args.duration
    receiver, sender = multiprocessing.Pipe(duplex=False)
    prober = multiprocessing.Process(target=probe_health, args=(url, args.duration, sender))
    prober.start()
    events: dict[str, float] = {}
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
        await asyncio.gather(
            *(run.client(http, i, deadline) for i in range(args.clients)),
            crash_tier(redis, args.duration / 3, args.duration / 2, events),
        )
    probes = receiver.recv()
    prober.join()
    latencies = [1000 * latency for _, latency, _ in probes]
    slowest = sorted(probes, key=lambda p: -p[1])[:5]
    health_errors = [error for _, _, error in probes if error]
    idle_deadline = time.monotonic() + 60
    while (m := metrics(url))["kvslim_requests_running"] + m["kvslim_requests_waiting"] > 0:
        if time.monotonic() > idle_deadline:
            break
        await asyncio.sleep(0.25)
    classes = {kind: {"sent": run.sent[kind], "answered_as_expected": run.ok[kind], "failed": run.failed[kind],
                      "cancelled": run.cancelled[kind], "lost": run.lost[kind],
                      "statuses": dict(sorted(run.statuses[kind].items()))} for kind in CLASSES}
    return {
        "classes": classes,
        "sent": sum(run.sent.values()),
        "lost": sum(run.lost.values()),
        "failed": sum(run.failed.values()),
        "blocks_leaked": int(m["kvslim_kv_blocks_used"]),
        "idle_at_end": m["kvslim_requests_running"] + m["kvslim_requests_waiting"] == 0,
        "text_mismatches": run.mismatches,
        "normal_latency_s": _percentiles(run.latencies, 1),
        "distinct_prompts_answered": len(run.texts),
        "health": {"probes": len(latencies), "errors": len(health_errors),
                   **{f"{k}_ms": v for k, v in _percentiles(latencies, 1).items()},
                   "slowest_ms_at_s": {f"{1000 * latency:.0f}": round(at, 1) for at, latency, _ in slowest}},
        **events,
        "server_metrics": m,
        "failure_samples": run.failures[:20] + health_errors[:5],
    }


def start_server(args: argparse.Namespace, port: int, tier: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from kvslim.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", "--model", args.model, "--policy", args.policy, "--device", "cpu",
               "--kv-memory", str(args.kv_memory), "--port", str(port), "--kv-tier", tier]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"kvslim serve exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"kvslim serve did not answer /health within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=150, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-memory", type=float, default=0.25, help="GiB for the server's KV pool")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a client waits for an answer before counting the request lost (on 2 shared "
                             "CPU cores 200 clients queue for minutes: waiting is not losing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="kvslim-soak-")) / "server.log"
    with RedisServer() as redis:
        server = start_server(args, port, redis.url, log)
        try:
            wait_healthy(url, server, log)
            started = time.monotonic()
            result = asyncio.run(soak(args, url, redis, load_config(args.model).max_position_embeddings))
            wall = time.monotonic() - started
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    report = {"benchmark": "soak", "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "model": args.model, "policy": args.policy, "device": "cpu", "kv_memory_gib": args.kv_memory,
              "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
              "max_tokens": args.max_tokens, "mix": CLASSES, **result,
              "server_log_tracebacks": log.read_text().count("Traceback")}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    ok = report["lost"] == 0 and report["blocks_leaked"] == 0 and report["failed"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
