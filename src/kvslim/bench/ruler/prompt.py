"""A RULER input in the parts the two protocols need, and its framing for one tokenizer.

RULER's input is ``model_template(task_template) + answer_prefix``: for an instruct model the chat template
wraps instruction, context and question, and the answer prefix follows the generation prompt. kvpress's
pipeline splits that same text where the question starts: everything before it is the *context* (compressed
in the query-agnostic protocol), the question, the end of the user turn, the generation prompt and the
answer prefix are the *question*. Both protocols feed the same token ids (context ids + question ids), so
their scores differ only by when compression happens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_MARK = "\x00KVSLIM-QUESTION\x00"


@dataclass(frozen=True)
class Parts:
    """``context`` and ``question`` concatenated are RULER's task template filled in; ``history`` holds
    worked examples as (user, assistant) turns before it (variable tracking's and common-words' one-shot
    example); ``answer_prefix`` starts the answer."""

    context: str
    question: str
    answer_prefix: str
    history: tuple[tuple[str, str], ...] = field(default=())


class Framing:
    """Turns :class:`Parts` into (context ids, question ids) for one tokenizer, with its chat template
    (``chat=True``, RULER's setting for instruct models) or as plain text (RULER's ``base`` template)."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: run RULER with plain prompts (--no-chat)")
        self.tokenizer = tokenizer
        self.chat = chat

    def texts(self, parts: Parts) -> tuple[str, str]:
        """The context text and the question text (their concatenation is the whole input)."""
        if not self.chat:
            shots = "".join(f"{user}{self._answer(parts.answer_prefix, reply)}\n\n" for user, reply in parts.history)
            return shots + parts.context, parts.question + parts.answer_prefix
        messages = []
        for user, reply in parts.history:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": self._answer(parts.answer_prefix, reply).strip()}]
        messages.append({"role": "user", "content": parts.context + _MARK})
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head, tail = rendered.split(_MARK)
        return head, parts.question + tail + parts.answer_prefix

    def ids(self, parts: Parts) -> tuple[list[int], list[int]]:
        context, question = self.texts(parts)
        # Plain text gets the tokenizer's own special tokens (a BOS); a chat template writes its own.
        return (list(self.tokenizer.encode(context, add_special_tokens=not self.chat)),
                list(self.tokenizer.encode(question, add_special_tokens=False)))

    def tokens(self, parts: Parts) -> int:
        context, question = self.ids(parts)
        return len(context) + len(question)

    @staticmethod
    def _answer(prefix: str, reply: str) -> str:
        return f"{prefix} {reply}"
