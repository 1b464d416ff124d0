"""Models on disk the way users bring them: a Hugging Face directory and a hub-cache snapshot, built from a
tiny random model and a one-token-per-character tokenizer that carries a chat template."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kvslim.models import tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character: fits the tiny models' 256-token vocabulary."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_model_dir(target: Path, arch: str = "llama", tokenizer: bool = True) -> PreTrainedModel:
    """A tiny random model saved as a plain Hugging Face directory (config.json, safetensors, tokenizer files)."""
    model = tiny_model(arch, "gqa", seed=3)
    model.save_pretrained(target)
    if tokenizer:
        char_tokenizer().save_pretrained(target)
    return model


def save_hub_snapshot(hub_cache: Path, repo_id: str, revision: str = "0123456789abcdef") -> PreTrainedModel:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<revision>/...}."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return save_model_dir(repo / "snapshots" / revision)
