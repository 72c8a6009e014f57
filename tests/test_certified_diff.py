"""Certified CNA top-K (``certified.certified_cna``): the two-sided bounds really bound, and the
certified top-K equals the exhaustive one (tiny float64 models of every family, mixtures of
experts included; gemma3-270m and the 0.5B Qwen on a few cases, float32, with design.md's
1e-4 tie rule)."""

import dataclasses

import numpy as np
import pytest
import torch

from cnalens import certified as CE
from cnalens import scores as S
from cnalens import states as ST
from cnalens.data.cases import Case, Encoded
from cnalens.interventions import ScaleHeads, ZeroHeads
from cnalens.models import ModelView
from tiny import FAMILY_NAMES, MOE_NAMES, TinyTokenizer, tiny_model

# every tiny family without final-logit soft-capping (Gemma 2 falls back: tested below),
# mixtures of experts too (only neurons routed in both runs are ranked, and bounded)
FAMILIES = [f for f in FAMILY_NAMES + MOE_NAMES if f != "gemma2"]
SEQS = [[1, 5, 9, 13, 7, 22], [1, 40, 3, 3, 17, 9], [1, 8, 8, 30, 31, 4],
        [1, 11, 52, 6, 6, 19]]
HEADS = {"one": [(1, 2)], "layer0": [(0, 0), (0, 1), (0, 3)], "spread": [(0, 1), (2, 2)]}


def _enc(seqs=SEQS):
    return [Encoded(Case(f"q{i}", "t", case_id=f"c{i}"), tuple(s), (5 + i,))
            for i, s in enumerate(seqs)]


def _view(name):
    return ModelView(tiny_model(name), TinyTokenizer(), {"spec": name})


def _runs(v, heads, boost=1.0):
    """Run A (the model), run B (``heads`` zeroed) and both exhaustively scored on A's
    target and scale. ``boost`` scales every coefficient of both runs (large |t|)."""
    enc = _enc()
    sa = ST.case_states(v, enc)
    sb = ST.case_states(v, enc, ZeroHeads(heads))
    if boost != 1.0:
        sa = dataclasses.replace(sa, coef=sa.coef * boost)
        sb = dataclasses.replace(sb, coef=sb.coef * boost)
    a = S.score_neurons(v, None, states=sa, progress=False)
    b = S.score_neurons(v, None, states=sb, target=a.target, scale=a.scale, progress=False)
    return sa, sb, a, b


@pytest.mark.parametrize("exact_ranges", [True, False])
@pytest.mark.parametrize("head_tokens", [0, 8, 256])
@pytest.mark.parametrize("boost", [1.0, 25.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_bounds_bound_the_exact_importance(family, boost, head_tokens, exact_ranges,
                                           one_thread):
    """lo <= imp <= hi in both runs for every neuron, with no exact head (0 tokens: only
    Jensen and Edmundson-Madansky), a partial head and the whole vocabulary (exact); with
    exact projection ranges and with Cauchy-Schwarz ones."""
    v = _view(family)
    CE.clear_range_cache()
    sa, sb, a, b = _runs(v, HEADS["spread"], boost)
    lo, hi = CE.cna_bounds(v, sa, sb, head_tokens=head_tokens, exact_ranges=exact_ranges)
    for r, run in enumerate((a, b)):
        imp = run.imp.double()
        ok = torch.isfinite(imp)
        assert torch.equal(ok, torch.isfinite(lo[r])) and torch.equal(ok, torch.isfinite(hi[r]))
        assert bool((lo[r][ok] <= imp[ok] + 1e-9).all()), (r, (lo[r] - imp)[ok].max())
        assert bool((imp[ok] <= hi[r][ok] + 1e-9).all()), (r, (imp - hi[r])[ok].max())
        if head_tokens >= v.vocab_size:  # every token exact: the bounds are the score
            np.testing.assert_allclose(lo[r][ok], imp[ok], atol=1e-9)
            np.testing.assert_allclose(hi[r][ok], imp[ok], atol=1e-9)


OTHER_SEQS = [[1, 5, 9, 14, 7, 22], [1, 40, 3, 4, 17, 9], [1, 8, 8, 30, 32, 4],
              [1, 11, 52, 6, 7, 19]]


@pytest.mark.parametrize("boost", [1.0, 25.0])
@pytest.mark.parametrize("comparison", ["zeroed", "scaled", "inputs"])
@pytest.mark.parametrize("family", FAMILIES)
def test_difference_bounds_bound_the_exact_difference(family, comparison, boost, one_thread):
    """lo <= imp_a - imp_b <= hi for the difference's own bound (intersected with the runs'
    intervals): heads zeroed, heads scaled by 0.97 (runs that differ little, as a LoRA's do)
    and two prompts scored on one target, each with its own scale; where the runs differ
    little, it is under half the runs' intervals' width for most neurons (with no exact
    head, where the tails decide)."""
    v = _view(family)
    CE.clear_range_cache()
    enc = _enc()
    sa = ST.case_states(v, enc)
    if comparison == "inputs":
        sb = ST.case_states(v, _enc(OTHER_SEQS))
    else:
        sb = ST.case_states(v, enc, ScaleHeads(HEADS["spread"], 0.0 if comparison == "zeroed"
                                               else 0.97))
    if boost != 1.0:
        sa = dataclasses.replace(sa, coef=sa.coef * boost)
        sb = dataclasses.replace(sb, coef=sb.coef * boost)
    own = comparison == "inputs"
    a = S.score_neurons(v, None, states=sa, progress=False)
    b = S.score_neurons(v, None, states=sb, target=a.target, scale=None if own else a.scale,
                        progress=False)
    d = (a.imp - b.imp).double()
    for head_tokens in (0, 8):
        lo, hi = CE.cna_bounds(v, sa, sb, head_tokens=head_tokens, own_scales=own,
                               difference=True)
        ok = torch.isfinite(d)
        assert torch.equal(ok, torch.isfinite(lo)) and torch.equal(ok, torch.isfinite(hi))
        assert bool((lo[ok] <= d[ok] + 1e-9).all()), (lo - d)[ok].max()
        assert bool((d[ok] <= hi[ok] + 1e-9).all()), (d - hi)[ok].max()
        rlo, rhi = CE.cna_bounds(v, sa, sb, head_tokens=head_tokens, own_scales=own)
        wide = (rhi[0] - rlo[1]) - (rlo[0] - rhi[1])
        if comparison == "scaled" and boost == 1.0 and head_tokens == 0:
            assert float((hi - lo < 0.5 * wide)[ok].double().mean()) > 0.8


@pytest.mark.parametrize("rank", ["decrease", "increase", "abs"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("family", FAMILIES)
def test_certified_cna_equals_exhaustive(family, heads, rank, one_thread):
    v = _view(family)
    sa, sb, a, b = _runs(v, HEADS[heads])
    n_units = sum(v.ffn_width(x) for x in range(v.n_layers))
    for head_tokens, group in ((4, 1), (4, 8), (256, 3)):  # cases certified together
        for k in (1, 5, 20):
            got, stats = CE.certified_cna(v, sa, sb, k, by=rank, head_tokens=head_tokens,
                                         step=4, group=group)
            ex = S.diff_frame(a, b, top=k, by=rank)
            assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
                list(zip(got.case, got.layer, got.neuron, strict=True)), (k, head_tokens)
            assert list(got["rank"]) == list(ex["rank"])
            for col in ("imp_a", "imp_b", "diff", "coef_a", "coef_b"):
                np.testing.assert_allclose(got[col], ex[col], atol=1e-9, err_msg=col)
            assert stats["method"] == "certified" and stats["n_units"] == n_units
            assert all(k <= n <= c <= n_units for n, c in
                       zip(stats["n_exact"], stats["n_candidates"], strict=True))
    # the whole vocabulary exact (256 > 61 tokens): bounds are tight, K=1 needs few neurons
    _, stats = CE.certified_cna(v, sa, sb, 1, by=rank, step=1)
    assert stats["n_exact_total"] < n_units * len(sa)


def test_projection_in_small_chunks_equals_exhaustive(one_thread, monkeypatch):
    """Several chunks per round, each mixing layers (PROJECT_CHUNK = 7): the same top-K as
    the exhaustive ranking (rows of X aligned with the chunk's neurons)."""
    monkeypatch.setattr(CE, "PROJECT_CHUNK", 7)
    v = _view("qwen2")
    sa, sb, a, b = _runs(v, HEADS["spread"])
    for k in (5, 20):
        got, _ = CE.certified_cna(v, sa, sb, k, head_tokens=0, step=4, group=4)
        ex = S.diff_frame(a, b, top=k)
        assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
            list(zip(got.case, got.layer, got.neuron, strict=True)), k
        np.testing.assert_allclose(got["diff"], ex["diff"], atol=1e-9)


def test_large_coefficients_and_restricted_layers(one_thread):
    """|t| large (Edmundson-Madansky's linear regime) and a layer subset."""
    v = _view("llama")
    sa, sb, a, b = _runs(v, HEADS["layer0"], boost=25.0)
    for layers in (None, [1, 2]):
        for k in (1, 5, 20):
            got, _ = CE.certified_cna(v, sa, sb, k, layers=layers, head_tokens=2)
            keep = set(layers or range(v.n_layers))
            d = (a.imp - b.imp).clone()
            d[:, [x for x in range(v.n_layers) if x not in keep]] = float("nan")
            ex, _ = S.ranked_rows(d, a.imp, b.imp, a.coef, b.coef, a.case_ids, k)
            assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
                list(zip(got.case, got.layer, got.neuron, strict=True)), (layers, k)


def test_range_cache_follows_the_weights(one_thread):
    """The projection range is cached by the weights' content: an in-place edit of the
    value vectors or of the unembedding gives new ranges, and the bounds stay valid."""
    v = _view("llama")
    CE.clear_range_cache()
    sa, sb, a, b = _runs(v, HEADS["one"])
    CE.cna_bounds(v, sa, sb, head_tokens=0)
    n0 = len(CE._RANGES)
    assert all(bool(r.known.all()) for r in CE._RANGES.values())
    assert n0 == v.n_layers
    CE.cna_bounds(v, sa, sb, head_tokens=0)
    assert len(CE._RANGES) == n0  # hit
    with torch.no_grad():
        v.module(2, "down_proj").weight.mul_(3.0)
    assert len(CE._RANGES) == n0
    sa, sb, a, b = _runs(v, HEADS["one"])
    lo, hi = CE.cna_bounds(v, sa, sb, head_tokens=0)
    assert len(CE._RANGES) == n0 + 1  # layer 2's value vectors changed
    with torch.no_grad():
        v.unembed.weight[7].mul_(4.0)
    sa, sb, a, b = _runs(v, HEADS["one"])
    lo, hi = CE.cna_bounds(v, sa, sb, head_tokens=0)
    assert len(CE._RANGES) == n0 + 1 + v.n_layers  # every layer: new unembedding
    for r, run in enumerate((a, b)):
        ok = torch.isfinite(run.imp)
        assert bool((lo[r][ok] <= run.imp.double()[ok] + 1e-9).all())
        assert bool((run.imp.double()[ok] <= hi[r][ok] + 1e-9).all())


def test_exact_ranges_only_for_candidates_and_kept(one_thread):
    v = _view("llama")
    CE.clear_range_cache()
    sa, sb, _, _ = _runs(v, HEADS["one"])
    _, st = CE.certified_cna(v, sa, sb, 1, head_tokens=0)
    assert 0 < st["n_ranges_computed"] <= st["n_units"]
    _, again = CE.certified_cna(v, sa, sb, 1, head_tokens=0)
    assert again["n_ranges_computed"] == 0  # cached by the weights


def test_exact_ranges_persist_on_disk_by_weights(one_thread, tmp_path, monkeypatch):
    """A later process (here: an emptied memory cache) reads the ranges back from
    $CNALENS_CACHE/ranges; other weights get other files; a corrupt file is recomputed."""
    monkeypatch.setenv("CNALENS_CACHE", str(tmp_path))
    v = _view("llama")
    CE.clear_range_cache()
    sa, sb, _, _ = _runs(v, HEADS["one"])
    first, st = CE.certified_cna(v, sa, sb, 3, head_tokens=0)
    files = sorted((tmp_path / "ranges").glob("*.safetensors"))
    # a file per layer where some neuron was a candidate (here layer 0, below the zeroed
    # head, has none: its difference is bounded to zero)
    n_files = sum(bool(r.known.any()) for r in CE._RANGES.values())
    assert st["n_ranges_computed"] > 0 and len(files) == n_files >= 1
    CE._RANGES.clear()  # memory only: as a new process starts
    again, st2 = CE.certified_cna(v, sa, sb, 3, head_tokens=0)
    assert st2["n_ranges_computed"] == 0
    assert first[["case", "layer", "neuron"]].equals(again[["case", "layer", "neuron"]])
    assert np.allclose(first["diff"], again["diff"], atol=1e-12)
    files[0].write_bytes(b"not a tensor file")
    CE._RANGES.clear()
    _, st3 = CE.certified_cna(v, sa, sb, 3, head_tokens=0)
    assert st3["n_ranges_computed"] > 0  # that layer was recomputed
    other = _view("qwen3")  # other weights: other files beside these
    CE._RANGES.clear()
    CE.certified_cna(other, *_runs(other, HEADS["one"])[:2], 3, head_tokens=0)
    n_other = sum(bool(r.known.any()) for r in CE._RANGES.values())
    assert len(list((tmp_path / "ranges").glob("*.safetensors"))) == n_files + n_other > n_files
    monkeypatch.setenv("CNALENS_RANGE_CACHE", "0")
    CE.clear_range_cache()
    CE.certified_cna(v, sa, sb, 3, head_tokens=0)
    assert not (tmp_path / "ranges").exists()


def test_softcap_falls_back_to_exhaustive(one_thread):
    v = _view("gemma2")
    sa, sb, a, b = _runs(v, HEADS["one"])
    got, stats = CE.certified_cna(v, sa, sb, 5)
    assert stats["method"] == "exhaustive" and "soft-capping" in stats["why"]
    ex = S.diff_frame(a, b, top=5)
    assert list(zip(ex.case, ex.layer, ex.neuron, strict=True)) == \
        list(zip(got.case, got.layer, got.neuron, strict=True))
    np.testing.assert_allclose(got["diff"], ex["diff"], atol=1e-9)


def test_errors():
    from cnalens.errors import CnaError

    v = _view("llama")
    sa, sb, _, _ = _runs(v, HEADS["one"])
    with pytest.raises(CnaError, match="k must be at least 1"):
        CE.certified_cna(v, sa, sb, 0)
    with pytest.raises(CnaError, match="unknown rank"):
        CE.certified_cna(v, sa, sb, 3, by="up")
    with pytest.raises(CnaError, match="run-B cases"):
        CE.certified_cna(v, sa, ST.concat_states([sb, sb]), 3)


# ----------------------------------------------------------------------------- real models
def _real_cases():
    from cnalens.data.arithmetic import format_prefix

    prefix = format_prefix("+", "eq", [(2, 4), (1, 6), (4, 3)])
    return [Case(f"{x}+{y}=", str(x + y), prefix, case_id=f"{x}+{y}")
            for x, y in ((3, 5), (1, 2), (4, 4))]


def _same_topk(ex, got, d: dict, tie: float = 1e-4) -> bool:
    """Equal neuron lists, allowing swaps only among keys within ``tie`` (design.md)."""
    a = list(zip(ex.case, ex.layer, ex.neuron, strict=True))
    b = list(zip(got.case, got.layer, got.neuron, strict=True))
    if a == b:
        return True
    diff = set(a) ^ set(b)
    if not diff:  # the same neurons: only neighbours within ``tie`` may swap places
        return all(abs(d[x] - d[y]) < tie for x, y in zip(a, b, strict=True) if x != y)
    vals = [d[x] for x in diff]
    return max(vals) - min(vals) < tie


def _real_check(v, head, layers):
    cases = _real_cases()
    sa = ST.case_states(v, cases)
    sb = ST.case_states(v, cases, ZeroHeads([head]))
    a = S.score_neurons(v, None, states=sa, layers=layers, progress=False)
    b = S.score_neurons(v, None, states=sb, target=a.target, scale=a.scale, layers=layers,
                        progress=False)
    d = (a.imp - b.imp).numpy()
    keys = {(c, la, ix): d[i, la, ix] for i, c in enumerate(a.case_ids) for la in layers
            for ix in range(v.ffn_width(la))}
    lo, hi = CE.cna_bounds(v, sa, sb, layers=layers)
    for r, run in enumerate((a, b)):
        ok = torch.isfinite(run.imp)
        imp = run.imp.double()
        assert bool((lo[r][ok] <= imp[ok] + 1e-4).all())
        assert bool((imp[ok] <= hi[r][ok] + 1e-4).all())
    for k in (1, 10, 50):
        got, stats = CE.certified_cna(v, sa, sb, k, layers=layers)
        ex = S.diff_frame(a, b, top=k)
        assert _same_topk(ex, got, keys), k
        np.testing.assert_allclose(np.sort(got["diff"]), np.sort(ex["diff"]), atol=1e-4)
        assert stats["n_exact_total"] < stats["n_units"] * len(cases)


@pytest.mark.real
@pytest.mark.slow
def test_real_gemma_certified_cna(gemma):
    _real_check(gemma, (7, 0), [15, 16, 17])


@pytest.mark.real
@pytest.mark.slow
def test_real_qwen_certified_cna(qwen05):
    _real_check(qwen05, (14, 3), [21, 22, 23])


@pytest.mark.parametrize("entry", ["certified_cna", "certified_topk", "cna_bounds",
                                   "screened_cna"])
def test_certification_runs_in_true_float32(entry, monkeypatch):
    """TF32 products would break the bounds' rounding allowance: each certified entry
    point switches them off while it runs and restores the caller's setting, also after
    an error."""
    v = _view("llama")
    sa, sb, _, _ = _runs(v, [(1, 0)])
    seen = []
    lens = CE.Lens

    def spy(*args, **kw):  # every entry point builds its lens inside the block
        seen.append(torch.get_float32_matmul_precision())
        return lens(*args, **kw)

    monkeypatch.setattr(CE, "Lens", spy)
    calls = {"certified_cna": lambda: CE.certified_cna(v, sa, sb, 3, layers=[1, 2]),
             "certified_topk": lambda: CE.certified_topk(v, _enc(), 3, layers=[1, 2]),
             "cna_bounds": lambda: CE.cna_bounds(v, sa, sb, layers=[1, 2]),
             "screened_cna": lambda: CE.screened_cna(v, sa, sb, 3, layers=[1, 2])}
    torch.set_float32_matmul_precision("high")
    try:
        calls[entry]()
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError, match="boom"), CE.true_float32():
            raise RuntimeError("boom")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
