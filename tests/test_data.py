"""Arithmetic generator, case files and tokenising."""

import json

import pytest

from cnalens.data import arithmetic_cases, encode, encode_all, load_cases
from cnalens.data.arithmetic import answer, format_prefix, number_words, operand_pairs, split_pairs
from cnalens.data.cases import Case
from cnalens.errors import CnaError
from tiny import TinyTokenizer


def test_operand_pairs():
    assert len(operand_pairs("+", 1)) == 100
    sub = operand_pairs("-", 1)
    assert len(sub) == 55 and all(a >= b for a, b in sub)
    assert len(operand_pairs("-", 1, negative=True)) == 100
    div = operand_pairs("/", 2)
    assert div and all(a % b == 0 and 10 <= a <= 99 and 10 <= b <= 99 for a, b in div)
    assert all(b != 0 for _, b in operand_pairs("/", 1))
    assert len(operand_pairs("*", 3)) == 900 * 900
    with pytest.raises(CnaError, match="digits"):
        operand_pairs("+", 4)
    with pytest.raises(CnaError, match="unknown operation"):
        operand_pairs("^", 1)


def test_splits_partition_and_are_stable():
    for op in "+-*/":
        train, test = split_pairs(op, 2, "train"), split_pairs(op, 2, "test")
        assert not set(train) & set(test)
        assert sorted(train + test) == sorted(operand_pairs(op, 2))
        assert test == split_pairs(op, 2, "test")


def test_cases_exclude_their_few_shot_examples():
    ex = [(1, 1), (4, 2), (2, 5)]
    cases = arithmetic_cases(["+"], [1], ["eq"], examples={"+|eq": ex})
    assert len(cases) == 97
    pairs = {(c.labels["a"], c.labels["b"]) for c in cases}
    assert not pairs & set(ex)
    c = next(c for c in cases if c.labels["a"] == 3 and c.labels["b"] == 5)
    assert c.prefix == "1+1=2\n4+2=6\n2+5=7\n"
    assert c.prompt == "1+1=2\n4+2=6\n2+5=7\n3+5=" and c.target == "8"


def test_templates_words_and_answers():
    c = arithmetic_cases(["*"], [1], ["qa"], shots=0, words=True)
    one = next(x for x in c if x.labels["a"] == 3 and x.labels["b"] == 7)
    assert one.question == "Q: What is three times seven? A:" and one.target == " 21"
    assert number_words(21) == "twenty-one" and number_words(305) == "three hundred five"
    assert answer("/", 8, 2) == 4
    assert format_prefix("-", "nl", [(5, 2)]) == "The difference of 5 and 2 is 3\n"
    n = arithmetic_cases(["+"], [2], ["eq", "nl"], n=10, seed=3)
    assert len(n) == 20 and n == arithmetic_cases(["+"], [2], ["eq", "nl"], n=10, seed=3)
    with pytest.raises(CnaError):
        arithmetic_cases([], [1])


class MergingTokenizer(TinyTokenizer):
    """Merges "=8" into one token, so the prompt is not a token prefix of prompt+target."""

    def __call__(self, text, add_special_tokens=True):
        ids = []
        i = 0
        while i < len(text):
            if text[i:i + 2] == "=8":
                ids.append(60)
                i += 2
            else:
                ids.append(3 + (ord(text[i]) % 50))
                i += 1
        return type("Enc", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()

    def decode(self, ids):
        return "".join("=8" if i == 60 else " " if i == 3 + 32 % 50 else "x" for i in ids)


def test_encode_moves_space_and_flags_merges():
    tok = TinyTokenizer()
    e = encode(tok, Case("is", " 12"))
    assert e.answer_ids == tuple(tok("12", False).input_ids)
    assert e.prompt_ids[-1] == 3 + 32 and e.moved_space
    assert e.input_ids == list(e.prompt_ids) + [e.answer_ids[0]]
    m = encode(MergingTokenizer(), Case("3+5=", "8"))
    assert m.merged and len(m.answer_ids) == 1
    with pytest.raises(CnaError, match="not a single token"):
        encode_all(tok, [Case("a", "bc")], single_token=True)
    with pytest.raises(CnaError, match="empty dataset"):
        encode_all(tok, [])


def test_case_files(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"prompt": "A man works as a", "target": " nurse",
                              "group": "f"}) + "\n")
    cases = load_cases(jl)
    assert cases[0].prompt == "A man works as a" and cases[0].labels["group"] == "f"
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,target\n2+2=,4\n")
    assert load_cases(csv)[0].target == "4"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\nx,y\n")
    with pytest.raises(CnaError, match="lacks column"):
        load_cases(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CnaError, match="no cases"):
        load_cases(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(CnaError, match="cannot read"):
        load_cases(broken)
    with pytest.raises(CnaError, match="not found"):
        load_cases(tmp_path / "missing.csv")
    with pytest.raises(CnaError, match="use .jsonl or .csv"):
        (tmp_path / "x.txt").write_text("a")
        load_cases(tmp_path / "x.txt")
