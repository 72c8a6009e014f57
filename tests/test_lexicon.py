"""The concept lexicon: what matches, what does not, and the vocabulary tables."""

import pytest
import torch

from cnalens.data.lexicon import (
    CATEGORIES,
    concept_of,
    concept_table,
    default_probe_tokens,
    roman,
    token_strings,
)
from tiny import VOCAB, TinyTokenizer


@pytest.mark.parametrize("token, expected", [
    ("8", ("digit", "8")), ("▁8", ("digit", "8")), ("Ġ8", ("digit", "8")), (" 8", ("digit", "8")),
    ("365", ("digit", "365")),
    ("eight", ("number_word", "8")), ("▁Eight", ("number_word", "8")),
    ("EIGHT", ("number_word", "8")), ("huit", ("number_word", "8")),
    ("acht", ("number_word", "8")), ("otto", ("number_word", "8")),
    ("ocho", ("number_word", "8")), ("Ġdieciséis", ("number_word", "16")),
    ("dieciseis", ("number_word", "16")), ("dreißig", ("number_word", "30")),
    ("twenty-one", ("number_word", "21")), ("einundzwanzig", ("number_word", "21")),
    ("ventuno", ("number_word", "21")), ("quatre-vingt-dix", ("number_word", "90")),
    ("hundred", ("number_word", "100")), ("zero", ("number_word", "0")),
    ("VIII", ("roman", "8")), ("▁XII", ("roman", "12")), ("XC", ("roman", "90")),
    ("II", ("roman", "2")),
    ("third", ("ordinal", "3")), ("▁3rd", ("ordinal", "3")), ("11th", ("ordinal", "11")),
    ("troisième", ("ordinal", "3")), ("dritte", ("ordinal", "3")), ("dritten", ("ordinal", "3")),
    ("+", ("operator", "+")), ("▁plus", ("operator", "+")), ("Minus", ("operator", "-")),
    ("×", ("operator", "*")), ("÷", ("operator", "/")), ("=", ("operator", "=")),
    ("divided", ("operator", "/")), ("times", ("operator", "*")),
])
def test_matches(token, expected):
    assert concept_of(token) == expected


@pytest.mark.parametrize("token", [
    "I", "▁I", "V", "X", "C",  # one-letter roman numerals (the pronoun I) never count
    "mix", "Mix", "vi", "xii", "Viii", "civ",  # roman numerals are upper case only
    "MIX", "MM",  # beyond 100
    "eightfold", "eighty-ish", "8th-grade", "▁eights", "Eighteens",  # whole tokens only
    "8.5", "8a", "٣", "²",  # not ASCII digits only
    "un", "une", "ein", "eine", "once", "due", "elf", "null", "cent",  # ambiguous forms
    "", "▁", "the", "▁and", "++", "--", "==", "x",
    "▁▁8",  # one space marker is stripped, not two
])
def test_does_not_match(token):
    assert concept_of(token) is None


def test_roman_numerals():
    assert [roman(n) for n in (1, 4, 9, 14, 40, 49, 90, 99, 100)] == [
        "I", "IV", "IX", "XIV", "XL", "XLIX", "XC", "XCIX", "C"]


def test_table_is_cached_and_vectorised():
    tok = TinyTokenizer()
    table = concept_table(tok, VOCAB)
    assert concept_table(tok, VOCAB) is table
    strings = token_strings(tok, VOCAB)
    expect = torch.tensor([concept_of(s) is not None for s in strings])
    assert torch.equal(table.mask, expect) and expect.any()
    ids = torch.tensor([[3 + ord("8") % (VOCAB - 3), 3 + ord("a") % (VOCAB - 3)]])
    assert table.count(ids).tolist() == [1]
    assert CATEGORIES[int(table.category[ids[0, 0]])] == "digit"
    assert table.concept[int(ids[0, 0])] == "8"


def test_byte_level_strings_decode_accents():
    class ByteTok:
        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return ["Ġdieci" + "sÃ©is", "Ġeight", "eight"][:len(ids)]

    strings = token_strings(ByteTok(), 4)
    assert strings == [" dieciséis", " eight", "eight", ""]


def test_probe_tokens():
    tok = TinyTokenizer()
    ids = default_probe_tokens(tok, VOCAB)
    assert [tok.decode([i]) for i in ids][:10] == [str(d) for d in range(10)]
