"""Datasets: arithmetic generators and user case files, as lists of ``Case``."""

from cnalens.data.arithmetic import OPS, TEMPLATES, arithmetic_cases
from cnalens.data.cases import (
    Case,
    Encoded,
    as_encoded,
    encode,
    encode_all,
    encode_prompt,
    load_cases,
)

__all__ = ["OPS", "TEMPLATES", "Case", "Encoded", "arithmetic_cases", "as_encoded", "encode",
           "encode_all", "encode_prompt", "load_cases"]
