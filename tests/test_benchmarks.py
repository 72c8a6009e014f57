"""The benchmarks' GPU paths (Llama-7B-shaped, random weights) run on CPU at a tiny scale and
must give the same numbers as their references: the head scan equals the naive loop, the
exhaustive neuron scores equal the per-neuron loop. TransformerLens's loop (an optional
dependency) must give cnalens's per-case results."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import head_scan  # noqa: E402
import neuron_scores  # noqa: E402
from llama_shaped import llama_config, llama_view, shaped_cases  # noqa: E402

from cnalens.heads import scan_fast, scan_naive  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SCALE = "0.01"


def _run(main, argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    main()
    return capsys.readouterr().out


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return float(m.group(1))


def test_llama_config_shapes():
    full = llama_config(1.0)
    assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads,
            full.intermediate_size, full.vocab_size) == (4096, 32, 32, 11008, 32000)
    small = llama_config(0.01)
    assert small.num_attention_heads == 32 and small.num_hidden_layers == 2
    assert small.hidden_size == 64 and small.intermediate_size == 110


def test_shaped_cases_share_a_prefix():
    enc = shaped_cases(32000, n=10, prefix_len=20, seed=1)
    assert len(enc) == 10
    assert all(e.prompt_ids[:20] == enc[0].prompt_ids[:20] for e in enc)
    assert {len(e.prompt_ids) for e in enc} <= {24, 25, 26}
    assert all(len(e.answer_ids) == 1 and min(e.prompt_ids[1:]) >= 3 for e in enc)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_scan_llama_path(dtype, monkeypatch, capsys):
    out = _run(head_scan.main, ["--llama7b", "--llama-scale", SCALE, "--llama-dtype", dtype,
                                "--llama-cases", "24", "--naive-heads", "4"],
               monkeypatch, capsys)
    assert "2 layers x 32 heads" in out and "64 heads" in out
    assert "timed on 4 heads spread over the depth, EXTRAPOLATED" in out
    assert _num(r"disagreements (\d+)", out) == 0
    assert _num(r"max \|dlogp\| (\S+)", out) < (1e-5 if dtype == "float32" else 2e-2)
    if dtype == "float32":
        assert _num(r"near ties, margin < \S+: (\d+)", out) == 0
    assert "target: under 10 s" in out
    assert out.strip().splitlines()[-1].startswith("speedup naive/cnalens: ")


def test_head_scan_compare_catches_a_difference():
    """The agreement check can fail: one changed prediction is one disagreement."""
    view = llama_view(0.01, dtype="float32")
    enc = shaped_cases(view.vocab_size, n=12)
    heads = [(0, 3), (1, 30)]
    naive = scan_naive(view, enc, heads, batch_size=12)
    fast = scan_fast(view, enc, heads)
    assert head_scan.compare(naive, fast)[0] == 0
    fast.ablated = {k: v.clone() for k, v in fast.ablated.items()}
    fast.ablated["pred"][1, 5] += 1
    fast.ablated["margin"][1, 5] = 1.0
    assert head_scan.compare(naive, fast)[0] == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_neuron_scores_llama_path(dtype, monkeypatch, capsys):
    out = _run(neuron_scores.main, ["--llama7b", "--llama-scale", SCALE, "--llama-dtype", dtype,
                                    "--sample", "24"], monkeypatch, capsys)
    assert "timed on a random sample of 24 neurons, EXTRAPOLATED to 220" in out
    assert "computed in torch.float32" in out  # the lens stays float32 for bf16 weights
    assert _num(r"([\d.]+) GFLOP/s", out) > 0
    assert _num(r"max \|diff\| (\S+)", out) < (1e-5 if dtype == "float32" else 1e-4)
    assert "target: under 0.2 s" in out
    assert out.strip().splitlines()[-1].startswith("exhaustive vs loop speedup: ")


def test_neuron_loop_equals_exhaustive_on_bf16():
    """The sampled loop and the exhaustive scores, compared directly (bf16 weights)."""
    from cnalens import scores as S
    from cnalens import states as ST

    view = llama_view(0.01, dtype="bfloat16", seed=3)
    enc = shaped_cases(view.vocab_size, n=1, seed=3)
    st = ST.case_states(view, enc)
    units = neuron_scores.sample_units(view, [0, 1], 16, seed=2)
    loop = neuron_scores.loop_scores(view, st, units, int(st.pred[0]))
    sc = S.score_neurons(view, enc, progress=False, states=st)
    ex = torch.tensor([float(sc.imp[0, a, b]) for a, b in units])
    assert sc.imp.dtype == torch.float32
    assert float(ex.abs().max()) > 1e-4  # not all zero: the comparison means something
    assert torch.allclose(ex, torch.as_tensor(loop, dtype=torch.float32), atol=1e-4)


def test_transformer_lens_flag_without_the_package(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_lens" else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["bench", "--transformer-lens"])
    with pytest.raises(SystemExit) as e:
        head_scan.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformer-lens==4.3.0" in err[0]


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("transformer_lens") is None,
                    reason="TransformerLens is an optional benchmark dependency")
def test_transformer_lens_loop_matches_cnalens(gemma):
    """TL's run_with_hooks zeroing a head at o.hook_in gives the naive loop's results."""
    from cnalens.data import arithmetic_cases, encode_all

    enc = encode_all(gemma.tokenizer, arithmetic_cases(ops=("+", "*"), digits=(1,),
                                                       templates=("eq",), n=6, seed=0))
    heads = [(7, 0), (12, 0)]
    bridge = head_scan.tl_bridge(gemma)
    tl = head_scan.scan_tl(bridge, gemma, enc, heads, batch_size=6)
    naive = scan_naive(gemma, enc, heads, batch_size=6)
    bad, _, dl = head_scan.compare(naive, tl)
    assert bad == 0 and dl < 1e-3
    # zeroing a head changes the logits: TL's hook really intervenes
    assert float((tl.ablated["logp"] - tl.orig["logp"][None]).abs().max()) > 1e-3
