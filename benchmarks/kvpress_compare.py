"""kvslim next to kvpress: the same model, RULER samples, keep ratio and protocols; per-sample agreement.

For every method both have, the same token ids go through kvslim (this process) and through kvpress
(:mod:`kvpress_side`, run by kvpress's own interpreter: kvpress 0.5.x pins transformers < 5.3, kvslim
needs >= 5.17). Both protocols: *query-agnostic* (kvpress's pipeline: the context compressed alone, the
question appended uncompressed; kvslim's :mod:`kvslim.bench.ruler.protocols`) and *query-aware* (context
and question compressed together: ``with press(model)`` around the prefill). Both outputs are decoded by
one tokenizer and scored by RULER's metric; for the first ``--kept-samples`` samples of each task both sides
also record which prompt positions each layer and KV head kept, so a disagreement can be traced to the
selection itself (:mod:`kvpress_agreement`). ``full`` on both sides is the control: what differs there
(transformers 5.2 against kvslim's attention path) is the noise floor.

Labels ending in ``@kvpress`` run kvslim's method with kvpress's defaults where they differ (SnapKV's
window/kernel/pooling, whether StreamingLLM and TOVA evict while decoding, which queries ExpectedAttention
averages), so each default difference is measured on its own.

Writes into ``--out``: ``plan.json`` and ``samples.jsonl`` (what both sides read), ``kvslim.jsonl`` and
``kvpress.jsonl`` (one record per method, protocol and sample), ``comparison.json`` (settings, the summary
per method and protocol, every paired sample) and ``report.md``.

    python benchmarks/kvpress_compare.py --model smollm2-135m --out benchmarks/results/kvpress_compare_cpu_smollm2
    # the two sides as two processes at once, then the comparison:
    python benchmarks/kvpress_compare.py ... --sides kvpress & python benchmarks/kvpress_compare.py ... --sides kvslim
    python benchmarks/kvpress_compare.py ... --sides none
    # offline machine, kvpress's wheels installed with pip install --target /tmp/kvpress-site:
    python benchmarks/kvpress_compare.py --site /tmp/kvpress-site --model qwen2.5-coder-0.5b --length 4096 ...
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kvpress_agreement as agreement
import torch
import transformers
from kvpress_side import (
    ENVIRONMENT,
    PLAN,
    QUERY_AGNOSTIC,
    QUERY_AWARE,
    SAMPLES,
    append_jsonl,
    compressed_ids,
    kept_positions,
    read_jsonl,
)
from transformers import DynamicCache

from kvslim.bench.memory import PeakMemory
from kvslim.bench.ruler import get_ruler_task
from kvslim.bench.ruler.execute import stop_ids
from kvslim.bench.ruler.prompt import Framing
from kvslim.bench.ruler.scoring import METRICS
from kvslim.generate import generate_ids
from kvslim.hf_compat import cache_arg
from kvslim.methods import policy
from kvslim.methods.kvzip import repeat_prompt
from kvslim.models import load_model
from kvslim.models.resolve import resolve

DEFAULT_VENV_PYTHON = "/work/venv-kvpress/bin/python"


@dataclass(frozen=True)
class Pair:
    """One method on both sides: kvslim's spec (``{keep}`` filled in) and kvpress's press (see
    :func:`kvpress_side.build_press`), and what differs between them by default."""

    kvslim: str
    kvpress: dict[str, Any] | None
    note: str = ""


def _press(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"press": name, "kwargs": kwargs}


PAIRS: dict[str, Pair] = {
    "full": Pair("full", None, "no compression on either side: the noise floor (transformers 5.2 vs kvslim's attention)"),
    "snapkv": Pair("snapkv(keep={keep})", _press("SnapKVPress"),
                   "kvslim window 32, kernel 7, max pooling after averaging the query group; kvpress window 64, "
                   "kernel 5, average pooling per query head, then the group mean"),
    "snapkv@kvpress": Pair("snapkv(keep={keep},window=64,kernel=5,pooling=avg)", _press("SnapKVPress"),
                           "kvslim with kvpress's window, kernel and pooling"),
    "streaming": Pair("streaming(keep={keep})", _press("StreamingLLMPress"),
                      "same selection; kvslim also evicts while decoding (holds the budget), kvpress only at prefill"),
    "streaming@kvpress": Pair("streaming(keep={keep},decode_budget=1000000)", _press("StreamingLLMPress"),
                              "kvslim without decode-time eviction"),
    "tova": Pair("tova(keep={keep})", _press("TOVAPress"),
                 "same score (last query's attention, mean over all heads); kvpress always keeps the last token and "
                 "never evicts while decoding, kvslim evicts every decoding step"),
    "tova@kvpress": Pair("tova(keep={keep},window=1,decode_budget=1000000)", _press("TOVAPress"),
                         "kvslim keeping the last token, without decode-time eviction"),
    "knorm": Pair("knorm(keep={keep})", _press("KnormPress"), "same score"),
    "expected_attention": Pair("expected_attention(keep={keep})", _press("ExpectedAttentionPress", epsilon=0.01),
                               "same score up to 4096 prompt queries; past that kvslim models the newest 4096, "
                               "kvpress every query after the 4 sinks"),
    "expected_attention@kvpress": Pair("expected_attention(keep={keep},history=None)",
                                       _press("ExpectedAttentionPress", epsilon=0.01), "kvslim modelling every query"),
    "pyramidkv": Pair("pyramidkv(keep={keep})", _press("PyramidKVPress"), "SnapKV's differences, per-layer budgets"),
    "pyramidkv@kvpress": Pair("pyramidkv(keep={keep},window=64,kernel=5,pooling=avg)", _press("PyramidKVPress"),
                              "kvslim with kvpress's SnapKV window, kernel and pooling"),
    "adakv": Pair("adakv(keep={keep})", {"press": "AdaKVPress", "inner": _press("SnapKVPress")},
                  "SnapKV's differences; kvslim stores ragged heads, kvpress masks the dropped keys"),
    "adakv@kvpress": Pair("adakv(keep={keep},window=64,kernel=5,pooling=avg)",
                          {"press": "AdaKVPress", "inner": _press("SnapKVPress")},
                          "kvslim with kvpress's SnapKV window, kernel and pooling"),
    "think": Pair("think(ratio=0.5)", {"press": "ThinKPress", "kwargs": {"key_channel_compression_ratio": 0.5},
                                       "ratio": False},
                  "prunes half the key channels (not tokens) on both sides, whatever --keep says"),
    "kvzip": Pair("kvzip(keep={keep})", _press("KVzipPress"),
                  "same algorithm (one budget over all layers and heads, 4 sinks, chunk-local softmax, chat-template "
                  "repeat prompt, 2048-token chunks); kvpress leaves the chat template's prefix out of the "
                  "reconstruction (its tokens past the 4 sinks score 0) and masks the dropped keys"),
    "keydiff": Pair("keydiff(keep={keep})", _press("KeyDiffPress"), "same score"),
    "lagkv": Pair("lagkv(keep={keep})", _press("LagKVPress"),
                  "kvpress replaces each chunk's scores by their ranks within the chunk (cross_scoring=False), so "
                  "every chunk keeps the same share; kvslim compares the softmaxed spreads across chunks"),
    "lagkv@kvslim": Pair("lagkv(keep={keep})", _press("LagKVPress", cross_scoring=True),
                         "kvpress comparing scores across chunks, as kvslim does"),
}
CPU_METHODS = "full,snapkv,snapkv@kvpress,streaming,streaming@kvpress,knorm,tova,tova@kvpress,expected_attention"
ALL_METHODS = ",".join(PAIRS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model kvslim resolves (its Hugging Face "
                        "directory is what kvpress loads)")
    parser.add_argument("--tasks", default="niah_single_1,niah_multikey_1,niah_multivalue,vt")
    parser.add_argument("--length", type=int, default=1024, help="RULER length (input + answer tokens)")
    parser.add_argument("--samples", type=int, default=3, help="samples per task")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction kept (kvpress compression_ratio = 1 - keep)")
    parser.add_argument("--methods", default=CPU_METHODS, help=f"labels among: {ALL_METHODS}")
    parser.add_argument("--protocols", default=f"{QUERY_AGNOSTIC},{QUERY_AWARE}")
    parser.add_argument("--kept-samples", type=int, default=1, help="samples per task whose kept positions are "
                        "captured (one extra prefill per method on each side, not timed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kvpress-python", default=DEFAULT_VENV_PYTHON,
                        help="the interpreter of kvpress's virtualenv (ignored with --site)")
    parser.add_argument("--site", type=Path, help="a pip --target directory with transformers 5.2 and kvpress: "
                        "kvpress then runs under this interpreter with that directory first on its path")
    parser.add_argument("--sides", choices=["both", "kvslim", "kvpress", "none"], default="both",
                        help="which sides to run before comparing: one side lets the two run as two processes at "
                        "once (the second reuses the first's plan.json and samples.jsonl); none pairs the records "
                        "already in --out (of an interrupted run, what both sides finished)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in PAIRS]
    if unknown or not args.method_list:
        parser.error(f"unknown method label(s) {unknown}: choose from {ALL_METHODS}")
    args.protocol_list = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.protocol_list or any(p not in (QUERY_AGNOSTIC, QUERY_AWARE) for p in args.protocol_list):
        parser.error(f"--protocols {args.protocols!r}: choose from {QUERY_AGNOSTIC},{QUERY_AWARE}")
    if not 0 < args.keep < 1:
        parser.error(f"--keep {args.keep}: give a fraction in (0, 1), e.g. 0.25")
    if args.site is not None and not args.site.is_dir():
        parser.error(f"--site {args.site} is not a directory: pip install --target DIR the wheels listed in "
                     "benchmarks/results/kvpress_compare_cpu_smollm2/README.md")
    return args


def write_inputs(args: argparse.Namespace, model_dir: Path, tokenizer: Any, stops: list[int]) -> list[dict[str, Any]]:
    """RULER samples as token ids (kvslim's framing: kvpress's pipeline splits the prompt at the same place)
    and the plan both sides follow."""
    framing = Framing(tokenizer, chat=bool(getattr(tokenizer, "chat_template", None)))
    samples, kept = [], []
    for name in args.tasks.split(","):
        task = get_ruler_task(name.strip())
        for i, s in enumerate(task.generate(args.samples, args.length, framing, args.seed)):
            if i < args.kept_samples:
                kept.append(len(samples))
            samples.append({"id": s.id, "task": s.task, "context_ids": s.context_ids, "question_ids": s.question_ids,
                            "answers": s.answers, "metric": task.metric, "max_new_tokens": task.tokens_to_generate})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / SAMPLES).write_text("".join(json.dumps(s) + "\n" for s in samples))
    plan = {"model_dir": str(model_dir), "device": args.device, "dtype": args.dtype, "keep": args.keep,
            "protocols": args.protocol_list, "stop_ids": stops, "kept_samples": kept,
            "methods": [{"label": m, "kvpress": PAIRS[m].kvpress} for m in args.method_list]}
    (args.out / PLAN).write_text(json.dumps(plan, indent=1))
    return samples


def run_kvpress(args: argparse.Namespace) -> None:
    side = Path(__file__).with_name("kvpress_side.py")
    command = [sys.executable, str(side), str(args.out), "--site", str(args.site)] if args.site else \
        [args.kvpress_python, str(side), str(args.out)]
    subprocess.run(command, check=True)


class KvslimSide:
    """The same samples through :func:`kvslim.generate.generate_ids`, the way the RULER suite runs them."""

    def __init__(self, args: argparse.Namespace, stops: list[int]) -> None:
        self.model, self.tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        self.device = next(self.model.parameters()).device
        self.keep, self.stops = args.keep, stops
        self.memory = PeakMemory(self.device)

    def method(self, label: str) -> Any:
        return policy(PAIRS[label].kvslim.format(keep=self.keep))

    def _generate(self, method: Any, prompt: list[int], suffix: list[int] | None, max_new: int
                  ) -> tuple[list[int], Any, dict[str, Any]]:
        new, cache, timing = generate_ids(self.model, [prompt], method, max_new, self.stops, pad_token_id=self.stops[0],
                                          repeat=repeat_prompt(self.tokenizer) if method.probes else None,
                                          suffix_ids=[suffix] if suffix is not None else None)
        return new[0], cache, timing

    def generate(self, label: str, sample: dict[str, Any], protocol: str) -> dict[str, Any]:
        suffix = sample["question_ids"] if protocol == QUERY_AGNOSTIC else None
        self.memory.reset()
        out, _, timing = self._generate(self.method(label), compressed_ids(sample, protocol), suffix,
                                        sample["max_new_tokens"])
        return {"output_ids": out, "prefill_s": timing["ttft_s"], "decode_s_per_token": timing["tpot_s"],
                "peak_mem_bytes": self.memory.read(), "peak_mem_kind": self.memory.kind}

    @torch.inference_mode()
    def full_keys(self, sample: dict[str, Any], protocol: str) -> list[torch.Tensor]:
        cache = DynamicCache()
        ids = torch.tensor([compressed_ids(sample, protocol)], device=self.device)
        self.model.model(input_ids=ids, **cache_arg(cache), use_cache=True)
        return [layer.keys[0] for layer in cache.layers]

    def kept(self, label: str, sample: dict[str, Any], protocol: str, full: list[torch.Tensor]
             ) -> tuple[list[list[list[int]]], int]:
        """Kept positions after compressing what the protocol compresses (one token generated, nothing appended)."""
        _, cache, _ = self._generate(self.method(label), compressed_ids(sample, protocol), None, 1)
        held = []
        for layer in cache.layers:
            keys, _, valid = layer.dense(torch.float32)
            held.append([keys[0, h][valid[0, h]] for h in range(keys.shape[1])])
        return kept_positions(full, held, [None] * len(full))

    def run(self, samples: list[dict[str, Any]], plan: dict[str, Any], target: Path) -> None:
        target.write_text("")
        for number, sample in enumerate(samples):
            capture = number in plan["kept_samples"]
            for protocol in plan["protocols"]:
                full = self.full_keys(sample, protocol) if capture else None
                for method in plan["methods"]:
                    label = method["label"]
                    record = {"side": "kvslim", "label": label, "protocol": protocol, "sample_id": sample["id"],
                              **self.generate(label, sample, protocol)}
                    if capture and label != "full":
                        record["kept"], record["unmatched_keys"] = self.kept(label, sample, protocol, full)
                    append_jsonl(target, record)
                    print(f"kvslim {sample['id']} {protocol} {label}: {record['prefill_s']:.2f}s prefill", flush=True)


def compare(args: argparse.Namespace, samples: list[dict[str, Any]], tokenizer: Any, stops: list[int],
            settings: dict[str, Any]) -> dict[str, Any]:
    drop = set(stops)

    def text_of(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=True)

    def score_of(text: str, sample: dict[str, Any]) -> float:
        return METRICS[sample["metric"]](text, sample["answers"])

    rows = agreement.pair_samples(samples, read_jsonl(args.out / "kvslim.jsonl"), read_jsonl(args.out / "kvpress.jsonl"),
                                  text_of, score_of)
    result = {"settings": settings, "pairs": {m: {"kvslim": PAIRS[m].kvslim.format(keep=args.keep),
                                                  "kvpress": PAIRS[m].kvpress, "note": PAIRS[m].note}
                                              for m in args.method_list},
              "summary": agreement.summarise(rows), "samples": rows}
    (args.out / "comparison.json").write_text(json.dumps(result, indent=1))
    (args.out / "report.md").write_text(report(result))
    return result


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# kvslim vs kvpress {s['kvpress_side']['kvpress']}: {s['model']}, RULER {s['length']}, keep {s['keep']}", "",
             (f"Tasks {s['tasks']}, {s['samples']} samples each, {s['device']} {s['dtype']}. Scores are RULER's "
             "string_match_all on both outputs decoded by one tokenizer. *same out*: identical answer text; "
             "*kept J*: Jaccard overlap of the kept prompt positions per layer and KV head (captured samples)."), "",
             ("| method | protocol | n | kvslim | kvpress | same out | same score | kept J | kept/head kvslim | "
             "kvpress | prefill s kvslim | kvpress | decode ms/tok kvslim | kvpress | peak MiB kvslim | kvpress |"),
             "|" + "---|" * 16]
    for e in result["summary"]:
        kept = [f"{e['kept_jaccard']:.3f}", f"{e['kvslim_kept_per_head']:.0f}", f"{e['kvpress_kept_per_head']:.0f}"] \
            if "kept_jaccard" in e else ["-", "-", "-"]
        lines.append("| " + " | ".join([
            e["label"], e["protocol"], str(e["n"]), f"{e['kvslim_score']:.3f}", f"{e['kvpress_score']:.3f}",
            f"{e['same_output']:.2f}", f"{e['same_score']:.2f}", *kept,
            f"{e['kvslim_prefill_s']:.3f}", f"{e['kvpress_prefill_s']:.3f}",
            f"{1e3 * e['kvslim_decode_s_per_token']:.1f}", f"{1e3 * e['kvpress_decode_s_per_token']:.1f}",
            f"{e['kvslim_peak_mem_bytes'] / 2**20:.0f}", f"{e['kvpress_peak_mem_bytes'] / 2**20:.0f}"]) + " |")
    lines += ["", "## What differs by default", ""]
    lines += [f"- **{m}**: kvslim `{p['kvslim']}` vs kvpress `{p['kvpress']}`: {p['note']}" for m, p in result["pairs"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    source = resolve(args.model)
    model_dir = source.weights_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    generation = transformers.GenerationConfig.from_pretrained(model_dir, local_files_only=True) \
        if (model_dir / "generation_config.json").is_file() else None
    stops = stop_ids(SimpleNamespace(generation_config=generation), tokenizer)
    if args.sides == "both" or not (args.out / SAMPLES).is_file():
        write_inputs(args, model_dir, tokenizer, stops)
    samples = read_jsonl(args.out / SAMPLES)
    if args.sides in ("both", "kvpress"):
        run_kvpress(args)
    if args.sides in ("both", "kvslim"):
        side = KvslimSide(args, stops)
        side.run(samples, json.loads((args.out / PLAN).read_text()), args.out / "kvslim.jsonl")
        del side
        gc.collect()
    if not all((args.out / name).is_file() for name in ("kvslim.jsonl", "kvpress.jsonl", ENVIRONMENT)):
        print(f"{args.out}: one side has not run yet; compare with --sides none once both have")
        return
    settings = {"command": " ".join(sys.argv), "model": args.model, "model_dir": str(model_dir),
                "tasks": args.tasks, "length": args.length, "samples": args.samples, "keep": args.keep,
                "protocols": args.protocol_list, "device": args.device, "dtype": args.dtype, "seed": args.seed,
                "kvslim_side": {"torch": torch.__version__, "transformers": transformers.__version__},
                "kvpress_side": json.loads((args.out / ENVIRONMENT).read_text()), "machine": platform.machine(),
                "elapsed_s": round(time.perf_counter() - started, 1), "sides_run": args.sides}
    result = compare(args, samples, tokenizer, stops, settings)
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out / 'comparison.json'} ({len(result['samples'])} paired samples)")


if __name__ == "__main__":
    main()
