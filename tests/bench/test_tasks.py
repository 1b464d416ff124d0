"""Task generation and scoring, with a whitespace/punctuation tokenizer standing in for a real one."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from kvslim.bench.tasks import get_task, list_tasks
from kvslim.bench.tasks.boundary import answer_prefix

GENERATION = ["fwe", "multikey", "multivalue", "needle", "passkey", "vt"]
ALL = GENERATION + ["perplexity"]


class WordTokenizer:
    """Same ``encode`` signature as a Hugging Face tokenizer; one token per word or punctuation mark."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


TOK = WordTokenizer()


class RegexTokenizer:
    """Pre-tokenizes like a byte-level BPE: ``split_digits`` as SmolLM2, Llama 3 and Qwen2 do (the space
    before a number is a token of its own), otherwise as GPT-2 does (the space joins the number)."""

    def __init__(self, split_digits: bool) -> None:
        self.pattern = r" ?[A-Za-z]+| |\d|[^\w\s]" if split_digits else r" ?[A-Za-z]+| ?\d+|\s+|[^\w\s]"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return re.findall(self.pattern, text)


def gold_text(answer: str | list[str]) -> str:
    return answer if isinstance(answer, str) else ", ".join(answer)


def test_registry_lists_every_task() -> None:
    assert list_tasks() == sorted([*ALL, "longgen"])  # longgen sizes prompt and output together: test_longgen.py


def test_unknown_task_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid tasks: fwe, longgen, multikey"):
        get_task("nope")


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed(name: str) -> None:
    task = get_task(name)
    first = task.generate(3, 600, TOK, seed=7)
    assert first == task.generate(3, 600, TOK, seed=7)
    assert [s.prompt for s in first] != [s.prompt for s in task.generate(3, 600, TOK, seed=8)]
    assert len({s.prompt for s in first}) == 3
    assert len({s.id for s in first}) == 3


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("length", [300, 1000, 4000])
def test_prompt_fits_length(name: str, length: int) -> None:
    for s in get_task(name).generate(4, length, TOK, seed=1):
        tokens = len(TOK.encode(s.prompt))
        assert length - 16 <= tokens <= length
        assert s.meta["tokens"] == tokens
        assert (s.task, s.meta["length"], s.meta["seed"]) == (name, length, 1)


@pytest.mark.parametrize("name", GENERATION)
def test_prompt_layout_and_answer_in_context(name: str) -> None:
    for s in get_task(name).generate(3, 800, TOK, seed=2):
        m = s.meta
        assert s.prompt == f"{m['instruction']}\n\n{m['context']}\n\n{m['question']} {m['answer_prefix']}"
        golds = [s.answer] if isinstance(s.answer, str) else s.answer
        assert golds and all(g in m["context"] for g in golds)


@pytest.mark.parametrize("name", GENERATION)
def test_scorer_gold_and_garbage(name: str) -> None:
    task = get_task(name)
    for s in task.generate(3, 500, TOK, seed=3):
        assert task.score(s, gold_text(s.answer)) == 1.0
        assert task.score(s, "I do not know, sorry.") == 0.0


@pytest.mark.parametrize("name", ["multivalue", "vt", "fwe"])
def test_list_answers_score_partial_credit(name: str) -> None:
    task = get_task(name)
    s = task.generate(1, 600, TOK, seed=4)[0]
    assert task.score(s, s.answer[0]) == pytest.approx(1 / len(s.answer))


@pytest.mark.parametrize("name", ["needle", "passkey"])
def test_needle_sits_at_its_depth(name: str) -> None:
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    samples = get_task(name).generate(len(depths), 2000, TOK, seed=5, depths=depths)
    for depth, s in zip(depths, samples):
        context, needle = s.meta["context"], s.meta["needle"]
        assert s.meta["depth"] == depth
        assert context.count(needle) == 1
        assert context.index(needle) / (len(context) - len(needle)) == pytest.approx(depth, abs=0.03)


def test_answer_prefix_ends_where_the_tokenizer_starts_a_number() -> None:
    split, merged = RegexTokenizer(split_digits=True), RegexTokenizer(split_digits=False)
    assert split.encode("is 47694")[:3] == ["is", " ", "4"]
    assert answer_prefix("The pass key is", split) == "The pass key is "
    assert merged.encode("is 47694") == ["is", " 47694"]
    assert answer_prefix("The pass key is", merged) == "The pass key is"


@pytest.mark.parametrize("name", ["passkey", "needle", "multikey", "multivalue"])
def test_numeric_prompts_continue_like_the_hidden_fact(name: str) -> None:
    """With a digit-splitting tokenizer, prompt + gold tokenizes as the prompt's tokens then the gold's,
    just as the fact sentence in the context does: the model is never asked for a bare space first."""
    tok = RegexTokenizer(split_digits=True)
    for s in get_task(name).generate(2, 600, tok, seed=8):
        gold = s.answer if isinstance(s.answer, str) else s.answer[0]
        assert s.prompt.endswith(" ") and s.meta["answer_prefix"].endswith(" ")
        assert tok.encode(s.prompt + gold) == tok.encode(s.prompt) + tok.encode(gold)


def test_needle_cycles_default_depth_grid() -> None:
    samples = get_task("needle").generate(6, 500, TOK)
    assert [s.meta["depth"] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]


def test_multikey_hides_distractors() -> None:
    s = get_task("multikey").generate(1, 1000, TOK, seed=6, keys=6)[0]
    assert s.meta["context"].count("One of the special magic numbers for") == 6
    assert s.meta["key"] in s.meta["question"]


def test_vt_chain_appears_in_order() -> None:
    s = get_task("vt").generate(1, 1000, TOK, seed=6, chains=2)[0]
    context, names = s.meta["context"], s.answer
    positions = [context.index(f"VAR {names[0]} = {s.meta['value']}.")]
    positions += [context.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
    assert positions == sorted(positions)
    assert context.count("VAR ") == 2 * 2 * len(names) - 2  # two chains, "VAR" twice in each hop


def test_fwe_answer_is_the_clear_top_three() -> None:
    for s in get_task("fwe").generate(3, 1000, TOK, seed=6):
        ranked = Counter(s.meta["context"].split()).most_common()
        assert [w for w, _ in ranked[:3]] == s.answer
        assert ranked[2][1] > ranked[3][1]


def test_perplexity_is_plain_prose() -> None:
    task = get_task("perplexity")
    s = task.generate(1, 1000, TOK, seed=6)[0]
    assert (s.answer, s.meta["kind"], task.max_new_tokens) == ("", "perplexity", 0)
    assert "pydoc_data.topics" in s.meta["source"]
    assert not re.search(r"::=|>>>|\*\*", s.prompt)
    with pytest.raises(TypeError):
        task.score(s, "anything")
    with pytest.raises(ValueError, match="more text than the source has"):
        task.generate(1, 10**7, TOK)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("passkey", {"n": 0}, "at least one sample"),
        ("needle", {"length": 20}, "too small"),
        ("needle", {"colour": "red"}, r"unknown option\(s\) \['colour'\].*valid options: \['depths'\]"),
        ("needle", {"depths": [1.5]}, "fractions in"),
        ("multikey", {"keys": 0}, "positive integer"),
        ("vt", {"hops": "4"}, "positive integer"),
        ("fwe", {"alpha": -1}, "positive Zipf exponent"),
        ("perplexity", {"depths": [0.5]}, "valid options: none"),
    ],
)
def test_bad_input_is_explained(name: str, kwargs: dict, message: str) -> None:
    args = {"n": 2, "length": 500, "tokenizer": TOK, **kwargs}
    with pytest.raises(ValueError, match=message):
        get_task(name).generate(**args)
