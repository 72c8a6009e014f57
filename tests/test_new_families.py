"""Phi-3/Phi-4 (fused q|k|v with grouped-query sizes, fused gate|up) and OLMo-2 (norms after
the sublayers only, q/k norms): what the family tables say, checked by hand, and every
command run on a tiny random model of each, saved to a folder as a user would load it.

The invariant tests every family passes (``tests/test_view.py``, ``test_scores.py``,
``test_prune.py``, ``test_lora.py``, ...) run on both through ``tiny.FAMILY_NAMES`` or
their family lists."""

from __future__ import annotations

import json
import sys
import traceback

import pandas as pd
import pytest
import torch

from cnalens.cli import main
from cnalens.errors import CnaError
from cnalens.interventions import ZeroHeads
from cnalens.models import ModelView
from cnalens.models.families import OLMO2, PHI3, family_for
from cnalens.models.pruned import prune_ffn
from cnalens.models.view import NO_NORM
from tiny import TinyTokenizer, char_tokenizer, tiny_model

NEW = ["phi3", "olmo2"]
SEQS = [[1, 5, 9, 13, 7, 22], [1, 40, 3, 3, 17, 9]]


def _view(name: str) -> ModelView:
    return ModelView(tiny_model(name), TinyTokenizer(), {"spec": name})


def test_tables_and_the_unsupported_message():
    assert family_for(tiny_model("phi3").config) is PHI3
    assert family_for(tiny_model("olmo2").config) is OLMO2
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=20, is_decoder=True)
    with pytest.raises(CnaError, match="unsupported model family 'bert'") as err:
        family_for(cfg)
    assert len(str(err.value).splitlines()) == 1
    assert "olmo2" in str(err.value) and "phi3" in str(err.value)


def test_phi3_value_block_has_grouped_query_sizes():
    """W_V of KV head g is rows (H + KV + g) * hd .. of qkv_proj (q: H heads, k and v: KV
    heads each): the view's split is those rows, and zeroing them by hand equals zeroing
    the query heads that read KV head g (z is their attention output)."""
    v = _view("phi3")
    layer, g = 1, 1
    H, KV, hd = v.n_heads, v.n_kv_heads, v.head_dim
    qkv = v.module(layer, "v_proj").weight
    assert qkv.shape[0] == (H + 2 * KV) * hd and KV < H
    rows = slice((H + KV + g) * hd, (H + KV + g + 1) * hd)
    assert torch.equal(v.v_proj_by_head(layer)[g], qkv[rows])
    group = H // KV
    b = v.batch(SEQS)
    with torch.no_grad():
        with v.intervene(ZeroHeads([(layer, h) for h in range(g * group, (g + 1) * group)])):
            hooked = v.hidden(b)
        saved = qkv.detach().clone()
        qkv[rows] = 0
        by_hand = v.hidden(b)
        qkv.copy_(saved)
    torch.testing.assert_close(hooked, by_hand, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NEW)
def test_values_are_the_attention_input_through_w_v(name):
    """The values the attention reads are its input times W_V: for OLMo-2 the residual
    itself (no norm before attention; ``norm`` gives the identity ``NO_NORM``), untouched
    by the q/k norms; for Phi-3 the normed residual through the v block of qkv_proj."""
    v = _view(name)
    b = v.batch(SEQS)
    with torch.no_grad(), v.attention_record([1]) as rec, v.capture(["resid_pre"], [1]) as c:
        v.hidden(b)
    x = c[("resid_pre", 1)]
    ln = v.norm(1, "ln_attn")
    assert (ln is NO_NORM) == (name == "olmo2")
    xn = ln(x)
    want = torch.einsum("btd,ked->bkte", xn, v.v_proj_by_head(1))
    torch.testing.assert_close(rec[1][1], want, rtol=0, atol=1e-10)


def test_olmo2_norms():
    """No pre-norms: the identity with gain and scale 1 (ln_ffn too, though the blocks are
    sequential); the post norms are real; q_norm spans all heads at once."""
    v = _view("olmo2")
    x = torch.randn(3, v.d_model, dtype=torch.float64)
    for which in ("ln_attn", "ln_ffn"):
        n = v.norm(0, which)
        assert n is NO_NORM and torch.equal(v.frozen_norm(n, x, 7 * x), x)
        gain, scale, bias, centred = v.norm_affine(n, x)
        assert torch.equal(gain, torch.ones(v.d_model, dtype=x.dtype)) and bias is None
        assert torch.equal(scale, torch.ones(3, 1, dtype=x.dtype)) and not centred
    assert v.norm(0, "ln_attn_post") is v.module(0, "attn_out")
    assert not v.family.parallel and v.summary()["pre_sublayer_norms"] is False
    attn = v.module(0, "attn")
    assert attn.q_norm.weight.shape == (v.n_heads * v.head_dim,)
    assert attn.k_norm.weight.shape == (v.n_kv_heads * v.head_dim,)


def test_phi3_pruning_keeps_gate_and_up_rows():
    v = _view("phi3")
    F = v.ffn_width(1)
    w = v.ffn_in(1)[0].weight.detach().clone()
    assert w.shape[0] == 2 * F
    keep = torch.tensor([7, 0, 33])
    assert v.ffn_in_rows(1, keep).tolist() == [7, 0, 33, F + 7, F, F + 33]
    prune_ffn(v, {1: keep})
    idx = keep.sort().values
    assert torch.equal(v.ffn_in(1)[0].weight, torch.cat([w[idx], w[F + idx]]))
    assert v.ffn_in(1)[0].out_features == 6 and v.ffn_width(1) == 3


def test_phi3_debias_edit_zeroes_gate_and_up_rows():
    from cnalens.apps.debias import zero_edited

    v = _view("phi3")
    F = v.ffn_width(1)
    w = v.ffn_in(1)[0].weight
    before = w.detach().clone()
    with zero_edited(v, [(1, 4), (1, 9)], inputs=True):
        for row in (4, 9, F + 4, F + 9):
            assert (w[row] == 0).all()
        assert torch.equal(w[5], before[5]) and torch.equal(w[F + 5], before[F + 5])
    assert torch.equal(w, before)


# --------------------------------------------------------------------------- every command
def _save(name: str, path) -> ModelView:
    """A tiny model of ``name`` (float32) with a one-character tokenizer, saved to ``path``."""
    tok = char_tokenizer()
    model = tiny_model(name, dtype=torch.float32, vocab=len(tok))
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id = None, None, 1
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return ModelView(model, tok)


def _own_cases(view: ModelView, path) -> None:
    """A case file whose targets are the model's own greedy answers (so CNA has cases the
    random model answers correctly)."""
    rows = []
    for a in range(1, 10):
        for op in "+-":
            prompt = f"{a}{op}{9 - a}="
            ids = view.tokenizer(prompt).input_ids
            with torch.no_grad():
                top = int(view.last_logits(view.batch([ids]))[0, -1].argmax())
            text = view.tokenizer.decode([top])
            if text.isalnum() and len(text) == 1:
                rows.append({"prompt": prompt, "target": text})
    assert len(rows) >= 2, rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_every_command(model, tmp_path, cases, neurons, capsys, extra=(), folder="out"):
    """Every command on the tiny model saved in ``model`` (``cases``: a case file of its
    own answers; ``neurons``: names for ``neuron``; ``extra``: options every command gets,
    e.g. ``--device cuda``); each must succeed and write its table. Returns the results
    folder, ``tmp_path/folder``."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt_a": "he is a", "prompt_b": "she is a", "targets": ["x", "y"]}\n'
                     '{"prompt_a": "his job:", "prompt_b": "her job:", "targets": ["x", "y"],'
                     ' "split": "heldout"}\n')
    out = tmp_path / folder
    m = ["--model", str(model), "-q", *extra]
    commands = {
        "info": (["info", "--model", str(model), *extra], None),
        "eval": (["eval", *m, "--ops", "+", "--n", "3", "--out", str(out)], "eval.csv"),
        "heads": (["heads", *m, "--ops", "+", "--n", "3", "--out", str(out)], "heads.csv"),
        "cna": (["cna", *m, "--cases", str(cases), "--head", "1.1", "--top-k", "2",
                 "--seeds", "1", "--out", str(out)], "cna_neurons.csv"),
        "neuron": (["neuron", *m, *neurons, "--case", "3+5=", "--transform-layer", "2", "--k",
                    "3", "--out", str(out)], "neuron.csv"),
        "shallow": (["shallow", *m, "--deep-from", "2", "--null", "8", "--n", "2", "--seeds",
                     "1", "--m", "1", "--top-tokens", "5", "--out", str(out)], "shallow.csv"),
        "explain": (["explain", *m, "3+5=", "--head", "1.1", "--top", "3", "--shots", "0",
                     "--out", str(out)], "explain.csv"),
        "lora": (["lora", *m, "--layer", "1", "--n-train", "16", "--n-test", "8",
                  "--batch-size", "8", "--n-cna", "2", "--top-k", "2", "--seeds", "1",
                  "--deep-from", "2", "--out", str(out)], "lora.csv"),
        "prune": (["prune", *m, "--lora", str(out), "--keep-top", "3", "--deep-from", "1",
                   "--n", "2", "--seeds", "1", "--no-train", "--out", str(out / "prune")],
                  "prune/prune.csv"),
        "debias": (["debias", *m, "--pairs", str(pairs), "--n-neurons", "2", "--top-k", "2",
                    "--seeds", "1", "--cost-n", "2", "--out", str(out / "debias")],
                   "debias/debias.csv"),
    }
    failed = []  # every command runs, so one run names every failure
    for what, (argv, csv) in commands.items():
        try:
            rc = main(argv)
        except Exception:  # noqa: BLE001 - CNALENS_DEBUG=1 re-raises: keep its traceback
            rc = 1
            print(traceback.format_exc(), file=sys.stderr)
        err = capsys.readouterr().err
        if rc != 0:
            failed.append(f"{what}: {err}")
        elif csv is not None and not len(pd.read_csv(out / csv)):
            failed.append(f"{what}: empty {csv}")
    assert not failed, "\n".join(failed)
    return out


@pytest.mark.parametrize("name", NEW)
def test_every_command_on_a_tiny_model(name, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    view = _save(name, model)
    cases = tmp_path / "cases.jsonl"
    _own_cases(view, cases)
    out = run_every_command(model, tmp_path, cases, ["1.3"], capsys)
    sizes = json.loads((out / "prune" / "prune.json").read_text())["sizes"]
    assert sizes["reload_max_abs_diff"] < 1e-5 and sizes["ffn_params_removed"] > 0
    adapter = json.loads((out / "adapter" / "cnalens.json").read_text())
    assert adapter["base"]["family"] == name and adapter["targets"]
