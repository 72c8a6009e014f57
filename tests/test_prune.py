"""Pruning (issue 7): real FFN pruning, save/reload, the CNA selection, the experiment."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from cnalens.apps import prune as P
from cnalens.cli import flag_message, main
from cnalens.cna import Comparison
from cnalens.errors import CnaError
from cnalens.interventions import KeepOnlyNeurons
from cnalens.models import ModelView, load_model
from cnalens.models.load import model_shape
from cnalens.models.pruned import (
    PRUNING_FILE,
    expert_keep,
    prune_ffn,
    save_pruned,
    weights_bytes,
)
from cnalens.stages import prune as S
from tiny import FAMILY_NAMES, MOE_NAMES, VOCAB, TinyTokenizer, tiny_model


def _keep(view, layers, seed=1) -> dict[int, torch.Tensor]:
    """3 + 2L random neurons of each dense layer L; in a mixture-of-experts layer 1 + L
    random neurons of every expert (and 2 + L of the shared expert: ``expert_keep``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for la in layers:
        perm = torch.randperm(view.ffn_width(la), generator=g)
        out[la] = perm[:3 + 2 * la] if not view.is_moe(la) else expert_keep(
            view, la, perm, 1 + la, shared=2 + la)
    return out


def _units(keep):
    return [(la, int(n)) for la, idx in keep.items() for n in idx]


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (3, 6), generator=g).tolist()


def _neuron_params(view, layer) -> int:
    """Parameters one neuron owns: a row (and bias) of every input projection, a column of
    the down projection (brute force from the modules' shapes); an expert's neuron: its
    share of the fused ``gate_up_proj`` and ``down_proj`` (the shared expert's the same)."""
    if view.is_moe(layer):
        ex = view.moe_module(layer, "experts")
        n_routed = ex.down_proj.shape[0] * ex.down_proj.shape[-1]
        return (ex.gate_up_proj.numel() + ex.down_proj.numel()) // n_routed
    n = sum(p.numel() // view.ffn_width(layer) for m in view.ffn_in(layer)
            for p in m.parameters(recurse=False))
    w = view.module(layer, "down_proj").weight
    return n + w.numel() // view.ffn_width(layer)


@pytest.mark.parametrize("name", FAMILY_NAMES + MOE_NAMES)
def test_pruned_equals_masked(name, one_thread):
    """Pruning the neurons = zeroing them (KeepOnlyNeurons), in every family (in a mixture
    of experts, the same number of every expert's); the down-projection bias stays; widths
    and removed parameters as counted independently."""
    full = ModelView(tiny_model(name), TinyTokenizer())
    view = ModelView(tiny_model(name), TinyTokenizer())
    keep = _keep(view, (1, 2))
    expect = sum((view.ffn_width(la) - len(k)) * _neuron_params(view, la)
                 for la, k in keep.items())
    bias = [None if view.down_bias(la) is None else view.down_bias(la).clone() for la in (1, 2)]
    info = prune_ffn(view, keep)
    b = full.batch(_ids())
    with torch.no_grad(), full.intervene(KeepOnlyNeurons((1, 2), _units(keep))):
        ref = full.last_logits(b, 6)
    with torch.no_grad():
        got = view.last_logits(b, 6)
        unmasked = full.last_logits(b, 6)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    assert (got - unmasked).abs().max() > 1e-3  # the pruning did change the model
    widths = [5 if view.layout(1) is None else 6 * 2 + 3 * (view.layout(1).shared > 0),
              7 if view.layout(2) is None else 6 * 3 + 4 * (view.layout(2).shared > 0)]
    assert [len(keep[1]), len(keep[2])] == widths
    assert view.ffn_widths == [full.ffn_width(0), *widths] and info["params_removed"] == expect
    assert sum(p.numel() for p in full.model.parameters()) - expect == \
        sum(p.numel() for p in view.model.parameters())
    for la, bb in zip((1, 2), bias, strict=True):
        if bb is not None:
            assert torch.equal(view.down_bias(la), bb)
    # value vectors of the kept neurons are the original ones, in sorted order
    idx = keep[2].sort().values
    torch.testing.assert_close(view.value_vectors(2), full.value_vectors(2)[idx])


def _fast_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t2",
                                   pad_token="t0")


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "neox", "phi3", "olmo2"])
def test_saved_pruned_model_reloads(name, tmp_path, one_thread):
    """Saved and reloaded with load_model(DIR): the same outputs as the reloaded original
    with the same neurons masked; a smaller file."""
    tok = _fast_tokenizer()
    orig = tiny_model(name)
    orig.save_pretrained(tmp_path / "orig")
    tok.save_pretrained(tmp_path / "orig")
    view = ModelView(tiny_model(name), TinyTokenizer())
    keep = _keep(view, (0, 2), seed=3)
    prune_ffn(view, keep)
    d = save_pruned(view, tmp_path / "pruned", {"note": "test"})
    tok.save_pretrained(d)
    assert (d / PRUNING_FILE).is_file() and weights_bytes(d) < weights_bytes(tmp_path / "orig")
    back = load_model(str(d), dtype="float64", progress=False)
    ref = load_model(str(tmp_path / "orig"), dtype="float64", progress=False)
    assert back.ffn_widths == view.ffn_widths and back.info["pruned"]
    assert model_shape(str(d)) == back.shape != ref.shape  # per-layer widths, from the files
    b = ref.batch(_ids(1))
    with torch.no_grad(), ref.intervene(KeepOnlyNeurons((0, 2), _units(keep))):
        want = ref.last_logits(b, 6)
    with torch.no_grad():
        got = back.last_logits(b, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_prune_bad_input():
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    for keep, msg in [({1: [0, 40]}, "must lie in 0..39"), ({1: [2, 2]}, "repeat"),
                      ({1: []}, "at least one"), ({7: [0]}, "out of range")]:
        with pytest.raises(CnaError, match=msg):
            prune_ffn(view, keep)
    assert view.ffn_widths == [40, 40, 40]


# --------------------------------------------------------------------------- selection
def _comparison(n=6, L=4, D=9, seed=0, narrow=True) -> Comparison:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, L, D, generator=g, dtype=torch.float64), \
        torch.randn(n, L, D, generator=g, dtype=torch.float64)
    if narrow:  # layer 3 is narrower (7 neurons), as in a pruned model
        a[:, 3, 7:] = float("nan")
        b[:, 3, 7:] = float("nan")
    return Comparison(a - b, a, b, a, b, [f"c{i}" for i in range(n)], {})


def _brute_union(comp, deep, n) -> set[tuple[int, int]]:
    width = comp.diff.shape[2]
    top = comp.topk(n, "decrease", deep)
    return {(int(i) // width, int(i) % width) for i in top.flatten()}


def test_selection_is_the_union_of_each_cases_top_n():
    comp, deep, widths = _comparison(), [1, 2, 3], [9, 9, 9, 7]
    rank = P.rank_deep(comp, deep, widths)
    assert len(rank.best) == 25
    for n in (1, 2, 3, 5, 10, 25):
        brute = _brute_union(comp, deep, n)
        got = {(la, int(k)) for la, idx in rank.keep(n).items() for k in idx}
        assert brute <= got
        extra = got - brute
        assert all(not any(u[0] == la for u in brute) for la, _ in extra)
        assert len({la for la, _ in extra}) == len(extra)  # at most one added per layer
        assert rank.union_size(n) == len(brute)
    with pytest.raises(CnaError, match="1..25"):
        rank.keep(26)


def test_fraction_chooser_hits_the_target():
    comp, deep, widths = _comparison(n=12, L=5, D=40, seed=2, narrow=False), [2, 3, 4], [40] * 5
    rank = P.rank_deep(comp, deep, widths)
    total = len(rank.best)
    for f in (0.3, 0.5, 0.8, 0.95):
        n = rank.choose_n(f)
        want = (1 - f) * total
        sizes = {m: len(_brute_union(comp, deep, m)) for m in range(1, total + 1)}
        best = min(abs(s - want) for s in sizes.values())
        assert abs(sizes[n] - want) == best
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(CnaError, match="strictly between 0 and 1"):
            rank.choose_n(bad)


def test_random_keep_same_counts():
    counts = {3: 5, 4: 1, 6: 17}
    widths = [20] * 7
    a, b, a2 = (P.random_keep(counts, widths, s) for s in (1, 2, 1))
    for kp in (a, b):
        assert P.counts(kp) == counts
        assert all(len(set(v.tolist())) == len(v) and int(v.max()) < 20 for v in kp.values())
    assert all(torch.equal(a[la], a2[la]) for la in counts)
    assert any(not torch.equal(a[la], b[la]) for la in counts)
    assert P.pruned_fraction(a, widths) == pytest.approx(1 - 23 / 60)


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe"])
def test_selection_and_random_keep_fit_the_experts(name):
    """In a mixture-of-experts layer the union of the cases' top-N becomes a prunable keep
    (``fit_experts``): as many experts as hold a union neuron (at least top-k), those whose
    best neuron ranks highest, the union's mean count of each, each expert's best neurons;
    the random controls keep as many random experts, neurons each and shared ones."""
    view = ModelView(tiny_model(name), TinyTokenizer())
    g = torch.Generator().manual_seed(4)
    imp = torch.randn(5, view.n_layers, view.d_ffn, generator=g, dtype=torch.float64)
    for la in range(view.n_layers):
        imp[:, la, view.ffn_width(la):] = float("nan")
    comp = Comparison(imp, imp, imp * 0, imp, imp, [f"c{i}" for i in range(5)], {})
    rank = P.rank_deep(comp, [1, 2], view.ffn_widths)
    for n in (1, 3, 8):
        union = rank.keep(n)
        keep = P.fit_experts(view, union, rank.order)
        for la in (1, 2):
            lay = view.layout(la)
            if lay is None:
                assert torch.equal(keep[la], union[la])
                continue
            e_u, _, s_u = P.expert_sizes(lay, union[la])
            experts, width, shared = P.expert_sizes(lay, keep[la])
            assert experts == max(e_u, lay.top_k) and shared == (max(1, s_u) if lay.shared
                                                                 else 0)
            assert width == max(1, round((len(union[la]) - s_u) / experts))
            order = rank.order(la).tolist()
            best = {}  # each expert's best place in the ranking
            for place, j in enumerate(order):
                e = int(lay.route_of()[j])
                best.setdefault(e, place)
            routed = sorted((p, e) for e, p in best.items() if e < lay.n_experts)
            chosen = {e for _, e in routed[:experts]}
            route = lay.route_of()[keep[la]]
            assert set(route[route < lay.n_experts].tolist()) == chosen
            for e in chosen:  # its best-ranked neurons
                mine = [j for j in order if int(lay.route_of()[j]) == e][:width]
                assert sorted(mine) == keep[la][route == e].tolist()
        rnd = [P.random_keep(P.counts(keep), view.ffn_widths, s, view, keep) for s in (1, 2)]
        for r in rnd:
            assert P.counts(r) == P.counts(keep)
            assert all(P.expert_sizes(view.layout(la), r[la]) == P.expert_sizes(
                view.layout(la), keep[la]) for la in r if view.is_moe(la))
        assert any(not torch.equal(rnd[0][la], rnd[1][la]) for la in keep)
        for kp in (keep, *rnd):  # what the fused experts can hold
            prune_ffn(ModelView(tiny_model(name), TinyTokenizer()), kp)


# --------------------------------------------------------------------------- experiment
def _adapter(tmp_path, name="gemma3"):
    from cnalens.apps.lora import LoraSettings, lora_cases, save_adapter, train_lora, unload_lora

    view = ModelView(tiny_model(name), TinyTokenizer(), {"spec": name})
    s = LoraSettings.quick(layers=(0,), n_train=16, n_test=8, batch_size=8, lr=1e-2)
    train, _ = lora_cases(s)
    adapter, _ = train_lora(view, train, s, progress=False)
    path = save_adapter(adapter, tmp_path / "lora" / "adapter")
    unload_lora(adapter)
    return path


def test_lora_ranking_equals_two_exhaustive_runs(tmp_path, one_thread):
    """The selection's ranking (lora_cna.lora_comparison) is the one of scoring the LoRA
    model and, adapter disabled, the original with A's target and scale, by brute force."""
    from cnalens.apps.lora import load_adapter, unload_lora
    from cnalens.cna import compare
    from cnalens.data.cases import encode_all
    from cnalens.scores import score_neurons

    path = _adapter(tmp_path)
    view = ModelView(tiny_model("gemma3"), TinyTokenizer(), {"spec": "gemma3"})
    adapter = load_adapter(view, path)
    enc = encode_all(view.tokenizer, P.selection_cases(n=3))
    got = P.lora_ranking(view, adapter, enc, 1, batch_size=5)
    a = score_neurons(view, enc, layers=[1, 2], progress=False)
    with adapter.disabled():
        b = score_neurons(view, enc, target=a.target, scale=a.scale, layers=[1, 2],
                          progress=False)
    want = P.rank_deep(compare(a, b), [1, 2], view.ffn_widths)
    assert got.layers == want.layers == (1, 2) and got.n_cases == len(enc) == 12
    assert torch.equal(got.units, want.units) and torch.equal(got.best, want.best)
    unload_lora(adapter)


def test_run_prune_end_to_end(tmp_path, one_thread):
    from cnalens.report import render_report

    adapter = _adapter(tmp_path)

    def fresh():
        return ModelView(tiny_model("gemma3"), TinyTokenizer(), {"spec": "gemma3"})

    out = tmp_path / "out"
    view = fresh()
    table = S.run_prune(view, fresh, adapter, out, prune_fraction=0.6, deep_from=1,
                        seeds=(1, 2), n_select=2, batch_size=8, speed_repeats=1,
                        progress=False)
    assert not any("lora" in n for n, _ in view.model.named_modules())  # adapter removed
    assert list(table["variant"]) == ["original", "lora", "cna_pruned", "cna_pruned_lora",
                                      "random_pruned", "random_pruned_lora", "random_pruned",
                                      "random_pruned_lora"]
    meta = pd.read_json(out / "prune.json", typ="series")
    neurons = pd.read_csv(out / "prune_neurons.csv")
    per_layer = neurons.groupby(["variant", "seed"], dropna=False)["layer"].value_counts()
    cna = neurons[neurons["variant"] == "cna"].groupby("layer").size()
    for seed in (1, 2):
        rnd = neurons[(neurons["variant"] == "random") & (neurons["seed"] == seed)]
        assert rnd.groupby("layer").size().equals(cna)  # same counts per layer
    assert len(per_layer) and set(cna.index) == {1, 2}
    assert abs(meta["pruned_fraction"] - 0.6) <= 0.05
    rnd_frac = table[table["variant"].str.startswith("random")]["deep_pruned"]
    assert rnd_frac.to_list() == pytest.approx([meta["pruned_fraction"]] * 4)
    sizes = meta["sizes"]
    # (1e-6: from_pretrained rounds Gemma's embedding scale to float32, pruned or not)
    assert sizes["reload_max_abs_diff"] < 1e-5 and sizes["weights_bytes_after"] < \
        sizes["weights_bytes_before"]
    assert sizes["ffn_params_removed"] == (80 - int(cna.sum())) * 3 * 32  # gate, up, down
    back = ModelView(P.load_pruned(out / "model", dtype=torch.float64), TinyTokenizer())
    assert back.ffn_widths == [40, int(cna[1]), int(cna[2])]
    summ = pd.read_csv(out / "prune_summary.csv")
    assert summ.set_index("variant").loc["random_pruned_lora", "runs"] == 2
    (out / "run.json").write_text('{"stages": ["prune"], "model": {}}')
    html = render_report(out).read_text()
    assert "CNA-pruned + LoRA" in html and "random-pruned + LoRA" in html


def test_run_prune_errors(tmp_path):
    adapter = _adapter(tmp_path)
    view = ModelView(tiny_model("llama"), TinyTokenizer(), {"spec": "llama"})
    with pytest.raises(CnaError, match="trained on another base model"):
        S.run_prune(view, None, adapter, tmp_path / "o", prune_fraction=0.9, deep_from=1,
                    progress=False)
    view = ModelView(tiny_model("gemma3"), TinyTokenizer(), {"spec": "gemma3"})
    with pytest.raises(CnaError, match="^give exactly one of keep_top and prune_fraction$"):
        S.run_prune(view, None, adapter, tmp_path / "o", deep_from=1, progress=False)
    with pytest.raises(CnaError, match="out of range"):
        S.run_prune(view, None, adapter, tmp_path / "o", keep_top=3, deep_from=9,
                    progress=False)
    with pytest.raises(CnaError, match=r"^keep_top 81 must lie in 1..80") as err:
        S.run_prune(view, None, adapter, tmp_path / "o", keep_top=81, deep_from=1,
                    progress=False)
    # the library names its parameters, the CLI shows the flags
    assert flag_message(str(err.value), ["prune"]).startswith("--keep-top 81 must lie in")
    with pytest.raises(CnaError, match="^prune_fraction must lie") as err:
        S.run_prune(view, None, adapter, tmp_path / "o", prune_fraction=1.5, deep_from=1,
                    progress=False)
    assert flag_message(str(err.value), ["prune"]).startswith("--prune-fraction must lie")
    meta = (adapter / "cnalens.json").read_text().replace('"n_train": 16', '"n_train": 0')
    (adapter / "cnalens.json").write_text(meta)
    with pytest.raises(CnaError, match="train split is empty"):
        S.run_prune(view, None, adapter, tmp_path / "o", keep_top=3, deep_from=1,
                    progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, msg", [
    (["--prune-fraction", "1.5"], "strictly between 0 and 1"),
    (["--prune-fraction", "0.5", "--keep-top", "3"], "not both"),
    (["--keep-top", "0"], "at least 1"),
    (["--lora", "/no/such/adapter"], "no LoRA adapter in /no/such/adapter"),
])
def test_cli_errors_one_line(capsys, tmp_path, args, msg):
    out = tmp_path / "out"
    rc = main(["prune", "--model", "smollm2-135m", "--out", str(out), *args])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and msg in lines[0], err
    assert not out.exists()


def test_cli_needs_deep_from(capsys, tmp_path):
    adapter = _adapter(tmp_path)
    rc = main(["prune", "--model", "smollm2-135m", "--lora", str(adapter.parent),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "no --deep-from" in err and len(err.strip().splitlines()) == 1


def test_stage_needs_adapter_and_heads(tmp_path):
    from cnalens.pipeline import PROFILES, StageContext

    view = ModelView(tiny_model("llama"), TinyTokenizer(), {"spec": "llama"})
    ctx = StageContext(view, tmp_path, PROFILES["smoke"], ("+",), 0, 8, False, {}, None, {})
    with pytest.raises(CnaError, match="needs the lora stage's adapter"):
        S.prune_stage(ctx)
    adapter = _adapter(tmp_path)  # tmp_path/lora/adapter
    assert P.find_adapter(tmp_path) == adapter
    with pytest.raises(CnaError, match="needs the head scan"):
        S.prune_stage(ctx)
