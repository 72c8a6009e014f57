"""Bias editing (issue 8): the weight edit, the metric, the neuron rule, errors."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from cnalens.apps import debias as D
from cnalens.cli import main
from cnalens.errors import CnaError
from cnalens.interventions import ZeroNeurons
from cnalens.models import ModelView
from cnalens.scores import diff_frame, score_neurons
from cnalens.stages import debias as S
from tiny import FAMILY_NAMES, MOE_NAMES, TinyTokenizer, tiny_model

NEURONS = [(0, 3), (0, 17), (2, 0), (2, 39)]


@pytest.fixture(params=FAMILY_NAMES + MOE_NAMES)
def edit_view(request):
    """Every family, mixtures of experts too (there NEURONS are flat: neurons of experts
    0, 1 and 3; ``_neurons`` adds one of Qwen2-MoE's shared expert)."""
    return ModelView(tiny_model(request.param), TinyTokenizer(), {"spec": request.param})


def _neurons(view):
    lay = view.layout(2)
    return NEURONS + ([(2, view.ffn_width(2) - 1)] if lay is not None and lay.shared else [])


def _named(view, neurons, inputs) -> dict[int, torch.Tensor]:
    """Per parameter (by id), the mask of the entries the edit must zero, by hand from the
    modules: a dense layer's down-projection column (a Conv1D's row) and, with ``inputs``,
    the input rows (both halves of a fused gate | up) and biases; an expert's neuron ``n``
    its ``down_proj[e][:, n]`` and ``gate_up_proj[e]`` rows ``n`` and ``F + n``; the shared
    expert's its columns and gate/up rows."""
    from transformers.pytorch_utils import Conv1D

    masks: dict[int, torch.Tensor] = {}

    def hit(p, index):
        masks.setdefault(id(p), torch.zeros(p.shape, dtype=torch.bool))[index] = True

    for layer, n in neurons:
        lay = view.layout(layer)
        if lay is None:
            down = view.module(layer, "down_proj")
            conv = isinstance(down, Conv1D)
            hit(down.weight, (n,) if conv else (slice(None), n))
            for mod in view.ffn_in(layer) if inputs else []:
                for r in view.ffn_in_rows(layer, [n]).tolist():
                    hit(mod.weight, (slice(None), r) if conv else (r,))
                    if mod.bias is not None:
                        hit(mod.bias, (r,))
            continue
        e, i = lay.split(n)
        if e == "S":
            se = view.moe_module(layer, "shared_expert")
            hit(se.down_proj.weight, (slice(None), i))
            for mod in (se.gate_proj, se.up_proj) if inputs else ():
                hit(mod.weight, (i,))
            continue
        ex = view.moe_module(layer, "experts")
        hit(ex.down_proj, (e, slice(None), i))
        for r in (i, lay.width + i) if inputs else ():
            hit(ex.gate_up_proj, (e, r))
    return masks


@pytest.mark.parametrize("inputs", [False, True])
def test_edit_changes_exactly_the_named_neurons(edit_view, inputs):
    view = edit_view
    neurons = _neurons(view)
    before = {n: p.detach().clone() for n, p in view.model.named_parameters()}
    saved = D.zero_edit(view, neurons, inputs)
    masks = _named(view, neurons, inputs)
    touched = 0
    for name, p in view.model.named_parameters():
        old, new = before[name], p.detach()
        mask = masks.get(id(p))
        if mask is None:
            assert torch.equal(old, new), name  # bit-identical
            continue
        assert (new[mask] == 0).all(), name
        assert torch.equal(old[~mask], new[~mask]), name
        assert (old[mask] != 0).any()  # the edit did something
        touched += 1
    n_layers = len({layer for layer, _ in neurons})
    assert touched == len(masks) >= n_layers * (1 + inputs)
    assert len(before) > touched
    D.restore_edit(saved)
    assert all(torch.equal(v, p) for (_, v), p in zip(before.items(), view.model.parameters(),
                                                      strict=True))


@pytest.mark.parametrize("inputs", [False, True])
def test_edited_model_equals_zero_neurons(edit_view, inputs):
    view = edit_view
    neurons = _neurons(view)
    b = view.batch([[1, 5, 9, 13, 7], [1, 20, 4, 8, 11]])  # no padding: no NaN rows
    with torch.no_grad(), view.intervene(ZeroNeurons(neurons)):
        ref = view.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                         position_ids=b.position_ids).logits
    with torch.no_grad():
        plain = view.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                           position_ids=b.position_ids).logits
        with D.zero_edited(view, neurons, inputs):
            got = view.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             position_ids=b.position_ids).logits
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)
    assert not torch.allclose(plain, ref, atol=1e-6)


def test_saved_model_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    view = ModelView(tiny_model("llama"), TinyTokenizer())
    with D.zero_edited(view, NEURONS):
        D.save_edited(view, tmp_path / "m")
        edited = {k: v.clone() for k, v in view.model.state_dict().items()}
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64)
    assert all(torch.equal(edited[k], v) for k, v in back.state_dict().items())
    assert (back.model.layers[2].mlp.down_proj.weight[:, 39] == 0).all()
    assert (view.model.model.layers[2].mlp.down_proj.weight[:, 39] != 0).any()  # restored


def _tiny_pairs():
    return [D.Pair("ab c", "xy c", t, "t1") for t in "def"] + \
        [D.Pair("ab q", "xy q", t, "t2", "heldout") for t in "de"]


def test_metric_equals_hand_computation():
    view = ModelView(tiny_model("gemma3"), TinyTokenizer())
    pairs = _tiny_pairs()
    ea, eb = D.encode_pairs(view.tokenizer, pairs)
    got = D.gaps(view, ea, eb)
    tok = view.tokenizer
    hand = []
    for p in pairs:
        lp = []
        for prompt in (p.prompt_a, p.prompt_b):
            ids = torch.tensor([tok(prompt).input_ids])
            with torch.no_grad():
                logits = view.model(input_ids=ids).logits[0, -1]
            lp.append(float(torch.log_softmax(logits, -1)[tok(p.target, False).input_ids[0]]))
        hand.append(lp[0] - lp[1])
    assert np.allclose(got.numpy(), hand, atol=1e-10)
    df = D.pair_frame(pairs, got, ("a", "b"))
    table = D.metric_table(df, "gap_before")
    total = table[(table.split == "select") & (table.by == "total")].value.item()
    assert total == pytest.approx(np.mean(np.abs(hand[:3])))
    t2 = table[(table.split == "heldout") & (table.key == "t2")].value.item()
    assert t2 == pytest.approx(np.mean(np.abs(hand[3:])))
    # groups lean by the selection gap of their target, also on held-out rows
    lean = dict(zip("def", hand[:3], strict=True))
    for r in df.itertuples():
        assert r.group == ("a" if lean[r.target] >= 0 else "b")
    a_rows = [abs(h) for p, h in zip(pairs, hand, strict=True)
              if p.split == "select" and lean[p.target] >= 0]
    got_a = table[(table.split == "select") & (table.by == "group") & (table.key == "a")]
    if a_rows:
        assert got_a.value.item() == pytest.approx(np.mean(a_rows))


def test_selection_rule_equals_brute_force():
    rng = np.random.default_rng(0)
    rows = []
    for case in range(12):
        picks = rng.choice(30, size=6, replace=False)
        for rank, x in enumerate(picks, 1):
            rows.append({"case": f"p{case}", "rank": rank, "layer": int(x // 10),
                         "neuron": int(x % 10), "diff": float(rng.normal())})
    frame = pd.DataFrame(rows)
    got = D.select_neurons(frame, 7)
    count, total = Counter(), Counter()
    for r in rows:
        count[(r["layer"], r["neuron"])] += 1
        total[(r["layer"], r["neuron"])] += r["diff"]
    brute = sorted(count, key=lambda u: (-count[u], -total[u], u))[:7]
    assert list(zip(got.layer, got.neuron, strict=True)) == brute
    assert list(got["count"]) == [count[u] for u in brute]
    with pytest.raises(CnaError, match="raise top_k or lower n_neurons"):
        D.select_neurons(frame, 31)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma2", "gpt2", "phi3", "olmo2"])
def test_input_topk_equals_exhaustive(family, one_thread):
    view = ModelView(tiny_model(family), TinyTokenizer())
    pairs = _tiny_pairs()[:3]
    ea, eb = D.encode_pairs(view.tokenizer, pairs)
    tg = torch.tensor([e.answer_ids[0] for e in ea])
    a = score_neurons(view, ea, target=tg, progress=False)  # each run: its own scale
    b = score_neurons(view, eb, target=tg, progress=False)
    ref = diff_frame(a, b, top=8)
    exact = "exhaustive" if view.softcap else "certified"  # soft-capped: every neuron
    runs = [(None, exact), (0, exact)] + ([(60, "screened")] if not view.softcap else [])
    for screen, scoring in runs:  # the screen ignores soft-capping
        got = D.input_topk(view, ea, eb, 8, screen=screen)
        assert got.attrs["meta"]["scoring"] == scoring
        assert list(zip(got.layer, got.neuron, strict=True)) == \
            list(zip(ref.layer, ref.neuron, strict=True))
        assert np.allclose(got["diff"], ref["diff"], atol=1e-9)
    got = D.input_topk(view, ea, eb, 5, layers=[1, 2], screen=0)
    assert set(got.layer) <= {1, 2}


def test_input_importance_brute_force():
    """imp_a of one neuron by hand: the frozen lens at run A's own final-norm scale."""
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    ea, eb = D.encode_pairs(view.tokenizer, _tiny_pairs()[:1])
    got = D.input_topk(view, ea, eb, 120, screen=0)
    tgt = ea[0].answer_ids[0]
    with torch.no_grad(), view.capture(["resid_mid", "coef", "resid_post"], position=-1) as c:
        view.hidden(view.batch([ea[0].prompt_ids]))
    fin = c[("resid_post", 2)][0, 0]
    scale = torch.sqrt(fin.pow(2).mean() + view.final_norm.variance_epsilon)
    g, W = view.final_norm.weight, view.unembed.weight
    for r in got.head(5).itertuples():
        s = c[("resid_mid", r.layer)][0, 0]
        u = c[("coef", r.layer)][0, 0, r.neuron] * view.value_vectors(r.layer)[r.neuron]
        lp = [torch.log_softmax(W @ (g * x / scale), -1)[tgt] for x in (s + u, s)]
        assert float((lp[0] - lp[1]).detach()) == pytest.approx(r.imp_a, abs=1e-9)


def test_random_neurons_keep_layer_counts():
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    r1 = D.random_neurons(view, NEURONS, 1)
    assert Counter(a for a, _ in r1) == Counter(a for a, _ in NEURONS)
    assert len(set(r1)) == len(r1) and all(0 <= n < view.ffn_width(a) for a, n in r1)
    assert r1 == D.random_neurons(view, NEURONS, 1) != D.random_neurons(view, NEURONS, 2)


def test_run_debias_pairs_file(tmp_path, one_thread):
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt_a": "ab c", "prompt_b": "xy c", "targets": ["d", "e", "f"]}\n'
                    '{"prompt_a": "ab q", "prompt_b": "xy q", "targets": ["d"], '
                    '"split": "heldout", "template": "h"}\n')
    out = tmp_path / "o"
    s = S.run_debias(view, out, n_neurons=3, top_k=(2, 4, 8), seeds=2, pairs_file=path,
                     cost_n=1, progress=False, texts=["abc def", "hello there"])
    df = pd.read_csv(out / "debias.csv")
    assert len(df) == 4 * 3 and set(df.edit) == {"cna", "random"}
    assert (out / "model" / "config.json").is_file()
    names = [n["name"] for n in s["neurons"]]
    assert len(names) == 3
    # K search: the edited set is the rule's set at the K with the smallest selection metric
    search = {r["k"]: r["select_metric"] for r in s["k_search"]}
    assert list(search) == [2, 4, 8] and search[s["top_k"]] == min(search.values())
    frame = pd.read_csv(out / "debias_neurons.csv")
    assert frame["rank"].max() == 8
    rule = D.select_neurons(frame[frame["rank"] <= s["top_k"]], 3)
    assert names == [f"{a}.{b}" for a, b in zip(rule.layer, rule.neuron, strict=True)]
    # the reported "after" gaps are those of the ZeroNeurons intervention
    ea, eb = D.encode_pairs(view.tokenizer, D.load_pairs(path))
    neurons = [tuple(int(x) for x in n.split(".")) for n in names]
    want = D.gaps(view, ea, eb, ZeroNeurons(neurons)).numpy()
    assert np.allclose(df[df.edit == "cna"].gap_after, want, atol=1e-10)
    tot = [m for m in s["metric"] if m["split"] == "select" and m["by"] == "total"][0]
    assert tot["cna"] == pytest.approx(np.abs(want[:3]).mean())
    assert s["costs"]["before"]["n"] == 4 and len(s["costs"]["random"]) == 2
    # the default top-K is the certified exact one, and debias.json says so
    assert s["scoring"]["method"] == "certified" and s["scoring"]["exact"]
    assert s["settings"]["screen"] is None and s["scoring"]["screen"] is None
    saved = json.loads((out / "debias.json").read_text())
    assert saved["scoring"] == s["scoring"]
    # --screen N: the approximate option, recorded as such
    s2 = S.run_debias(view, tmp_path / "o2", n_neurons=3, top_k=(2, 4, 8), seeds=0,
                      pairs_file=path, cost_n=1, screen=60, progress=False, texts=["abc def"],
                      save_model=False)
    assert s2["scoring"]["method"] == "screened" and not s2["scoring"]["exact"]
    assert s2["scoring"]["screen"] == s2["settings"]["screen"] == 60
    with pytest.raises(CnaError, match="^screen must be >= 0"):
        S.run_debias(view, tmp_path / "o3", pairs_file=path, screen=-1, progress=False)
    from cnalens.report.sections.debias import SECTION

    html = SECTION.render(out, {})
    assert "data:image/png" in html and "CNA edit" in html and names[0] in html


@pytest.mark.parametrize("text, msg", [
    ("not json\n", "not JSON"),
    ('{"prompt_a": "a"}\n', "missing prompt_b, targets"),
    ('{"prompt_a": "a", "prompt_b": "b", "targets": []}\n', "non-empty list"),
    ('{"prompt_a": "a", "prompt_b": "b", "targets": ["x"], "split": "dev"}\n', "split"),
    ('{"prompt_a": "a", "prompt_b": "b", "targets": ["x"], "split": "heldout"}\n',
     "no pair has split 'select'"),
    ("\n", "has no pairs"),
    ("[1, 2]\n", "expected an object"),
])
def test_bad_pairs_file(tmp_path, text, msg):
    p = tmp_path / "p.jsonl"
    p.write_text(text)
    with pytest.raises(CnaError, match=msg):
        D.load_pairs(p)


def test_errors_on_tiny():
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    with pytest.raises(CnaError, match="not one token"):
        D.encode_pairs(view.tokenizer, [D.Pair("ab", "cd", "xyz", "t")])
    with pytest.raises(CnaError, match="empty profession list"):
        D.encode_pairs(view.tokenizer, [])
    with pytest.raises(CnaError, match="empty profession list"):
        D.professions_from(view, [" ", ""])
    with pytest.raises(CnaError, match="larger than the model's 120 FFN neurons"):
        D.check_n(view, 121, None)
    with pytest.raises(CnaError, match="40 FFN neurons in the chosen layers"):
        D.check_n(view, 41, [1])


def _cli(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--professions", " , "], "empty profession list"),
    (["--pairs", "/no/such.jsonl"], "pairs file not found"),
    (["--pairs", "BAD"], "not JSON"),
    (["--pairs", "x.jsonl", "--professions", "nurse"], "not both"),
    (["--model", "smollm2-135m", "--n-neurons", "99999999"], "larger than the model's"),
    (["--screen", "-5"], "--screen must be >= 0"),
    # the library names its parameter (per_group), the CLI shows the flag
    (["--model", "smollm2-135m", "--per-group", "0"], "--per-group must be >= 1, got 0"),
    (["--model", "smollm2-135m", "--professions", "nurse,xylophonist"], "not one token"),
])
def test_cli_errors(capsys, tmp_path, argv, msg):
    argv = list(argv)
    if "BAD" in argv:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{oops\n")
        argv[argv.index("BAD")] = str(bad)
    out = tmp_path / "out"
    rc, err = _cli(capsys, "debias", *argv, "--out", str(out), "-q")
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and msg in lines[0], err
    assert not out.exists()


def test_shipped_lists():
    vocab, fallback = D.profession_lists()
    assert set(fallback) <= vocab and "waitress" not in vocab and len(vocab) > 200
    text = D.neutral_text()
    assert len(text) >= 200
    gendered = {"he", "she", "his", "her", "man", "woman", "men", "women", "mother", "father"}
    assert not {w.strip(".,").lower() for t in text for w in t.split()} & gendered


@pytest.mark.real
def test_real_professions_and_edit(smollm2, one_thread):
    """Real model: the chosen professions are single tokens in the shipped list, and the
    weight edit equals ZeroNeurons on real prompts."""
    view = smollm2
    words = D.candidate_words(view, 30)
    vocab, _ = D.profession_lists()
    assert len(words) >= 4 and set(words) <= vocab and "nurse" in words
    prof = D.professions_from(view, words[:4])
    assert set(prof.group) <= {"female", "male"}
    pairs = D.gender_pairs(prof.word.tolist(), "heldout")
    ea, eb = D.encode_pairs(view.tokenizer, pairs)
    neurons = [(29, 778), (28, 45), (3, 10)]
    want = D.gaps(view, ea, eb, ZeroNeurons(neurons))
    with D.zero_edited(view, neurons):
        got = D.gaps(view, ea, eb)
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(D.gaps(view, ea, eb), want, atol=1e-4)
    json.dumps(prof.to_dict("records"))


class _SpacelessTokenizer(TinyTokenizer):
    """Spaces are not tokens, so " 7" is one token after any prompt (like "Ġnurse")."""

    def __call__(self, text, add_special_tokens=True):
        return super().__call__(text.replace(" ", ""), add_special_tokens)


def _stage_ctx(view, out, seed=0):
    from cnalens.pipeline import PROFILES, StageContext

    return StageContext(view, out, PROFILES["smoke"], ("+",), seed, 8, False, {}, None, {})


def test_debias_stage_writes_its_outputs(tmp_path, monkeypatch, one_thread):
    """The main job's stage with its defaults (18 neurons, K in 5..50, 3 random controls) on a
    tiny model whose "professions" are the digits (single tokens that decode back)."""
    from transformers import AutoModelForCausalLM

    words = [str(d) for d in range(10)]
    monkeypatch.setattr(D, "profession_lists", lambda: (frozenset(words), ("3", "7")))
    monkeypatch.setattr(S, "neutral_text", lambda: ("abc def.", "the cat sat on the mat."))
    view = ModelView(tiny_model("llama"), _SpacelessTokenizer())
    weights = {k: v.clone() for k, v in view.model.state_dict().items()}
    out = tmp_path / "run"
    S.debias_stage(_stage_ctx(view, out, seed=4))
    assert sorted(p.name for p in out.iterdir()) == ["debias.csv", "debias.json",
                                                      "debias_neurons.csv", "model"]
    s = json.loads((out / "debias.json").read_text())
    assert s["settings"]["profile"] == "smoke" and s["settings"]["seed"] == 4
    assert s["scoring"]["method"] == "certified"  # the stage's default: exact
    got_words = [p["word"] for p in s["professions"]]
    assert set(got_words) <= set(words) and len(got_words) == len(set(got_words)) >= 4
    n_sel, n_held = 3 * len(got_words), 4 * len(got_words)
    assert s["n_pairs"] == {"select": n_sel, "heldout": n_held}
    # one row per pair and edit (the CNA edit and 3 random controls)
    table = pd.read_csv(out / "debias.csv")
    assert len(table) == 4 * (n_sel + n_held)
    assert table.groupby("edit").size().to_dict() == {"cna": n_sel + n_held,
                                                      "random": 3 * (n_sel + n_held)}
    assert sorted(table.seed.dropna().unique()) == [5, 6, 7]
    # each selection pair's top-50 by imp_a - imp_b, and the 18 neurons by the rule at the K
    # with the smallest selection metric
    frame = pd.read_csv(out / "debias_neurons.csv")
    assert frame.groupby("case").size().tolist() == [50] * n_sel
    assert s["top_k"] in (5, 10, 20, 50) and s["top_k"] == min(
        s["k_search"], key=lambda r: (r["select_metric"], r["k"]))["k"]
    rule = D.select_neurons(frame[frame["rank"] <= s["top_k"]], 18)
    names = [n["name"] for n in s["neurons"]]
    assert names == [f"{a}.{b}" for a, b in zip(rule.layer, rule.neuron, strict=True)]
    # the reported gaps after the edit are those of zeroing the neurons, recomputed here
    pairs = D.gender_pairs(got_words, "select") + D.gender_pairs(got_words, "heldout")
    ea, eb = D.encode_pairs(view.tokenizer, pairs)
    neurons = [tuple(int(x) for x in n.split(".")) for n in names]
    want = D.gaps(view, ea, eb, ZeroNeurons(neurons)).numpy()
    assert np.allclose(table[table.edit == "cna"].gap_after, want, atol=1e-10)
    # the edited set is the one of the K search with the smallest selection metric (on this
    # random model the default 18 of 120 neurons need not lower it: 1.249 -> 1.279 here)
    tot = {m["split"]: m for m in s["metric"] if m["by"] == "total"}
    before = np.abs(D.gaps(view, ea, eb).numpy())
    assert tot["select"]["before"] == pytest.approx(before[:n_sel].mean())
    assert tot["heldout"]["before"] == pytest.approx(before[n_sel:].mean())
    assert tot["select"]["cna"] == pytest.approx(np.abs(want[:n_sel]).mean())
    assert tot["select"]["cna"] == pytest.approx(min(r["select_metric"] for r in s["k_search"]))
    assert tot["heldout"]["cna"] == pytest.approx(np.abs(want[n_sel:]).mean())
    # the saved model is the edited one; the view's weights are back
    saved = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float64)
    for layer, n in neurons:
        assert (saved.model.layers[layer].mlp.down_proj.weight[:, n] == 0).all()
    assert all(torch.equal(v, view.model.state_dict()[k]) for k, v in weights.items())


def test_debias_stage_bad_input(tmp_path):
    """No profession is one token for this tokenizer: one CnaError, nothing written."""
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    out = tmp_path / "run"
    with pytest.raises(CnaError, match="no single-token profession"):
        S.debias_stage(_stage_ctx(view, out))
    assert not out.exists() or not any(out.iterdir())


def test_metric_summary_interval_and_verdict():
    """The CNA edit's change of mean |gap| with a paired bootstrap interval over the
    row's pairs (recomputed by hand) and its verdict against the random controls."""
    rng = np.random.default_rng(3)
    n = 40
    df = pd.DataFrame({"split": ["heldout"] * n + ["select"] * 10,
                       "template": ["t1", "t2"] * 25, "group": ["f"] * 25 + ["m"] * 25,
                       "gap_before": rng.normal(0, 1, n + 10)})
    shrink = pd.Series(df["gap_before"] * rng.uniform(0.3, 0.7, n + 10))  # clearly smaller
    same = pd.Series(df["gap_before"] * rng.uniform(0.95, 1.05, n + 10))
    rows = D.metric_summary(df, {"cna": shrink, "random_0": same})
    tot = next(r for r in rows if r["split"] == "heldout" and r["by"] == "total")
    b = df["gap_before"].abs().to_numpy()[:n]
    a = shrink.abs().to_numpy()[:n]
    assert tot["cna_change"] == pytest.approx(a.mean() / b.mean() - 1)
    idx = np.random.default_rng(0).integers(0, n, size=(2000, n))  # stats' resampling
    boot = a[idx].mean(1) / b[idx].mean(1) - 1
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert (tot["cna_change_lo"], tot["cna_change_hi"]) == pytest.approx((lo, hi))
    assert tot["cna_change_lo"] < tot["cna_change"] < tot["cna_change_hi"] < 0
    assert tot["verdict"] == "reproduces"
    # a per-template row uses only its own pairs
    t1 = next(r for r in rows if r["split"] == "heldout" and r["key"] == "t1")
    m = (df["split"] == "heldout") & (df["template"] == "t1")
    bt, at = df["gap_before"].abs()[m].to_numpy(), shrink.abs()[m].to_numpy()
    assert t1["n"] == len(bt) == 20
    assert t1["cna_change"] == pytest.approx(at.mean() / bt.mean() - 1)
    idx = np.random.default_rng(0).integers(0, 20, size=(2000, 20))
    lo, hi = np.percentile(at[idx].mean(1) / bt[idx].mean(1) - 1, [2.5, 97.5])
    assert (t1["cna_change_lo"], t1["cna_change_hi"]) == pytest.approx((lo, hi))
    sel = next(r for r in rows if r["split"] == "select" and r["by"] == "total")
    assert sel["n"] == 10 and sel["verdict"] == "cannot be judged"  # under 20 pairs
    # an edit no better than random does not reproduce
    rows = D.metric_summary(df, {"cna": same, "random_0": shrink})
    tot = next(r for r in rows if r["split"] == "heldout" and r["by"] == "total")
    assert tot["verdict"] == "does not"
    # without random controls: the interval, no verdict
    rows = D.metric_summary(df, {"cna": shrink})
    assert "verdict" not in rows[0] and "cna_change_lo" in rows[0]
