"""End a prompt exactly where the answer's first token starts (the "prompt boundary" problem).

A model continues the token sequence it is given, so a prompt must stop at a boundary that the tokenizer
itself would produce in front of the answer. Tokenizers that split digits (SmolLM2, Llama 3, Qwen2) encode
"The pass key is 47694" as ``... ' is', ' ', '4', '7', ...``: the space before a number is a token of its own.
A prompt ending in "is" then asks the model to emit that bare space first, a token a small model ranks
below a word such as " the" even when it knows the number. Measured on SmolLM2-135M-Instruct (pass key,
2048 tokens, 20 samples, full cache): ending the answer prefix with "is" found 9 keys (the other 11 began
with " the" or " a", yet after the space the model ranked the right digits first in all of them); ending
it with "is " found all 20. Tokenizers that merge the space into the number (GPT-2's ``' 47694'``) keep the
prefix as it is, so the rule helps no tokenizer at the expense of another.
"""
from __future__ import annotations

from .fit import Tokenizer


def answer_prefix(prefix: str, tokenizer: Tokenizer, example: str = "0") -> str:
    """``prefix`` plus the space before the answer when ``tokenizer`` makes that space a token by itself.

    ``example`` is any text shaped like the answers (the default, a digit, suits numeric answers); it
    only decides the tokenizer's boundary and never comes from a sample's gold answer.
    """
    spaced = list(tokenizer.encode(prefix + " ", add_special_tokens=False))
    answered = list(tokenizer.encode(f"{prefix} {example}", add_special_tokens=False))
    return prefix + " " if answered[: len(spaced)] == spaced else prefix
