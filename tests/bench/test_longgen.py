"""longgen: prompt and output fill the length together, and the score recomputes each line from the model's own
text. End to end through the harness on a tiny model, a decode-time budget holds the cache however long it writes."""
from __future__ import annotations

import re

import pytest
from model_dirs import char_tokenizer

from kvslim.bench import harness
from kvslim.bench.config import BenchConfig
from kvslim.bench.store import SampleLog
from kvslim.bench.tasks import get_task
from kvslim.bench.tasks.longgen import LEAD, keys_of, listing
from kvslim.models import load_model

TASK = get_task("longgen")


class WordTokenizer:
    """One token per word or punctuation mark (``encode`` as a Hugging Face tokenizer's)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


TOK = WordTokenizer()


def _sample(length: int = 1200, **opts):
    return TASK.generate(1, length, TOK, seed=3, **opts)[0]


def _continuation(words: list[str], lines: int) -> str:
    """What the model writes after the answer prefix when it repeats ``words`` for ``lines`` more lines."""
    n, first = len(words), len(words) + LEAD + 1
    text = listing([words[(j - 1) % n] for j in range(first, first + lines)], first)
    return text[len(f"{first}."):]  # the prefix ends with the first line's number


def test_prompt_and_output_budget_fill_the_length() -> None:
    for length, cycles in ((1200, 3), (4000, 3), (4000, 1)):
        s = _sample(length, cycles=cycles)
        m = s.meta
        assert m["tokens"] == len(TOK.encode(s.prompt)) and m["tokens"] + m["max_new_tokens"] == length
        assert TASK.new_tokens(s) == m["max_new_tokens"]
        assert len(set(s.answer)) == m["lines"] == len(s.answer)  # distinct keys
        listed = len(TOK.encode(listing(s.answer, 1)))
        assert cycles * listed * 0.8 <= m["max_new_tokens"] <= (cycles + 1) * listed * 1.2
        assert keys_of(m["context"] + "\n" + m["answer_prefix"]) == s.answer + s.answer[:LEAD]
    assert _sample() == _sample() and _sample().prompt != TASK.generate(1, 1200, TOK, seed=4)[0].prompt


def test_perfect_repeats_score_one_and_stopping_halfway_half() -> None:
    s = _sample()
    lines = s.meta["expected_lines"]
    assert len(TOK.encode(_continuation(s.answer, lines))) <= s.meta["max_new_tokens"]
    assert len(TOK.encode(_continuation(s.answer, lines + 2))) > s.meta["max_new_tokens"]
    assert TASK.score(s, _continuation(s.answer, lines)) == 1.0
    assert TASK.score(s, _continuation(s.answer, lines // 2)) == pytest.approx(0.5, abs=1 / lines + 0.01)
    assert TASK.score(s, "") == 0.0


def test_lines_are_checked_against_the_models_own_text() -> None:
    """A slip the model then repeats one list later is right the second time (its own text says so), one it
    does not repeat costs the line after too; one key written over and over, or headings alone, score nothing."""
    s = _sample()
    k, lines = s.meta["lines"], s.meta["expected_lines"]
    assert lines > 2 * k  # line 2k+6 and 3k+6 are written
    perfect = _continuation(s.answer, lines)
    slip = perfect.replace(f"\n{2 * k + 6}. {s.answer[5]}\n", f"\n{2 * k + 6}. odd-slip\n")
    assert TASK.score(s, slip) == pytest.approx((lines - 2) / lines)  # 2k+6 and 3k+6 (not its own 2k+6) wrong
    carried = slip.replace(f"\n{3 * k + 6}. {s.answer[5]}\n", f"\n{3 * k + 6}. odd-slip\n")
    assert TASK.score(s, carried) == pytest.approx((lines - 1) / lines)  # 3k+6 repeats the model's own line
    first = k + LEAD + 1
    same = listing([s.answer[LEAD]] * lines, first)[len(f"{first}."):]
    assert TASK.score(s, same) < 0.02
    assert TASK.score(s, "The list again, from the top:\n" * 3) == 0.0
    headed = _continuation(s.answer, k - LEAD) + "\n\nThe list again, from the top:\n" + listing(
        [s.answer[(j - 1) % k] for j in range(2 * k + 1, 2 * k + 1 + lines - (k - LEAD))], 2 * k + 1)
    assert TASK.score(s, headed) == 1.0  # a heading before each repeat, as the prompt has, writes no key


def test_too_short_a_length_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        _sample(60)
    with pytest.raises(ValueError, match="cycles"):
        _sample(cycles=0)


@pytest.mark.parametrize("budget", [48])
def test_harness_holds_a_decode_time_budget_while_writing(tmp_path, budget: int) -> None:
    """Through ``kvslim bench`` (HF path): every sample writes its whole budget (no EOS on the tiny model's char
    tokenizer, EOS being a token it never ranks first here) or stops, and R-KV's cache never holds more than its
    budget per head while full's grows with the output."""
    config = BenchConfig(model="tiny-llama", policies=["full", f"rkv(budget={budget})"], keeps=[0.5],
                         tasks=["longgen"], lengths=[800], samples=1, out=str(tmp_path), device="cpu")
    tokenizer = char_tokenizer(chat=False)
    summary = harness.run_benchmark(config, progress=False,
                                    loader=lambda c: (load_model(c.model, dtype=c.torch_dtype)[0], tokenizer))
    sample = TASK.generate(1, 800, tokenizer, seed=0)[0]
    records = {r["policy"]: r for r in SampleLog(tmp_path).records.values()}
    for record in records.values():
        assert 1 <= record["output_tokens"] <= sample.meta["max_new_tokens"]
        assert record["score"] == TASK.score(sample, record["output"])
    assert records[f"rkv(budget={budget})"]["peak_tokens_per_head"] <= budget
    full = records["full"]
    assert full["peak_tokens_per_head"] == full["prompt_tokens"] + full["output_tokens"] - 1
    rows = {row["policy"]: row for row in summary["rows"]}
    assert rows[f"rkv(budget={budget})"]["peak_tokens_per_head"] <= budget < rows["full"]["peak_tokens_per_head"]
