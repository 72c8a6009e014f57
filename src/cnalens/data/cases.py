"""Cases, the unit of data: a prompt, its target, and labels; plus case files and tokenising.

A case's prompt is ``prefix + question``: the few-shot ``prefix`` is kept apart so that
stages can share its computation between cases.

Tokenising (``encode``) works on token ids so that no answer is silently mis-scored:
the answer's tokens are those that ``prompt + target`` adds after ``prompt``'s tokens.
Leading tokens of the answer that are whitespace only (Gemma and SmolLM2 write " 8" as
" " then "8") are moved into the prompt, so the first scored token is the answer's first
real token; ``moved_space`` records it. If the tokenizer merges across the boundary
(``prompt``'s tokens are not a prefix of ``prompt + target``'s), the target is tokenised
alone and appended, and ``merged`` records it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cnalens.errors import CnaError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Case:
    """One prompt and its target; ``labels`` holds op, digits, template, operands, ...;
    ``columns``: the labels per-case tables show (None: every label)."""

    question: str
    target: str
    prefix: str = ""
    labels: dict = field(default_factory=dict, compare=False)
    case_id: str = ""
    columns: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def shown(self) -> dict:
        """The labels per-case tables show, in order."""
        if self.columns is None:
            return dict(self.labels)
        return {k: self.labels[k] for k in self.columns if k in self.labels}

    @property
    def prompt(self) -> str:
        return self.prefix + self.question


@dataclass(frozen=True)
class Encoded:
    """A case in token ids: the prompt and the answer scored by teacher forcing."""

    case: Case
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    moved_space: bool = False
    merged: bool = False

    @property
    def input_ids(self) -> list[int]:
        """What the model reads: prompt plus every answer token but the last."""
        return list(self.prompt_ids) + list(self.answer_ids[:-1])


def _ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def encode(tokenizer: PreTrainedTokenizerBase, case: Case) -> Encoded:
    """Tokenise a case (see the module docstring); CnaError if the answer is empty."""
    prompt = _ids(tokenizer, case.prompt)
    full = _ids(tokenizer, case.prompt + case.target)
    merged = full[: len(prompt)] != prompt
    answer = _ids(tokenizer, case.target, special=False) if merged else full[len(prompt):]
    moved = False
    while len(answer) > 1 and tokenizer.decode([answer[0]]).strip() == "":
        prompt.append(answer.pop(0))
        moved = True
    if not answer or tokenizer.decode(answer).strip() == "":
        raise CnaError(f"case {case.case_id or case.prompt!r}: target {case.target!r} "
                       "has no tokens to score")
    return Encoded(case, tuple(prompt), tuple(answer), moved, merged)


def encode_all(tokenizer: PreTrainedTokenizerBase, cases: Sequence[Case],
               single_token: bool = False) -> list[Encoded]:
    """Tokenise cases; with ``single_token`` every answer must be exactly one token."""
    if not cases:
        raise CnaError("no cases to evaluate (empty dataset)")
    out = [encode(tokenizer, c) for c in cases]
    if single_token:
        bad = [e for e in out if len(e.answer_ids) != 1]
        if bad:
            e = bad[0]
            toks = [tokenizer.decode([i]) for i in e.answer_ids]
            raise CnaError(f"{len(bad)} target(s) are not a single token, e.g. "
                           f"{e.case.target!r} -> {toks}")
    return out


def encode_prompt(tokenizer: PreTrainedTokenizerBase, case: Case | Encoded) -> Encoded:
    """Tokenise a case that may have no target: with one, ``encode``; without, the prompt
    alone (no answer tokens: the caller scores the model's own prediction)."""
    if isinstance(case, Encoded):
        return case
    if case.target:
        return encode(tokenizer, case)
    ids = tuple(_ids(tokenizer, case.prompt))
    if not ids:
        raise CnaError("the prompt has no tokens")
    return Encoded(case, ids, ())


def question_start(tokenizer: PreTrainedTokenizerBase, enc: Encoded) -> int:
    """Index of the case's first question token: the few-shot prefix and BOS skipped (at
    most the last prompt token)."""
    n = len(enc.prompt_ids)
    if enc.case.prefix:
        return min(n - 1, len(tokenizer(enc.case.prefix).input_ids))
    bos = getattr(tokenizer, "bos_token_id", None)
    return 1 if n > 1 and bos is not None and enc.prompt_ids[0] == bos else 0


CaseLike = str | Case | Encoded
Cases = CaseLike | Sequence[CaseLike]  # what a notebook passes where cases go
Targets = str | int | Sequence[str | int] | None


def as_encoded(tokenizer: PreTrainedTokenizerBase, items: Cases, targets: Targets = None
               ) -> list[Encoded]:
    """Cases from what a notebook holds: a prompt string, a ``Case`` or an ``Encoded``, or a
    list of them. ``targets``: one text or token id for all, or one per item (text is the
    answer, scored like a case's target; an id is the answer's first token); strings
    without one get no answer tokens (``encode_prompt``). A string's case id is the prompt
    itself (``c0``, ``c1``, ... if prompts repeat)."""
    if isinstance(items, (str, Case, Encoded)):
        items = [items]
    try:
        items = list(items)
    except TypeError:
        raise CnaError(f"a case must be a prompt string, a Case or an Encoded (or a list "
                       f"of them), not {type(items).__name__}") from None
    if not items:
        raise CnaError("no cases given (empty dataset)")
    if targets is None or isinstance(targets, (str, int)):
        targets = [targets] * len(items)
    targets = list(targets)
    if len(targets) != len(items):
        raise CnaError(f"{len(targets)} targets for {len(items)} cases")
    texts = [x for x in items if isinstance(x, str)]
    unique = len(set(texts)) == len(texts)
    out = []
    for i, (x, t) in enumerate(zip(items, targets, strict=True)):
        if isinstance(x, str):
            x = Case(x, "", "", {}, x if unique else f"c{i}")
        elif not isinstance(x, (Case, Encoded)):
            raise CnaError(f"a case must be a prompt string, a Case or an Encoded, not "
                           f"{type(x).__name__}")
        if isinstance(x, Encoded) and isinstance(t, int) and not isinstance(t, bool):
            out.append(Encoded(x.case, x.prompt_ids, (int(t),)))  # scored on token t
            continue
        if t is not None and isinstance(x, Encoded):
            raise CnaError("targets= cannot retarget encoded cases with text: pass strings "
                           "or Cases, or a token id")
        if isinstance(t, str):
            x = replace(x, target=t)
        elif t is not None:
            e = encode_prompt(tokenizer, replace(x, target=""))
            out.append(Encoded(e.case, e.prompt_ids, (int(t),)))
            continue
        out.append(encode_prompt(tokenizer, x))
    return out


def _label(value):
    """A label value as a table cell: lists and objects as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def load_cases(path: str | Path) -> list[Case]:
    """Read a JSONL or CSV case file with ``prompt`` and ``target``; every other column is
    a label (``case_id`` names the case). No label is added: a file without ``op`` has none."""
    path = Path(path)
    if not path.is_file():
        raise CnaError(f"case file not found: {path}")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise CnaError(f"case file {path}: every line must be a JSON object")
            df = pd.DataFrame(rows)
            records = rows  # as written: a key missing from a line is no label there
        elif path.suffix.lower() in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",",
                             dtype=str, keep_default_na=False)
            records = df.to_dict("records")
        else:
            raise CnaError(f"case file {path}: use .jsonl or .csv")
    except CnaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is one user-facing line
        raise CnaError(f"cannot read case file {path}: {exc}") from None
    if df.empty:
        raise CnaError(f"case file {path} has no cases")
    missing = [c for c in ("prompt", "target") if c not in df.columns]
    if missing:
        raise CnaError(f"case file {path} lacks column(s): {', '.join(missing)}")
    cases = []
    for i, row in enumerate(records):
        row = dict(row)
        prompt, target = row.pop("prompt", None), row.pop("target", None)
        if not isinstance(prompt, str) or not isinstance(target, str) or not target:
            raise CnaError(f"case file {path}, case {i + 1}: prompt and target must be text")
        labels = {k: _label(v) for k, v in row.items() if k != "case_id"}
        cases.append(Case(prompt, target, "", labels, str(row.get("case_id", f"c{i}"))))
    return cases
