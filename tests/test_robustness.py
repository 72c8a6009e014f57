"""Head-ranking robustness across templates and prefixes, against direct scans."""

from scipy.stats import spearmanr

from cnalens.data.arithmetic import arithmetic_cases, default_examples
from cnalens.heads import scan_heads
from cnalens.models import ModelView
from cnalens.robustness import alternative_examples, head_robustness
from tiny import TinyTokenizer, tiny_model


def test_robustness_matches_direct_scans():
    view = ModelView(tiny_model("llama"), TinyTokenizer())
    res = head_robustness(view, ["+"], templates=("eq", "verbal"), n=6, progress=False)
    assert list(res[["a", "b"]].itertuples(index=False, name=None)) == [
        ("eq", "verbal"), ("eq", "eq+alt-prefix"), ("verbal", "eq+alt-prefix")]
    a = scan_heads(view, arithmetic_cases(["+"], (1,), ("eq",), n=6), progress=False)
    b = scan_heads(view, arithmetic_cases(["+"], (1,), ("verbal",), n=6), progress=False)
    want = spearmanr(a.sort_values(["layer", "head"])["dlogp"],
                     b.sort_values(["layer", "head"])["dlogp"]).statistic
    assert abs(res.spearman_dlogp.iloc[0] - want) < 1e-12
    assert res.n_heads.iloc[0] == view.n_layers * view.n_heads


def test_alternative_prefix_differs():
    alt = alternative_examples("+", "eq")
    assert len(alt) == 3 and not set(alt) & set(default_examples("+", "eq", 1))
