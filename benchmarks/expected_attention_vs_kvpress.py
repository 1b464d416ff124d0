"""ExpectedAttention's token scores, kvslim against kvpress's ExpectedAttentionPress, on one real prompt.

Why: the two must keep the same tokens (kvpress is the authors' reference). This hooks each side's score
function on the same token ids and compares, per layer and KV head, the top ``keep`` share of the non-sink tokens
(Jaccard). The two sides need different transformers, so they run as two processes (see shared/PEERS.md):

    python benchmarks/expected_attention_vs_kvpress.py ids OUT            # the prompt's token ids (kvslim's env)
    /work/venv-kvpress/bin/python benchmarks/expected_attention_vs_kvpress.py kvpress OUT --epsilon 0.01
    python benchmarks/expected_attention_vs_kvpress.py kvslim OUT --spec expected_attention

The kvpress side imports neither kvslim nor its transformers; everything it needs is in this file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

MODEL_DIR = Path.home() / ".cache/kvslim/qwen2.5-coder-0.5b-instruct"  # `kvslim models fetch qwen2.5-coder-0.5b`
TEXT = Path(__file__).resolve().parents[1] / "src/kvslim/bench/ruler/essays.py"  # any long English text


def write_ids(out: Path, tokens: int) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(MODEL_DIR))(TEXT.read_text() * 3, return_tensors="pt").input_ids
    torch.save(ids[:, :tokens], out / "ids.pt")


def kvpress_scores(out: Path, keep: float, epsilon: float) -> None:
    from kvpress import ExpectedAttentionPress
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32, attn_implementation="sdpa")
    press = ExpectedAttentionPress(compression_ratio=1 - keep, epsilon=epsilon)
    scores: dict[int, torch.Tensor] = {}
    score = ExpectedAttentionPress.score

    def recording(self, module, *args, **kwargs):  # type: ignore[no-untyped-def]
        scores[module.layer_idx] = result = score(self, module, *args, **kwargs)
        return result

    ExpectedAttentionPress.score = recording  # type: ignore[method-assign]
    with torch.no_grad(), press(model):
        model(torch.load(out / "ids.pt"))
    torch.save(scores, out / "kvpress_scores.pt")


def compare(out: Path, spec: str, keep: float, sinks: int) -> None:
    import kvslim
    from kvslim.methods.expected_attention import ExpectedAttention
    from kvslim.models import load_model

    model = load_model("qwen2.5-coder-0.5b")[0]
    scores: dict[int, torch.Tensor] = {}
    score = ExpectedAttention.score

    def recording(self, obs):  # type: ignore[no-untyped-def]
        scores[obs.layer_idx] = result = score(self, obs)
        return result

    ExpectedAttention.score = recording  # type: ignore[method-assign]
    ids = torch.load(out / "ids.pt")
    with torch.no_grad():
        model(ids, past_key_values=kvslim.Cache(kvslim.policy(spec, keep=keep), model.config), use_cache=True)
    reference = torch.load(out / "kvpress_scores.pt")
    k = int(ids.shape[1] * keep) - sinks
    per_layer = []
    for layer in sorted(scores):
        ours = scores[layer][..., sinks:].topk(k, -1).indices[0]
        theirs = reference[layer][..., sinks:].float().topk(k, -1).indices[0]
        overlap = [len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
                   for a, b in zip(ours, theirs)]
        per_layer.append(sum(overlap) / len(overlap))
    print(f"{spec}: kept-set Jaccard {sum(per_layer) / len(per_layer):.4f}; per layer "
          + " ".join(f"{j:.3f}" for j in per_layer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["ids", "kvpress", "kvslim"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--epsilon", type=float, default=0.01, help="kvpress side: ExpectedAttentionPress's epsilon")
    parser.add_argument("--spec", default="expected_attention", help="kvslim side: the policy compared")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.side == "ids":
        write_ids(args.out, args.tokens)
    elif args.side == "kvpress":
        kvpress_scores(args.out, args.keep, args.epsilon)
    else:
        compare(args.out, args.spec, args.keep, sinks=4)


if __name__ == "__main__":
    main()
