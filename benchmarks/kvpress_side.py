"""kvpress's half of the kvslim/kvpress comparison (:mod:`kvpress_compare` runs the other half and compares).

Runs inside kvpress's own environment (kvpress 0.5.x pins transformers < 5.3, kvslim needs >= 5.17, so
the two never share one): it imports kvpress and transformers, never kvslim. It reads the plan and the
samples the orchestrator wrote, feeds every sample's token ids through every press under both protocols,
and writes one JSON line per (sample, method, protocol) to ``kvpress.jsonl``:

* *query-agnostic*: exactly what ``KVPressTextGenerationPipeline._forward`` does (the context prefilled
  through ``model.model`` inside ``with press(model)``, then the question fed uncompressed at positions
  continuing the context, then greedy decoding), written out here so that prefill and decode are timed
  apart and the stop tokens are the orchestrator's;
* *query-aware*: ``with press(model)`` around the prefill of context + question (what ``model.generate``
  inside the press does), then the same greedy decoding.

The record format and the kept-set matching below import only torch, so the orchestrator (kvslim's
environment) reads and writes the same format through this module. ``--site DIR`` puts wheels installed
with ``pip install --target DIR`` (transformers 5.2, kvpress, their pure-Python dependencies) ahead of the
interpreter's own packages: the offline GPU machine runs kvpress that way next to its newer transformers.

    /work/venv-kvpress/bin/python benchmarks/kvpress_side.py RUN_DIR
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PLAN = "plan.json"
SAMPLES = "samples.jsonl"
ENVIRONMENT = "kvpress_env.json"  # the versions the kvpress side ran with
QUERY_AWARE = "query-aware"
QUERY_AGNOSTIC = "query-agnostic"
MATCH_TOLERANCE = 0.05
"""Largest relative L2 distance between a held key and the full prefill's key it is taken for: bfloat16 runs
drift by about 1e-2 (the two sides' attention kernels round differently upstream); a key with half its
channels pruned (ThinK) is about 0.7 away."""


# -- the shared format (torch only) ------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def compressed_ids(sample: dict[str, Any], protocol: str) -> list[int]:
    """The ids the press compresses: the context alone (query-agnostic) or context + question (query-aware)."""
    if protocol == QUERY_AGNOSTIC:
        return list(sample["context_ids"])
    if protocol == QUERY_AWARE:
        return list(sample["context_ids"]) + list(sample["question_ids"])
    raise ValueError(f"unknown protocol {protocol!r}: use {QUERY_AWARE} or {QUERY_AGNOSTIC}")


def kept_positions(full: list[torch.Tensor], held: list[list[torch.Tensor]], masked: list[torch.Tensor | None]
                   ) -> tuple[list[list[list[int]]], int]:
    """Which prompt positions each (layer, KV head) holds after compression, read off the cache itself.

    ``full[l]`` (H,T,D): the layer's keys after an uncompressed prefill of the same ids; ``held[l][h]`` (n,D):
    what the compressed cache holds for head ``h`` (heads may hold different counts); ``masked[l]`` (H,T) True where a press that masks instead of pruning
    (AdaKV, KVzip) hides a held key, or None. Keys of one sequence differ at every position (RoPE), so each
    held key is the full key nearest to it. Returns the sorted positions per layer and head, and how many
    held keys matched no full key within :data:`MATCH_TOLERANCE` (a channel-pruning method such as ThinK
    changes the keys themselves).
    """
    out, unmatched = [], 0
    for layer, (f, h) in enumerate(zip(full, held)):
        heads = []
        for head in range(f.shape[0]):
            keys, found = f[head].float(), h[head].float().to(f.device)
            distance, position = torch.cdist(found, keys).min(-1)
            ok = distance <= MATCH_TOLERANCE * found.norm(dim=-1).clamp(min=1e-12)
            unmatched += int((~ok).sum())
            chosen = set(position[ok].tolist())
            if masked[layer] is not None:
                chosen -= set(masked[layer][head].nonzero().flatten().tolist())
            heads.append(sorted(chosen))
        out.append(heads)
    return out, unmatched


def load_peak_memory() -> Any:
    """kvslim's :class:`PeakMemory`, loaded from its file: it needs only torch and the standard library,
    and importing the ``kvslim`` package would pull in kvslim's transformers requirement."""
    path = Path(__file__).resolve().parents[1] / "src" / "kvslim" / "bench" / "memory.py"
    spec = importlib.util.spec_from_file_location("kvslim_bench_memory", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.PeakMemory


# -- kvpress ---------------------------------------------------------------------------------------------
def build_press(spec: dict[str, Any] | None, compression_ratio: float) -> Any:
    """A press from ``{"press": class name, "kwargs": {...}, "inner": spec, "ratio": bool}``; None is no press.

    ``inner`` is the press a wrapper takes first (AdaKV around SnapKV); ``ratio`` False leaves the
    compression ratio alone (ThinK prunes key channels by its own ``key_channel_compression_ratio``).
    """
    if spec is None:
        return None
    import kvpress

    cls = getattr(kvpress, spec["press"], None)
    if cls is None:
        raise ValueError(f"kvpress has no press {spec['press']!r}: check the press names in kvpress_compare.PAIRS")
    args = [build_press(spec["inner"], compression_ratio)] if spec.get("inner") else []
    press = cls(*args, **spec.get("kwargs", {}))
    if spec.get("ratio", True):
        press.compression_ratio = compression_ratio
    return press


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One model under kvpress: generation (timed) and kept-set capture (a separate prefill, not timed)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        from transformers import AutoModelForCausalLM

        self.plan = plan
        self.device = torch.device(plan["device"])
        self.model = AutoModelForCausalLM.from_pretrained(
            plan["model_dir"], dtype=getattr(torch, plan["dtype"]), attn_implementation="sdpa",
            local_files_only=True).to(self.device).eval()
        self.stops = set(plan["stop_ids"])
        self.memory = load_peak_memory()(self.device)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.device)

    def _prefill(self, press: Any, sample: dict[str, Any], protocol: str, cache: Any) -> torch.Tensor | None:
        """Compress inside the press; the query-agnostic prefill goes through ``model.model`` (no logits)
        as the pipeline's does, and returns None."""
        ids = self._ids(compressed_ids(sample, protocol))
        with press(self.model) if press is not None else contextlib.nullcontext():
            if protocol == QUERY_AGNOSTIC:
                self.model.model(input_ids=ids, past_key_values=cache)
                return None
            return self.model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[0, -1]

    @torch.inference_mode()
    def generate(self, press: Any, sample: dict[str, Any], protocol: str) -> dict[str, Any]:
        from transformers import DynamicCache

        cache = DynamicCache()
        self.memory.reset()
        start = time.perf_counter()
        logits = self._prefill(press, sample, protocol, cache)
        position = len(compressed_ids(sample, protocol))
        if logits is None:  # the pipeline's generate_answer: the question at positions after the context
            question = sample["question_ids"]
            positions = torch.arange(position, position + len(question), device=self.device)[None]
            logits = self.model(input_ids=self._ids(question), past_key_values=cache, position_ids=positions,
                                logits_to_keep=1).logits[0, -1]
            position += len(question)
        token = int(logits.argmax())
        _sync(self.device)
        prefill_s = time.perf_counter() - start
        out, decode_start = [token], time.perf_counter()
        while token not in self.stops and len(out) < sample["max_new_tokens"]:
            logits = self.model(input_ids=self._ids([token]), past_key_values=cache,
                                position_ids=torch.tensor([[position]], device=self.device)).logits[0, -1]
            position += 1
            token = int(logits.argmax())
            out.append(token)
        _sync(self.device)
        steps = len(out) - 1
        return {"output_ids": out, "prefill_s": prefill_s,
                "decode_s_per_token": (time.perf_counter() - decode_start) / steps if steps else 0.0,
                "peak_mem_bytes": self.memory.read(), "peak_mem_kind": self.memory.kind}

    @torch.inference_mode()
    def full_keys(self, sample: dict[str, Any], protocol: str) -> list[torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache()
        self.model.model(input_ids=self._ids(compressed_ids(sample, protocol)), past_key_values=cache)
        return [layer.keys[0] for layer in cache.layers]

    @torch.inference_mode()
    def kept(self, press: Any, sample: dict[str, Any], protocol: str, full: list[torch.Tensor]
             ) -> tuple[list[list[list[int]]], int]:
        from transformers import DynamicCache

        cache = DynamicCache()
        with press(self.model):
            self.model.model(input_ids=self._ids(compressed_ids(sample, protocol)), past_key_values=cache)
        masked = []
        for layer, f in zip(self.model.model.layers, full):
            hidden = getattr(layer.self_attn, "masked_key_indices", None)
            mask = None
            if hidden is not None:
                mask = torch.zeros(f.shape[:2], dtype=torch.bool, device=f.device)
                _, heads, positions = hidden
                mask[heads.to(f.device), positions.to(f.device)] = True
            masked.append(mask)
        return kept_positions(full, [list(layer.keys[0]) for layer in cache.layers], masked)


def run(out: Path) -> None:
    plan = json.loads((out / PLAN).read_text())
    samples = read_jsonl(out / SAMPLES)
    target = out / "kvpress.jsonl"
    target.write_text("")
    side = Side(plan)
    from importlib.metadata import version

    import transformers

    (out / ENVIRONMENT).write_text(json.dumps({"kvpress": version("kvpress"), "transformers": transformers.__version__,
                                               "torch": torch.__version__, "python": sys.executable}))
    for number, sample in enumerate(samples):
        capture = number in plan["kept_samples"]
        for protocol in plan["protocols"]:
            full = side.full_keys(sample, protocol) if capture else None
            for method in plan["methods"]:
                press = build_press(method["kvpress"], 1.0 - plan["keep"])
                record = {"side": "kvpress", "label": method["label"], "protocol": protocol,
                          "sample_id": sample["id"], **side.generate(press, sample, protocol)}
                if capture and press is not None:
                    record["kept"], record["unmatched_keys"] = side.kept(press, sample, protocol, full)
                append_jsonl(target, record)
                print(f"kvpress {sample['id']} {protocol} {method['label']}: {record['prefill_s']:.2f}s prefill",
                      flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the directory kvpress_compare.py wrote plan.json and samples.jsonl to")
    parser.add_argument("--site", type=Path, help="a pip --target directory holding transformers 5.2 and kvpress")
    args = parser.parse_args(argv)
    if args.site is not None:
        if not args.site.is_dir():
            raise SystemExit(f"--site {args.site} is not a directory: install the wheels with pip install --target DIR")
        sys.path.insert(0, str(args.site))
    run(args.run_dir)


if __name__ == "__main__":
    main()
