"""LoRA on one attention layer (cnalens.apps.lora) on tiny float64 models: training,
the answer-position loss, save/load, mismatches, and the LoRA-vs-original CNA."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cnalens.apps.lora import (
    Adapter,
    LoraSettings,
    answer_loss,
    load_adapter,
    lora_cases,
    save_adapter,
    target_names,
    train_lora,
    unload_lora,
)
from cnalens.apps.lora_cna import bands, lora_comparison, summarize
from cnalens.cli import main
from cnalens.data.cases import encode_all
from cnalens.errors import CnaError
from cnalens.models import ModelView
from tiny import TinyTokenizer, tiny_model

SETTINGS = LoraSettings.quick(layers=(1,), n_train=48, n_test=16, batch_size=8, lr=1e-2,
                              epochs=2)


def _view(family: str, seed: int = 0) -> ModelView:
    return ModelView(tiny_model(family, seed=seed), TinyTokenizer(), {"spec": family})


def _logits(view, enc):
    b = view.batch([e.input_ids for e in enc])
    with torch.no_grad():
        return view.logits(view.hidden(b))


@pytest.fixture(scope="module")
def data():
    train, test = lora_cases(SETTINGS)
    tok = TinyTokenizer()
    return encode_all(tok, train), encode_all(tok, test)


def test_cases_disjoint_all_ops_negative():
    s = LoraSettings.quick(n_train=400, n_test=100)
    train, test = lora_cases(s)
    pairs = {(c.labels["op"], c.labels["a"], c.labels["b"]) for c in train}
    assert not pairs & {(c.labels["op"], c.labels["a"], c.labels["b"]) for c in test}
    assert {c.labels["op"] for c in train} == {"+", "-", "*", "/"}
    assert {c.labels["digits"] for c in train} == {2}
    assert any(c.labels["answer"] < 0 for c in train)
    assert len(train) == 400 and all(c.prefix == "" for c in train)
    with pytest.raises(CnaError, match="test split is empty"):
        lora_cases(s.replace(n_test=0))


@pytest.mark.parametrize("family, expect", [
    ("gpt2", ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]),
    ("llama", [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]),
    ("phi3", ["model.layers.1.self_attn.qkv_proj", "model.layers.1.self_attn.o_proj"]),
    ("olmo2", [f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"]),  # not q/k_norm
])
def test_targets(family, expect):
    view = _view(family)
    assert sorted(target_names(view, [1], ["attn"])) == sorted(expect)
    assert target_names(view, [1], ["o_proj"]) == [n for n in expect if "o_proj" in n
                                                   or "c_proj" in n]
    with pytest.raises(CnaError, match="matches no linear module"):
        target_names(view, [1], ["no_such_proj"])
    with pytest.raises(CnaError, match="out of range"):
        target_names(view, [9], ["attn"])


def test_targets_in_a_mixture_of_experts():
    """Qwen2-MoE: attention targets as in any family; ``down_proj`` of an expert layer is
    one clear line (the experts' are fused 3-D parameters), of its dense layer a module."""
    view = _view("qwen2_moe")
    assert sorted(target_names(view, [0], ["attn"])) == sorted(
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo")
    assert target_names(view, [1], ["down_proj"]) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(CnaError, match="layer 0 is a mixture of experts, whose down "
                       "projections are fused 3-D parameters") as err:
        target_names(view, [0, 1], ["down_proj"])
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "phi3", "olmo2"])
def test_trains_reproducibly_and_disables_exactly(family, data, one_thread):
    view = _view(family)
    train, test = data
    before = _logits(view, test)
    with torch.no_grad():
        loss0 = answer_loss(view, train)[0]
    names = target_names(view, [1], ["attn"])
    ad, hist = train_lora(view, train, SETTINGS, progress=False)
    assert isinstance(ad, Adapter) and ad.path is None
    assert ad.targets == names == ad.meta["targets"]
    assert not hasattr(view, "peft_model") and not hasattr(ad.peft_model, "cnalens_meta")
    assert len(hist) == 2 * 6 and hist["loss"].notna().all()
    with torch.no_grad():
        assert answer_loss(view, train)[0] < 0.97 * loss0  # the training loss falls
    lora = _logits(view, test)
    assert not torch.allclose(lora, before)
    with ad.disabled():
        assert torch.equal(_logits(view, test), before)  # the original, exactly
    weights = {k: v.clone() for k, v in ad.peft_model.state_dict().items() if "lora_" in k}
    assert unload_lora(ad) is view.model
    assert torch.equal(_logits(view, test), before)
    ad2, _ = train_lora(view, train, SETTINGS, progress=False)  # same seed, same adapter
    for k, v in ad2.peft_model.state_dict().items():
        if "lora_" in k:
            assert torch.equal(v, weights[k]), k
    unload_lora(ad2)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])  # gemma2: soft-capped logits
def test_answer_loss_equals_full_logits_loss(family, data):
    view = _view(family)
    enc = data[0][:8]
    if family == "gemma2":  # its 4-token sliding window turns left-padded rows into NaN
        enc = [e for e in data[0] if len(e.input_ids) == len(enc[0].input_ids)][:6]
    else:
        assert len({len(e.input_ids) for e in enc}) > 1  # padding exercised
    loss, n = answer_loss(view, enc)
    total, count = 0.0, 0
    for e in enc:  # by hand: each case alone, full-sequence logits, the answer positions
        logits = view.model(input_ids=torch.tensor([e.input_ids])).logits[0]
        k = len(e.answer_ids)
        for j, tok in enumerate(e.answer_ids):
            total += -torch.log_softmax(logits[len(e.input_ids) - k + j], -1)[tok]
            count += 1
    assert n == count
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, total / count, rtol=1e-12, atol=1e-12)


def test_save_load_round_trip_and_mismatches(data, tmp_path, one_thread):
    train, test = data
    view = _view("llama")
    ad, _ = train_lora(view, train, SETTINGS, progress=False)
    lora = _logits(view, test)
    save_adapter(ad, tmp_path / "adapter")
    save_adapter(ad, tmp_path / "adapter")  # an adapter folder is replaced
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "keep.csv").write_text("x")
    with pytest.raises(CnaError, match="not overwriting"):
        save_adapter(ad, tmp_path / "results")
    with pytest.raises(CnaError, match="takes the Adapter that train_lora"):
        save_adapter(ad.peft_model, tmp_path / "other")  # a bare peft model: no metadata
    assert not (tmp_path / "other").exists()
    meta = json.loads((tmp_path / "adapter" / "cnalens.json").read_text())
    assert meta["settings"]["layers"] == [1] and meta["base"]["spec"] == "llama"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    unload_lora(ad)
    fresh = _view("llama")
    back = load_adapter(fresh, tmp_path)  # DIR or DIR/adapter
    assert isinstance(back, Adapter) and back.path == tmp_path / "adapter"
    assert back.meta == meta and back.targets == ad.targets
    assert back.peft_model.get_base_model() is fresh.model
    assert not hasattr(fresh, "peft_model") and "lora_adapter" not in fresh.info
    assert torch.equal(_logits(fresh, test), lora)
    with back.disabled():
        assert not torch.equal(_logits(fresh, test), lora)
    with pytest.raises(CnaError, match="already carries a LoRA"):
        load_adapter(fresh, tmp_path)
    for other, why in (("gpt2", "family"), ("gemma", "family")):
        with pytest.raises(CnaError, match=why) as err:
            load_adapter(_view(other), tmp_path / "adapter")
        assert "\n" not in str(err.value)
    with pytest.raises(CnaError, match="weights of .* differ"):
        load_adapter(_view("llama", seed=1), tmp_path / "adapter")
    with pytest.raises(CnaError, match="no LoRA adapter"):
        load_adapter(_view("llama"), tmp_path / "nothing")


def test_load_reports_peft_shape_errors_in_one_line(data, tmp_path):
    train, _ = data
    view = _view("llama")
    ad, _ = train_lora(view, train, SETTINGS.replace(epochs=1), progress=False)
    save_adapter(ad, tmp_path / "a")
    meta_path = tmp_path / "a" / "cnalens.json"
    meta = json.loads(meta_path.read_text())
    other = _view("qwen3")  # same family table and sizes except head_dim: q/k/v shapes
    meta["base"] = {**meta["base"], "fingerprint": {}, "n_heads": other.n_heads,
                    "d_model": other.d_model}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CnaError, match="does not fit") as err:
        load_adapter(other, tmp_path / "a")
    assert "\n" not in str(err.value)


def test_comparison_matches_brute_force(data, one_thread):
    from cnalens.scores import score_neurons

    train, test = data
    view = _view("gemma3")
    ad, _ = train_lora(view, train, SETTINGS, progress=False)
    enc = test[:5]
    comp = lora_comparison(view, ad, enc, 1, progress=False)
    assert comp.meta["scoring"] == "exhaustive"
    a = score_neurons(view, enc, layers=[1, 2], progress=False)
    with ad.disabled():
        b = score_neurons(view, enc, layers=[1, 2], target=a.target, scale=a.scale,
                          progress=False)
        with view.capture(["coef"], position=-1) as cb:
            view.hidden(view.batch([e.prompt_ids for e in enc]))
    torch.testing.assert_close(comp.imp_a[:, 1:], a.imp[:, 1:])
    torch.testing.assert_close(comp.imp_b[:, 1:], b.imp[:, 1:])
    assert comp.imp_a[:, 0].isnan().all()  # below the LoRA layer: not scored
    torch.testing.assert_close(comp.coef_b[:, 2], cb[("coef", 2)][:, 0])
    ks = (3, 7)
    bl = bands(view.n_layers, 1, 2)
    assert bl == {"shallow": [1], "deep": [2], "all": [1, 2]}
    table = summarize(comp, ks, bl, seeds=2).set_index(["band", "k"])
    D = comp.coef_a.shape[2]
    for k in ks:
        for band, layers in bl.items():
            sa = sb = up = cnt = pct = 0.0
            for i in range(len(enc)):
                cand = [(float(comp.diff[i, L, n]), L, n) for L in (1, 2) for n in range(D)]
                cand.sort(key=lambda t: -t[0])
                for _, L, n in cand[:k]:
                    if L not in layers:
                        continue
                    ca, cb_ = abs(float(comp.coef_a[i, L, n])), abs(float(comp.coef_b[i, L, n]))
                    sa, sb, up, cnt = sa + ca, sb + cb_, up + (ca > cb_), cnt + 1
                    pct += 100 * sum(abs(float(x)) <= cb_ for x in comp.coef_b[i, L]) / D
            row = table.loc[(band, k)]
            assert row["n_neurons"] == cnt
            if cnt:
                assert row["coef_a"] == pytest.approx(sa) and row["coef_b"] == pytest.approx(sb)
                assert row["change"] == pytest.approx(sa / sb - 1)
                assert row["up_frac"] == pytest.approx(up / cnt)
                assert row["pct_b"] == pytest.approx(pct / cnt)
    allrow = table.loc[("deep", 0)]
    assert allrow["coef_a"] == pytest.approx(float(comp.coef_a[:, 2].abs().sum()))
    unload_lora(ad)


def test_stage_and_report_on_tiny(tmp_path, one_thread):
    from cnalens.pipeline import PROFILES, StageContext
    from cnalens.report import render_report
    from cnalens.stages.lora import lora_stage

    view = _view("llama")
    ctx = StageContext(view, tmp_path, PROFILES["smoke"], ("+", "-"), 0, 16, False, {}, None,
                       {"+": (2, 0)})
    lora_stage(ctx)
    meta = json.loads((tmp_path / "lora.json").read_text())
    assert meta["layer"] == 1 and meta["deep_from"] == 2 and meta["finished"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not any("lora" in n for n, _ in view.model.named_modules())  # unloaded
    (tmp_path / "run.json").write_text(json.dumps({"stages": ["lora"], "model": {}}))
    html = render_report(tmp_path).read_text()
    assert "LoRA" in html


@pytest.mark.parametrize("argv, msg", [
    (["lora", "--adapter", "/no/such/dir"], "no LoRA adapter"),
    (["lora", "--n-train", "0"], "training split is empty"),
    (["lora", "--profile", "huge"], "'huge' is not one of 'quick', 'full'"),
    (["lora", "--lr", "0"], "learning rate"),
])
def test_cli_errors_one_line(capsys, tmp_path, argv, msg):
    out = tmp_path / "out"
    rc = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and msg in lines[0]
    assert not out.exists()


def test_sweep_without_cna_and_saved_adapter_reevaluated(tmp_path, one_thread):
    from cnalens.stages.lora import run_lora

    view = _view("llama")
    s = LoraSettings.quick(n_train=24, n_test=12, batch_size=8)
    meta = run_lora(view, tmp_path, s, 1, sweep=[2], n_cna=0, progress=False)
    assert meta["sweep_layers"] == [1, 2] and meta["cna"]["summary"] is None
    assert not (tmp_path / "lora_cna.csv").exists()
    acc = pd.read_csv(tmp_path / "lora.csv", dtype={"op": str})
    assert sorted(acc["layer"].unique()) == [-1, 1, 2]
    again = run_lora(view, tmp_path / "re", s.replace(seed=5), 0, ks=(3,), n_cna=1,
                     adapter=tmp_path / "adapter", progress=False)
    assert again["layer"] == 1 and again["settings"]["seed"] == 0  # the adapter's own
    acc2 = pd.read_csv(tmp_path / "re" / "lora.csv", dtype={"op": str})
    pd.testing.assert_frame_equal(acc[acc["layer"] != 2].reset_index(drop=True), acc2)
    assert (tmp_path / "re" / "lora_cna.csv").is_file()
    assert again["cna"]["scoring"] == "certified"  # attention-only LoRA: top-K certified
    assert not any("lora" in n for n, _ in view.model.named_modules())  # unloaded


def test_full_profile_is_the_papers_scale():
    from cnalens.apps.lora import sweep_layers

    s = LoraSettings.full()
    assert (s.n_train, s.n_test, s.epochs, s.lr, s.profile) == (18_000, 2_000, 4, 1e-3, "full")
    assert LoraSettings.full(epochs=1).epochs == 1  # options override the profile
    train, test = lora_cases(s)  # the paper's split, an equal share per op, disjoint pairs
    count = lambda cs, op: sum(c.labels["op"] == op for c in cs)  # noqa: E731
    for op in "+-*":
        assert (count(train, op), count(test, op)) == (4500, 500)
    assert 0 < count(test, "/") < count(train, "/") < 4500  # 2-digit exact division is rarer
    assert not {(c.labels["op"], c.labels["a"], c.labels["b"]) for c in train} & {
        (c.labels["op"], c.labels["a"], c.labels["b"]) for c in test}
    v = _view("llama")
    assert sweep_layers(v, "auto", "full") == list(range(v.n_layers))
    assert sweep_layers(v, "auto", "quick") == [0, 1, 2]  # 3 layers: four spots, all of them
    deep = SimpleNamespace(n_layers=32)  # "auto" reads only the depth
    assert sweep_layers(deep, "auto", "quick") == [3, 8, 16, 25]  # four layers spread out
    assert sweep_layers(deep, "auto", "full") == list(range(32))


# --------------------------------------------------------------------------- adapted weights
def _random_lora(view, targets=("down_proj", "attn"), layers=(1, 2), seed=1):
    """A peft LoRA (in place) on ``targets`` with random non-zero B (peft starts B at 0)
    and dropout, which eval mode turns off."""
    import warnings

    from peft import LoraConfig, get_peft_model

    names = target_names(view, layers, targets)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=names,
                        fan_in_fan_out=view.family.conv1d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(view.model, config)
    pm.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return pm


def _merged_view(pm, family):
    """A merged copy of the LoRA model (peft's merge_and_unload on a deep copy)."""
    return ModelView(copy.deepcopy(pm).merge_and_unload(), TinyTokenizer(), {"spec": family})


def _weights(view, layers=(1, 2)):
    out = {}
    for layer in layers:
        out.update({("value_vectors", layer): view.value_vectors(layer),
                    ("o_proj_by_head", layer): view.o_proj_by_head(layer),
                    ("v_proj_by_head", layer): view.v_proj_by_head(layer),
                    ("down_bias", layer): view.down_bias(layer),
                    ("o_proj_bias", layer): view.o_proj_bias(layer)})
    return {k: v.detach().clone() for k, v in out.items() if v is not None}


def _assert_weights(have, want, differ=()):
    assert have.keys() == want.keys()
    for k in have:
        if k[0] in differ:
            assert not torch.allclose(have[k], want[k]), k
        else:
            torch.testing.assert_close(have[k], want[k], rtol=1e-12, atol=1e-12, msg=str(k))


# separate, Conv1D, fused per head, fused q|k|v with GQA sizes
@pytest.mark.parametrize("family", ["llama", "gpt2", "neox", "phi3"])
def test_view_reads_adapted_weights(family):
    view = _view(family)
    base = _weights(view)
    pm = _random_lora(view)
    merged = _weights(_merged_view(pm, family))
    lora = _weights(view)
    assert lora["value_vectors", 1].dtype == torch.float64
    _assert_weights(lora, merged)  # the LoRA model's weights are the merged model's
    _assert_weights(lora, base, differ=("value_vectors", "o_proj_by_head", "v_proj_by_head"))
    with pm.disable_adapter():
        _assert_weights(_weights(view), base)  # the original's
    pm.merge_adapter()  # merged in place: the base weights now hold the deltas
    _assert_weights(_weights(view), merged)
    with pm.disable_adapter():  # the forward unmerges: so does the view, read-only
        have = _weights(view)
        for k in have:
            torch.testing.assert_close(have[k], base[k], msg=str(k))
    pm.unmerge_adapter()
    _assert_weights(_weights(view), merged)
    pm.unload()
    _assert_weights(_weights(view), base)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "phi3", "olmo2"])
def test_residual_decomposition_with_adapter(family):
    from test_view import test_residual_decomposition as decomposition

    view = _view(family)
    pm = _random_lora(view)
    decomposition(view)  # z and coef are the LoRA layers' inputs, weights the adapted ones
    pm.unload()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_cna_scores_the_adapted_model(family, data, one_thread):
    from cnalens.scores import score_neurons

    enc = data[1][:4]
    view = _view(family)
    pm = _random_lora(view)
    comp = lora_comparison(view, pm, enc, 1, progress=False)
    merged = score_neurons(_merged_view(pm, family), enc, layers=[1, 2], progress=False)
    orig = score_neurons(_view(family), enc, layers=[1, 2], target=merged.target,
                         scale=merged.scale, progress=False)
    torch.testing.assert_close(comp.imp_a[:, 1:], merged.imp[:, 1:])
    torch.testing.assert_close(comp.coef_a[:, 1:], merged.coef[:, 1:])
    torch.testing.assert_close(comp.imp_b[:, 1:], orig.imp[:, 1:])
    assert not torch.allclose(comp.imp_a[:, 1:], comp.imp_b[:, 1:])
    with pm.disable_adapter():  # the LoRA model, adapter off, is the original
        off = score_neurons(view, enc, layers=[1, 2], target=merged.target,
                            scale=merged.scale, progress=False)
    torch.testing.assert_close(off.imp[:, 1:], orig.imp[:, 1:])
    pm.unload()


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_pruning_refuses_a_lora_ffn_and_works_once_merged(family):
    from cnalens.interventions import KeepOnlyNeurons
    from cnalens.models.pruned import prune_ffn

    view = _view(family)
    pm = _random_lora(view)
    keep = {1: torch.tensor([0, 3, 7, 8]), 2: torch.arange(5)}
    before = {k: v.clone() for k, v in view.model.state_dict().items()}
    with pytest.raises(CnaError, match="cannot prune layer 1: its FFN carries a LoRA") as err:
        prune_ffn(view, keep)
    assert "\n" not in str(err.value)
    after = view.model.state_dict()  # nothing was shrunk before the refusal
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                 for k in before)
    merged = _merged_view(pm, family)
    b = merged.batch([[1, 5, 9, 13, 7, 22], [1, 40, 3, 3, 17, 9]])
    units = [(la, int(n)) for la, idx in keep.items() for n in idx]
    with torch.no_grad(), merged.intervene(KeepOnlyNeurons((1, 2), units)):
        ref = merged.last_logits(b, 6)
    pm.merge_and_unload()  # in place: view.model now holds plain merged layers
    prune_ffn(view, keep)
    assert view.ffn_widths[1:] == [4, 5]
    with torch.no_grad():
        torch.testing.assert_close(view.last_logits(b, 6), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family, targets, scoring", [
    ("llama", ("attn",), "certified"),  # the down projections untouched: shared vectors
    ("gpt2", ("attn",), "certified"),
    ("llama", ("down_proj", "attn"), "exhaustive"),  # layer 1's value vectors differ
])
def test_lora_comparison_top_k_equals_exhaustive(family, targets, scoring, data, one_thread):
    """With ``k`` (what run_lora asks for: its largest K), the comparison's top-K, frame
    and coefficient-change table are the exhaustive comparison's."""
    enc = data[1][:6]
    view = _view(family)
    pm = _random_lora(view, targets=targets)
    full = lora_comparison(view, pm, enc, 1, progress=False)
    top = lora_comparison(view, pm, enc, 1, k=12, progress=False)
    assert full.meta["scoring"] == "exhaustive" and top.meta["scoring"] == scoring
    assert torch.equal(top.topk(12), full.topk(12))
    torch.testing.assert_close(top.coef_a, full.coef_a)
    torch.testing.assert_close(top.coef_b, full.coef_b)
    fa, fb = (c.frame(12, "decrease", [1, 2]) for c in (top, full))
    assert fa[["case", "rank", "layer", "neuron"]].equals(fb[["case", "rank", "layer", "neuron"]])
    for col in ("imp_a", "imp_b", "coef_a", "coef_b"):
        np.testing.assert_allclose(fa[col], fb[col], rtol=1e-9, atol=1e-9)
    bl = bands(view.n_layers, 1, 2)
    pd.testing.assert_frame_equal(summarize(top, (3, 12), bl, seeds=2),
                                  summarize(full, (3, 12), bl, seeds=2))
    pm.unload()
