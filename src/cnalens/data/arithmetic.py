"""Arithmetic cases: + - * / with 1-3 digit operands, four templates, a few-shot prefix.

Deterministic: the same arguments give the same cases. Train/test splits partition the
operand pairs of each (operation, digits) with a fixed seed, so a pair lands in the same
split under every template. Evaluated cases never repeat their own prompt's few-shot
examples. Subtraction is non-negative unless ``negative``; division is exact.

The default few-shot examples per operation and template live in ``prefixes.json``,
chosen by measurement on both real models (``scripts/choose_prefixes.py``; README).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib.resources import files

from cnalens.data.cases import Case
from cnalens.errors import CnaError

OPS = ("+", "-", "*", "/")
OP_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}
COLUMNS = ("op", "digits", "template")  # the labels per-case tables show (Case.columns)
TEMPLATES: dict[str, dict[str, str]] = {
    "eq": {"+": "{a}+{b}=", "-": "{a}-{b}=", "*": "{a}*{b}=", "/": "{a}/{b}="},
    "nl": {"+": "The sum of {a} and {b} is", "-": "The difference of {a} and {b} is",
           "*": "The product of {a} and {b} is", "/": "The ratio of {a} and {b} is"},
    "qa": {"+": "Q: What is {a} plus {b}? A:", "-": "Q: What is {a} minus {b}? A:",
           "*": "Q: What is {a} times {b}? A:", "/": "Q: What is {a} divided by {b}? A:"},
    "verbal": {"+": "{a} plus {b} is", "-": "{a} minus {b} is", "*": "{a} times {b} is",
               "/": "{a} divided by {b} is"},
}
SPLIT_SEED = 1234

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0..999 (``21`` -> ``twenty-one``)."""
    if not 0 <= n <= 999:
        raise CnaError(f"number words cover 0..999, not {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def answer(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]


def _range(digits: int) -> range:
    if digits not in (1, 2, 3):
        raise CnaError(f"digits must be 1, 2 or 3, not {digits}")
    return range(0, 10) if digits == 1 else range(10 ** (digits - 1), 10 ** digits)


def operand_pairs(op: str, digits: int, negative: bool = False) -> list[tuple[int, int]]:
    """Every valid operand pair of an operation with ``digits``-digit operands."""
    if op not in OPS:
        raise CnaError(f"unknown operation '{op}': use {','.join(OPS)}")
    r = _range(digits)
    if op == "/":
        return [(a, b) for b in r if b for a in r if a % b == 0]
    if op == "-" and not negative:
        return [(a, b) for a in r for b in r if a >= b]
    return [(a, b) for a in r for b in r]


def split_pairs(op: str, digits: int, split: str, test_fraction: float = 0.1,
                negative: bool = False) -> list[tuple[int, int]]:
    """The pairs of one split ("all", "train", "test"), fixed by ``SPLIT_SEED``."""
    pairs = operand_pairs(op, digits, negative)
    if split == "all":
        return pairs
    if split not in ("train", "test"):
        raise CnaError(f"unknown split '{split}': use all, train or test")
    order = list(pairs)
    random.Random(f"{SPLIT_SEED}|{op}|{digits}|{negative}").shuffle(order)
    n_test = max(1, round(test_fraction * len(order))) if len(order) > 1 else 0
    test = set(order[:n_test])
    return [p for p in pairs if (p in test) == (split == "test")]


@lru_cache(maxsize=1)
def _prefix_table() -> dict:
    return json.loads(files("cnalens.data").joinpath("prefixes.json").read_text())


def default_examples(op: str, template: str, digits: int, shots: int = 3) -> list[tuple]:
    """Few-shot operand pairs: measured defaults for 1 digit, seeded otherwise."""
    table = _prefix_table().get("examples", {})
    key = f"{op}|{template}|{digits}"
    if key in table and len(table[key]) >= shots:
        return [tuple(p) for p in table[key][:shots]]
    pairs = operand_pairs(op, digits)
    rng = random.Random(f"prefix|{op}|{template}|{digits}")
    return rng.sample(pairs, min(shots, len(pairs)))


def format_question(op: str, template: str, a: int, b: int, words: bool = False) -> str:
    if template not in TEMPLATES:
        raise CnaError(f"unknown template '{template}': use {','.join(TEMPLATES)}")
    fa, fb = (number_words(a), number_words(b)) if words else (a, b)
    return TEMPLATES[template][op].format(a=fa, b=fb)


def format_answer(template: str, value: int) -> str:
    return ("" if template == "eq" else " ") + str(value)


def format_prefix(op: str, template: str, examples: Iterable[tuple[int, int]],
                  words: bool = False) -> str:
    """Few-shot lines in the question's own template, one per line."""
    return "".join(format_question(op, template, a, b, words)
                   + format_answer(template, answer(op, a, b)) + "\n" for a, b in examples)


def arithmetic_cases(ops: Sequence[str] = OPS, digits: Sequence[int] = (1,),
                     templates: Sequence[str] = ("eq",), n: int | None = None, seed: int = 0,
                     split: str = "all", test_fraction: float = 0.1, negative: bool = False,
                     words: bool = False, shots: int = 3,
                     examples: dict[str, list[tuple[int, int]]] | None = None) -> list[Case]:
    """Arithmetic cases for every op x digits x template.

    ``n``: at most that many operand pairs per (op, digits), a seeded sample (all if
    None). ``examples`` overrides the few-shot pairs per ``"op|template"``.
    """
    if not ops:
        raise CnaError("no operations given")
    if not templates:
        raise CnaError("no templates given")
    cases: list[Case] = []
    for op in ops:
        for d in digits:
            pairs = split_pairs(op, d, split, test_fraction, negative)
            for template in templates:
                ex = (examples or {}).get(f"{op}|{template}") or default_examples(
                    op, template, d, shots)
                prefix = format_prefix(op, template, ex, words) if shots else ""
                chosen = [p for p in pairs if p not in set(map(tuple, ex))]
                if n is not None and n < len(chosen):
                    chosen = random.Random(f"{seed}|{op}|{d}").sample(chosen, n)
                    chosen.sort()
                for a, b in chosen:
                    value = answer(op, a, b)
                    labels = {"op": op, "digits": d, "template": template, "a": a, "b": b,
                              "answer": value, "words": words}
                    cases.append(Case(format_question(op, template, a, b, words),
                                      format_answer(template, value), prefix, labels,
                                      f"{OP_NAMES[op]}-{d}-{template}-{a}-{b}", COLUMNS))
    if not cases:
        raise CnaError("the arithmetic selection is empty")
    return cases


_QUESTION = re.compile(r"^\s*(\d{1,3})\s*([-+*/])\s*(\d{1,3})\s*=\s*$")  # "a op b ="


def case_from_prompt(prompt: str, shots: int = 3) -> Case:
    """A case from a prompt: ``a op b =`` gets the arithmetic default few-shot prefix
    (``shots`` examples) and its answer as target; anything else stands alone (no target:
    the model's prediction is explained)."""
    if not prompt.strip():
        raise CnaError("empty prompt")
    m = _QUESTION.match(prompt)
    if not m:
        return Case(prompt, "", "", {"op": "custom"}, "custom")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    digits = len(str(max(a, b)))
    question = f"{a}{op}{b}="
    value = answer(op, a, b)
    prefix = (format_prefix(op, "eq", default_examples(op, "eq", digits, shots))
              if shots > 0 else "")
    labels = {"op": op, "digits": digits, "template": "eq", "a": a, "b": b, "answer": value}
    return Case(question, format_answer("eq", value), prefix, labels,
                f"{OP_NAMES[op]}-{digits}-eq-{a}-{b}")
