"""The same numbers on a GPU as on the CPU: the notebook API on tiny float64 models and
every command on a tiny float32 model saved to a folder, run with ``--device cuda``.

Skipped where there is no CUDA device (CI); run on a GPU machine with
``pytest tests/test_cuda.py``. ``CNALENS_TEST_DEVICE=cpu`` runs the same comparisons
CPU against CPU, to check the test itself anywhere.
"""

from __future__ import annotations

import copy
import os

import pandas as pd
import pytest
import torch

import cnalens
from cnalens.cli import main
from cnalens.data.cases import Case
from cnalens.interventions import ZeroHeads, ZeroNeurons
from cnalens.models import ModelView
from cnalens.scores import score_heads
from test_new_families import _own_cases, _save, run_every_command
from tiny import TinyTokenizer, tiny_model

DEVICE = os.environ.get("CNALENS_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device")

CASES = [Case("3+5=", "8", case_id="a"), Case("12+30=", "42", case_id="b"),
         Case("7*8=", "56", case_id="c"), Case("9-4=", "5", case_id="d")]
FAMILIES = ["llama", "qwen2", "gemma3", "mixtral"]


def _views(family: str) -> tuple[ModelView, ModelView]:
    model = tiny_model(family)
    other = copy.deepcopy(model).to(DEVICE)
    return (ModelView(model, TinyTokenizer(), {"spec": family}),
            ModelView(other, TinyTokenizer(), {"spec": family}))


@pytest.mark.parametrize("family", FAMILIES)
def test_api_same_numbers(family):
    cpu, dev = _views(family)
    assert dev.device.type == torch.device(DEVICE).type
    # Tolerances: log-probs are kept in float32, and transformers computes the rotary
    # embeddings' cos/sin in float32 on either device (their last bits differ), so float32
    # agreement is what a float64 model can show here.
    # evaluation, plain and under an intervention
    for ivs in ((), (ZeroNeurons([(1, 3), (2, 5)]),)):
        a = cnalens.evaluate(cpu, CASES, *ivs, progress=False)
        b = cnalens.evaluate(dev, CASES, *ivs, progress=False)
        pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-5)
    # the head scan (dlogp: a difference of float32 log-probs)
    a = cnalens.scan_heads(cpu, CASES, progress=False)
    b = cnalens.scan_heads(dev, CASES, progress=False)
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-5)
    # CNA: exhaustive and certified top-K
    iv = ZeroHeads([(1, 0)])
    ea = cnalens.cna(cpu, CASES, intervention=iv)
    eb = cnalens.cna(dev, CASES, intervention=iv)
    assert eb.diff.device.type == "cpu"  # results live on the CPU
    torch.testing.assert_close(ea.diff, eb.diff, rtol=1e-5, atol=1e-5, equal_nan=True)
    ka = cnalens.cna(cpu, CASES, intervention=iv, k=6)
    kb = cnalens.cna(dev, CASES, intervention=iv, k=6)
    assert ka.meta["scoring"] == kb.meta["scoring"] == "certified"
    pd.testing.assert_frame_equal(ka.frame(), kb.frame(), rtol=1e-5, atol=1e-5)
    # on the device itself, certified and exhaustive agree as tightly as on the CPU
    pd.testing.assert_frame_equal(kb.frame(), eb.frame(6), rtol=1e-9, atol=1e-10)
    assert all(t is None or t.device.type == "cpu" for t in (kb.route_a, kb.route_b))
    # input comparisons: exhaustive, certified and screened
    pa, pb = ["3+5=", "2+2="], ["3*5=", "2*2="]
    for kw in ({}, {"k": 5}, {"k": 4, "screen": 9}):
        a = cnalens.cna(cpu, pa, pb, target="8", **kw)
        b = cnalens.cna(dev, pa, pb, target="8", **kw)
        pd.testing.assert_frame_equal(a.frame(4), b.frame(4), rtol=1e-5, atol=1e-5)
    # head and attention-neuron importances
    a = score_heads(cpu, CASES, progress=False)
    b = score_heads(dev, CASES, progress=False)
    pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-5)


def _tables(out) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(out / name) for name in
            ("eval.csv", "heads.csv", "cna_neurons.csv", "neuron.csv", "explain.csv",
             "mean/neuron.csv")}


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_every_command_same_tables(family, tmp_path, monkeypatch, capsys):
    """Every command with ``--device cuda`` succeeds, and the tables that involve no
    training equal the CPU's (float32: reduction order differs, so a tolerance)."""
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    view = _save(family, model)
    cases = tmp_path / "cases.jsonl"
    _own_cases(view, cases)
    tables = {}
    for folder, extra in (("cpu", []), ("dev", ["--device", DEVICE])):
        out = run_every_command(model, tmp_path, cases, ["1.3"], capsys, extra=extra,
                                folder=folder)
        # a neuron read through an attention layer at the prompts' mean scales (no case)
        assert main(["neuron", "--model", str(model), "-q", "1.3", "--transform-layer", "2",
                     "--k", "3", "--out", str(out / "mean"), *extra]) == 0
        tables[folder] = _tables(out)
    for name, a in tables["cpu"].items():
        pd.testing.assert_frame_equal(a, tables["dev"][name], rtol=1e-4, atol=1e-5, obj=name)
