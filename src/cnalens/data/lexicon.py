"""The concept lexicon of the zero-shot locator: numbers and arithmetic operators.

Categories: ``digit`` (tokens made only of ASCII digits), ``number_word`` (0..100 in
English, French, German, Italian and Spanish), ``roman`` (numerals II..XCIX for 2..100),
``ordinal`` (first..hundredth, 1st..100th, and 1..10 plus the tens in the four other
languages) and ``operator`` (+ - * / x = and their words).

Matching rule (:func:`concept_of`): a token matches if the WHOLE token, after stripping
the tokenizer's space marker (``▁``, ``Ġ`` or a leading space), is a lexicon entry:
- number words, ordinals and operator words case-insensitively (``Eight`` = ``eight``),
  accents optional (``dieciseis`` = ``dieciséis``);
- roman numerals in upper case only and with at least two letters, so the pronoun ``I``,
  ``V``, ``X`` and words like ``mix`` or ``Mix`` never count;
- no prefixes or suffixes: ``eightfold``, ``eighty-ish`` and ``8th-grade`` are not numbers.
Forms that are far more often something else are left out (:data:`AMBIGUOUS`): the
articles un/une/una/ein/eine and the English words once, due, elf, null, cent.

:func:`concept_table` classifies a whole vocabulary once per tokenizer (cached), so
matching the top tokens of thousands of neurons is one index lookup.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CATEGORIES = ("none", "digit", "number_word", "roman", "ordinal", "operator")
MARKERS = ("▁", "Ġ", " ")
AMBIGUOUS = frozenset({"un", "une", "una", "ein", "eine", "once", "due", "elf", "null",
                       "cent"})

# ----------------------------------------------------------------------- number words
_EN = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
       "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_T = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_FR = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze "
       "quinze seize dix-sept dix-huit dix-neuf").split()
_FR_T = "_ _ vingt trente quarante cinquante soixante".split()
_DE = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn "
       "vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn").split()
_DE_T = "_ _ zwanzig dreißig vierzig fünfzig sechzig siebzig achtzig neunzig".split()
_IT = ("zero uno due tre quattro cinque sei sette otto nove dieci undici dodici tredici "
       "quattordici quindici sedici diciassette diciotto diciannove").split()
_IT_T = "_ _ venti trenta quaranta cinquanta sessanta settanta ottanta novanta".split()
_ES = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce "
       "quince dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós "
       "veintitrés veinticuatro veinticinco veintiséis veintisiete veintiocho "
       "veintinueve").split()
_ES_T = "_ _ veinte treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()


def _english(n: int) -> list[str]:
    if n < 20:
        return [_EN[n]]
    if n == 100:
        return ["hundred", "one-hundred"]
    t, u = divmod(n, 10)
    return [_EN_T[t]] if u == 0 else [f"{_EN_T[t]}-{_EN[u]}", f"{_EN_T[t]}{_EN[u]}"]


def _french(n: int) -> list[str]:
    if n < 20:
        return [_FR[n]]
    if n == 100:
        return ["cent"]
    t, u = divmod(n, 10)
    if n < 70:
        if u == 0:
            return [_FR_T[t]]
        return [f"{_FR_T[t]}-et-un"] if u == 1 else [f"{_FR_T[t]}-{_FR[u]}"]
    if n < 80:
        rest = n - 60
        return ["soixante-et-onze"] if rest == 11 else [f"soixante-{_FR[rest]}"]
    rest = n - 80
    return ["quatre-vingts", "quatre-vingt"] if rest == 0 else [f"quatre-vingt-{_FR[rest]}"]


def _german(n: int) -> list[str]:
    if n < 20:
        return [_DE[n]] + (["ein"] if n == 1 else [])
    if n == 100:
        return ["hundert", "einhundert"]
    t, u = divmod(n, 10)
    if u == 0:
        return [_DE_T[t]]
    unit = "ein" if u == 1 else _DE[u]
    return [f"{unit}und{_DE_T[t]}"]


def _italian(n: int) -> list[str]:
    if n < 20:
        return [_IT[n]]
    if n == 100:
        return ["cento"]
    t, u = divmod(n, 10)
    if u == 0:
        return [_IT_T[t]]
    tens = _IT_T[t][:-1] if u in (1, 8) else _IT_T[t]  # venti + uno -> ventuno
    unit = "tré" if u == 3 else _IT[u]
    return [tens + unit] + ([tens + "tre"] if u == 3 else [])


def _spanish(n: int) -> list[str]:
    if n < 30:
        return [_ES[n]]
    if n == 100:
        return ["cien", "ciento"]
    t, u = divmod(n, 10)
    return [_ES_T[t]] if u == 0 else []  # 31.. are three words ("treinta y uno")


def number_words() -> dict[str, int]:
    """Every number word 0..100 in the five languages, casefolded, accents kept."""
    out: dict[str, int] = {}
    for n in range(101):
        for fn in (_english, _french, _german, _italian, _spanish):
            for w in fn(n):
                out.setdefault(w.casefold(), n)
    return out


# ----------------------------------------------------------------------- ordinals
_EN_ORD = ("zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh "
           "twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth "
           "nineteenth").split()
_EN_ORD_T = "_ _ twentieth thirtieth fortieth fiftieth sixtieth seventieth eightieth " \
            "ninetieth".split()
_OTHER_ORD = {
    # French, German (with the usual endings), Italian, Spanish: 1..10 and tens
    1: "premier première erste primo prima primero primera",
    2: "deuxième second seconde zweite secondo seconda segundo segunda",
    3: "troisième dritte terzo terza tercero tercera",
    4: "quatrième vierte quarto quarta cuarto cuarta",
    5: "cinquième fünfte quinto quinta",
    6: "sixième sechste sesto sesta sexto sexta",
    7: "septième siebte settimo settima séptimo séptima",
    8: "huitième achte ottavo ottava octavo octava",
    9: "neuvième neunte nono nona noveno novena",
    10: "dixième zehnte decimo decima décimo décima",
    20: "vingtième zwanzigste ventesimo vigésimo",
    100: "centième hundertste centesimo centésimo",
}


def _suffix(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def ordinals() -> dict[str, int]:
    out: dict[str, int] = {}
    for n in range(101):
        out[f"{n}{_suffix(n)}"] = n
        if n < 20:
            out[_EN_ORD[n]] = n
        elif n == 100:
            out["hundredth"] = n
        else:
            t, u = divmod(n, 10)
            if u == 0:
                out[_EN_ORD_T[t]] = n
            else:
                out[f"{_EN_T[t]}-{_EN_ORD[u]}"] = n
    for n, words in _OTHER_ORD.items():
        for w in words.split():
            out.setdefault(w.casefold(), n)
            if w in ("erste", "zweite", "dritte", "vierte", "fünfte", "sechste", "siebte",
                     "achte", "neunte", "zehnte", "zwanzigste", "hundertste"):
                for end in ("r", "s", "n", "m"):
                    out.setdefault((w + end).casefold(), n)
    return out


# ----------------------------------------------------------------------- roman numerals
def roman(n: int) -> str:
    vals = ((100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"),
            (4, "IV"), (1, "I"))
    out = ""
    for v, s in vals:
        while n >= v:
            out += s
            n -= v
    return out


ROMAN = {roman(n): n for n in range(1, 101) if len(roman(n)) >= 2}

# ----------------------------------------------------------------------- operators
OPERATOR_SYMBOLS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "/": "/",
                    "÷": "/", "=": "="}
OPERATOR_WORDS = {
    "+": "plus add adds added adding addition sum sums più más",
    "-": "minus subtract subtracts subtracted subtracting subtraction difference moins meno "
         "menos",
    "*": "times multiply multiplies multiplied multiplying multiplication product fois",
    "/": "divide divides divided dividing division quotient ratio diviso dividido divisé",
    "=": "equals equal equaled égal uguale igual",
}


def _fold(s: str) -> str:
    return s.casefold()


def _strip_accents(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))


def _build() -> dict[str, tuple[str, str]]:
    """casefolded entry -> (category, concept); accent-free variants included."""
    table: dict[str, tuple[str, str]] = {}

    def add(word: str, cat: str, concept: str) -> None:
        for w in {_fold(word), _fold(_strip_accents(word))}:
            if w not in AMBIGUOUS:
                table.setdefault(w, (cat, concept))

    for w, n in number_words().items():
        add(w, "number_word", str(n))
    for w, n in ordinals().items():
        add(w, "ordinal", str(n))
    for op, words in OPERATOR_WORDS.items():
        for w in words.split():
            add(w, "operator", op)
    return table


_WORDS = _build()


def strip_marker(token: str) -> str:
    """The token without its leading space marker (one of ``▁``, ``Ġ``, a space)."""
    for m in MARKERS:
        if token.startswith(m):
            return token[len(m):]
    return token


def concept_of(token: str) -> tuple[str, str] | None:
    """``(category, concept)`` of a token string (with its space marker), or None.

    ``concept`` is the number as text (``"8"``) or the operator symbol (``"+"``)."""
    t = strip_marker(token)
    if not t:
        return None
    if t.isascii() and t.isdigit():
        return "digit", str(int(t)) if len(t) < 30 else t
    if t in ROMAN:  # case-sensitive: upper case only, >= 2 letters
        return "roman", str(ROMAN[t])
    if t in OPERATOR_SYMBOLS:
        return "operator", OPERATOR_SYMBOLS[t]
    return _WORDS.get(_fold(t))


# ----------------------------------------------------------------------- vocabularies
_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE token strings -> bytes)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
              + list(range(ord("®"), ord("ÿ") + 1)))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return _BYTE_DECODER


def token_strings(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str]:
    """Each token id's surface string with its space marker as a leading space.

    SentencePiece pieces (``▁``) and byte-level BPE pieces (``Ġ``, bytes mapped to
    characters) are decoded without the tokenizer's clean-ups; ids beyond the tokenizer's
    vocabulary are empty strings; a tokenizer without ``convert_ids_to_tokens`` is asked
    to ``decode`` each id."""
    n = vocab_size
    conv = getattr(tokenizer, "convert_ids_to_tokens", None)
    if conv is None:
        return [tokenizer.decode([i]) for i in range(n)]
    size = min(n, len(tokenizer))
    pieces = [p if isinstance(p, str) else "" for p in conv(list(range(size)))]
    pieces += [""] * (n - size)
    byte_level = sum(p.startswith("Ġ") for p in pieces) > sum(p.startswith("▁") for p in pieces)
    if not byte_level:
        return [p.replace("▁", " ") for p in pieces]
    dec = _byte_decoder()
    out = []
    for p in pieces:
        try:
            out.append(bytes(dec[c] for c in p).decode("utf-8"))
        except (KeyError, UnicodeDecodeError):
            out.append(p)
    return out


@dataclass
class ConceptTable:
    """Per token id: its category code (index into :data:`CATEGORIES`, 0 = none) and its
    concept (``""`` if none)."""

    category: torch.Tensor  # (V,) long
    concept: list[str]

    @property
    def mask(self) -> torch.Tensor:
        return self.category > 0

    def ids(self) -> torch.Tensor:
        """The ids of every concept token."""
        return self.mask.nonzero().flatten()

    def count(self, ids: torch.Tensor) -> torch.Tensor:
        """Concept tokens among each row of token ids (n, k): (n,)."""
        return self.mask.to(ids.device)[ids].sum(-1)


_CACHE: dict[int, tuple[object, int, ConceptTable]] = {}


def concept_table(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> ConceptTable:
    """The vocabulary classified once per tokenizer (cached)."""
    hit = _CACHE.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1] == vocab_size:
        return hit[2]
    cat = torch.zeros(vocab_size, dtype=torch.long)
    concept = [""] * vocab_size
    for i, s in enumerate(token_strings(tokenizer, vocab_size)):
        c = concept_of(s)
        if c is not None:
            cat[i] = CATEGORIES.index(c[0])
            concept[i] = c[1]
    table = ConceptTable(cat, concept)
    _CACHE[id(tokenizer)] = (tokenizer, vocab_size, table)
    return table


def default_probe_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[int]:
    """Token ids of the digits 0-9 and the operator symbols + - * / = (no space marker),
    those the vocabulary has as single tokens."""
    strings = token_strings(tokenizer, vocab_size)
    want = [str(d) for d in range(10)] + ["+", "-", "*", "/", "="]
    first = {}
    for i, s in enumerate(strings):
        if s in want and s not in first:
            first[s] = i
    return [first[w] for w in want if w in first]
