"""The HTML report: built from a fake results folder, no model needed."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from cnalens.errors import CnaError
from cnalens.report import Section, registry, render_report

TEMPLATES = ("eq", "nl")


def _run(stages=("eval",)) -> dict:
    return {
        "cnalens_version": "0.1.0",
        "command": "cnalens run smollm2-135m --profile quick",
        "profile": "quick",
        "started": "2025-01-02T10:00:00+00:00",
        "finished": "2025-01-02T10:03:05+00:00",
        "seconds": 185.0,
        "stages": list(stages),
        "model": {
            "spec": "smollm2-135m",
            "family": "llama",
            "model_type": "llama",
            "n_layers": 30,
            "n_heads": 9,
            "n_kv_heads": 3,
            "head_dim": 64,
            "d_model": 576,
            "d_ffn": 1536,
            "vocab_size": 49152,
            "dtype": "float32",
            "device": "cpu",
            "source": "hf",
            "gguf_sha256": None,
        },
        "settings": {"seed": 0, "n_per_cell": 100},
    }


def _row(op, digits, template, acc, lo, hi, n=100) -> dict:
    return {
        "op": op,
        "digits": digits,
        "template": template,
        "n": n,
        "acc": acc,
        "acc_lo": lo,
        "acc_hi": hi,
        "acc_first": min(1.0, acc + 0.05),
        "acc_first_lo": max(0.0, lo + 0.05),
        "acc_first_hi": min(1.0, hi + 0.05),
        "logp": -1.2345,
    }


def _eval_rows() -> list[dict]:
    rows = [_row("+", 1, "eq", 0.71, 0.621, 0.786)]
    rows += [_row("+", 1, "nl", 0.55, 0.452, 0.644)]
    rows += [_row("+", 2, t, 0.40, 0.31, 0.50) for t in TEMPLATES]
    rows += [_row("*", 1, t, 0.25, 0.17, 0.34) for t in TEMPLATES]
    rows += [_row("custom", 0, "custom", 0.5, 0.3, 0.7, n=20)]
    rows += [_row("+", 1, "all", 0.63, 0.56, 0.69, n=200)]  # pooled, display only
    rows += [_row("all", 0, "all", 0.44, 0.40, 0.48, n=820)]
    return rows


def _cases() -> pd.DataFrame:
    prefix = "1+1=2\n2+3=5\n"
    rows = []
    for i in range(40):
        correct = i % 3 == 0
        rows.append(
            {
                "case_id": i,
                "op": "+",
                "digits": 1 + i % 2,
                "template": TEMPLATES[i % 2],
                "prompt": (prefix if i % 2 == 0 else "Q: ") + f"{i}+7=",
                "target": str(i + 7),
                "pred": str(i + 7) if correct else f"{i + 8}<x>",
                "correct": correct,
                "correct_first": True,
                "logp": -0.5,
            }
        )
    return pd.DataFrame(rows)


def make_dir(tmp_path: Path, *, cases: bool = True, eval_files: bool = True) -> Path:
    d = tmp_path / "results"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps(_run()), encoding="utf-8")
    if eval_files:
        pd.DataFrame(_eval_rows()).to_csv(d / "eval.csv", index=False)
        meta = {
            "n_cases": 820,
            "seconds": 42.0,
            "batch_size": 16,
            "prefixes": {"+|eq": "1+1=2\n2+3=5\n", "+|nl": "What is 1 plus 1? 2 \n", "*|eq": ""},
            "max_new_tokens": 8,
        }
        (d / "eval.json").write_text(json.dumps(meta), encoding="utf-8")
    if cases:
        _cases().to_csv(d / "eval_cases.csv", index=False)
    return d


def test_render_eval_report(tmp_path):
    d = make_dir(tmp_path)
    out = render_report(d, strict=True)
    assert out == d / "report.html"
    page = out.read_text(encoding="utf-8")

    # header: profile, time, command, model summary
    assert "quick" in page
    assert "3 min 05 s" in page
    assert "cnalens run smollm2-135m --profile quick" in page
    assert "smollm2-135m" in page and "49,152" in page and "9 (KV 3)" in page

    # eval section: title, table values with intervals, compact columns, image, prefixes
    assert 'id="eval"' in page and "Arithmetic accuracy (eval)" in page
    assert "71.0% [62.1, 78.6]" in page
    assert "55.0% [45.2, 64.4]" in page
    assert "63.0% [56.0, 69.0]" in page  # pooled row, shown as given
    assert "−1.23" in page  # logp
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)
    assert (d / "plots" / "eval_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<pre>" in page and "2+3=5<span" in page  # newline marker after each line
    assert "max_new_tokens" in page

    # failures: at most 12, prompt shown without its few-shot prefix, special chars escaped
    assert "Example failures" in page
    assert "26 of 40 cases failed" in page
    assert "&lt;x&gt;" in page and "<x>" not in page
    fail_table = page.split("Example failures", 1)[1].split("</table>", 1)[0]
    assert fail_table.count("<tr>") - 1 == 12

    # self-contained: nothing fetched from outside
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page


def test_missing_run_json(tmp_path):
    with pytest.raises(CnaError, match="run.json missing"):
        render_report(tmp_path / "nope")
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(CnaError, match="no results in .*run.json missing"):
        render_report(d)


def test_missing_optional_files_omit_sections(tmp_path):
    d = make_dir(tmp_path, cases=False)
    page = render_report(d, strict=True).read_text(encoding="utf-8")
    assert 'id="eval"' in page
    assert "Example failures" not in page

    d2 = make_dir(tmp_path / "b", eval_files=False, cases=False)
    page2 = render_report(d2, strict=True).read_text(encoding="utf-8")
    assert 'id="eval"' not in page2
    assert "smollm2-135m" in page2  # header still there
    assert not (d2 / "plots" / "eval_acc.png").exists()


def test_registry_order_and_custom_sections(tmp_path):
    stages = [s.stage for s in registry()]
    assert stages[0] == "eval"

    d = make_dir(tmp_path, cases=False)
    (d / "extra.csv").write_text("a\n1\n", encoding="utf-8")

    def extra(dir: Path, meta: dict) -> str:
        assert meta["model"]["spec"] == "smollm2-135m"
        return "<p>EXTRA-BODY</p>"

    def boom(dir: Path, meta: dict) -> str:
        raise ValueError("bad file")

    secs = [Section("extra", "Extra stage", extra), *registry(), Section("eval", "Again", boom)]
    page = render_report(d, sections=secs).read_text(encoding="utf-8")
    assert page.index('id="extra"') < page.index('id="eval"') < page.index('id="eval-2"')
    assert "could not be rendered" in page and "bad file" in page
    with pytest.raises(ValueError, match="bad file"):
        render_report(d, sections=secs, strict=True)


def test_cna_and_verification_sections(tmp_path):
    d = make_dir(tmp_path)
    ver = pd.DataFrame([
        {"model": "m", "head": "5.1", "op": "+", "experiment": e, "k": k, "value": v,
         "random_mean": 0.1, "random_std": 0.01, "n": 7}
        for k in (10, 50) for e, v in (("zero_topk", 0.857), ("keep_topk", 0.25),
                                       ("coef_drop_head", 0.4), ("coef_drop_lowest", 0.05))])
    ver.to_csv(d / "verification.csv", index=False)
    meta = {"ks": [10, 50], "seeds": 2, "ranking": "decrease", "lens": "frozen"}
    (d / "verification.json").write_text(json.dumps(meta))
    (d / "cna.json").write_text(json.dumps(meta))
    rows = [{"case": f"c{c}", "rank": r + 1, "layer": 10 + r % 3, "neuron": 100 + r % 4,
             "imp_a": 0.5, "imp_b": 0.1, "coef_a": 1.0, "coef_b": 0.5, "op": "+",
             "head": "5.1", "prompt": "3+5=", "target": "8"}
            for c in range(3) for r in range(50)]
    pd.DataFrame(rows).to_csv(d / "cna_neurons.csv", index=False)
    page = render_report(d, strict=True).read_text()
    assert "Verification of the CNA neurons" in page and "85.7%" in page
    assert "head 5.1 zeroed, n = 7" in page
    assert "Comparative Neuron Analysis (CNA)" in page and "10.100" in page
    assert (d / "plots" / "verification.png").exists()


def _heads_rows(ops=("+", "-"), layers=8, heads=4, best=None) -> list[dict]:
    """A head scan: ops x digits 1, 2 x layers x heads; ``best[op]`` costs 50 points."""
    best = best or {"+": (7, 0), "-": (5, 3)}
    rows = []
    for op in ops:
        for layer in range(layers):
            for head in range(heads):
                for digits, n in ((1, 40), (2, 10)):
                    drop = 0.5 if (layer, head) == best[op] else 0.01 * ((layer + head) % 7)
                    rows.append({"layer": layer, "head": head, "op": op, "digits": digits,
                                 "n": n, "acc_orig": 0.9, "acc_ablated": 0.9 - drop,
                                 "drop": drop, "drop_rel": drop / .9, "drop_lo": drop - 0.1,
                                 "drop_hi": drop + 0.1, "dlogp": -drop})
    return rows


def _verification_rows() -> list[dict]:
    rows = []
    for op, head, n in (("+", "7.0", 8), ("-", "5.3", 6)):
        for k, zero, keep in ((10, 0.875, 1.0), (20, 1.0, 0.625), (50, 1.0, 1.0)):
            for exp, v, rm, rs in (("zero_topk", zero, 0.0, 0.0), ("keep_topk", keep, 1.0, 0.0),
                                   ("coef_drop_head", 0.3, 0.15, 0.01),
                                   ("coef_drop_lowest", 0.05, 0.0, 0.001)):
                rows.append({"model": "m", "head": head, "op": op, "experiment": exp, "k": k,
                             "value": v, "random_mean": rm, "random_std": rs, "n": n})
            rows.append({"model": "m", "head": head, "op": op, "experiment": "heldout_zero_topk",
                         "k": k, "value": 0.6, "random_mean": 0.02, "random_std": 0.01,
                         "n": 39})
    return rows


SHALLOW_NULL = {  # located sets no worse than random ones, counts as random directions give
    "stage": "shallow", "head": "7.0", "head_layer": 7, "shallow_layers": list(range(7)),
    "n_shallow_neurons": 14336, "transforms": "the head's layer only", "n_null": 896,
    "settings": {"top_tokens": 50, "sign": "pos", "seeds": 2},
    "sweep": [{"m": m, "n_neurons": nn, "n_cases": 24, "acc_orig": 0.667, "acc_zeroed": az,
               "drop": d, "rel_drop": d / 0.667, "random_mean": rm, "random_std": rs}
              for m, nn, az, d, rm, rs in ((1, 2438, 0.25, 0.417, 0.417, 0.083),
                                           (2, 1099, 0.375, 0.292, 0.229, 0.021),
                                           (3, 615, 0.542, 0.125, 0.146, 0.063))],
    "null": [{"m": 1, "null_expected": 2320.0}, {"m": 2, "null_expected": 1088.0},
             {"m": 3, "null_expected": 560.0}],
    "hidden": {"1": 2175, "2": 1058, "3": 601}}

EXPLAIN_COLS = ("case,prompt,target,stage,kind,name,layer,index,position,token,tokens,"
                "tokens_transformed,score,effect,coef_drop,coef,detail").split(",")


def _explain_rows() -> list[list]:
    base = ["add-3-5", "3+5=", "8"]
    return [
        [*base, "prediction enhancing", "ffn_neuron", "14.1066", 14, 1066, 4, "=",
         "uali 2 \\u200d\\u2640 ␣third", "", 0.416, 0.127, -0.0289, 0.555, "imp_a 0.45"],
        [*base, "prediction enhancing", "ffn_neuron", "13.308", 13, 308, 4, "=", "␣Sept 3", "",
         0.37, 2.424, 0.234, -1.39, "imp_a 1.5"],
        [*base, "feature predicting", "head", "7.0", 7, 0, 2, "+", "", "", 0.33, 2.104, 0.2686,
         0.84, "attends ‘+’@2 0.84"],
        [*base, "feature transferring", "attn_layer", "L1", 1, -1, 2, "+", "", "", 0.056, 2.86,
         0.383, float("nan"), "zeroed at position 2"],
        [*base, "feature enhancing", "ffn_neuron", "6.525", 6, 525, 2, "+", "␣criteri ggtitle",
         "browserTarget udsman", 0.01, -0.35, -0.033, 0.3, "through L6"]]


def full_results(tmp_path: Path) -> Path:
    """A results folder with eval, heads, cna + verification, shallow and explain (the main
    job's quick stages), shaped as the stages write them."""
    d = make_dir(tmp_path)
    run = _run(("eval", "heads", "cna", "shallow", "explain"))
    (d / "run.json").write_text(json.dumps(run), encoding="utf-8")
    meta = json.loads((d / "eval.json").read_text())
    meta["prefixes"] = {f"{op}|{t}": f"1{op}1=2\n" for op in "+-*/" for t in
                        ("eq", "nl", "qa", "verbal", "x")}
    (d / "eval.json").write_text(json.dumps(meta), encoding="utf-8")
    pd.DataFrame(_heads_rows()).to_csv(d / "heads.csv", index=False)
    (d / "heads.json").write_text(json.dumps({"method": "zero", "metric": "acc",
                                              "n_cases": 100, "top_k": 10}))
    pd.DataFrame(_verification_rows()).to_csv(d / "verification.csv", index=False)
    ver_meta = {"ks": [10, 20, 50], "seeds": 2, "ranking": "decrease", "lens": "frozen",
                "group_by": ["op"]}
    (d / "verification.json").write_text(json.dumps(ver_meta))
    per_op = {"+": {"head": "7.0", "n": 8, "skipped_wrong": 2,
                    "faithfulness": {"n": 80, "spearman": 0.02, "pearson": 0.27}},
              "-": {"head": "5.3", "n": 6, "skipped_wrong": 4,
                    "faithfulness": {"n": 60, "spearman": 0.3, "pearson": 0.75}}}
    (d / "cna.json").write_text(json.dumps({**ver_meta, "per_op": per_op}))
    rows = [{"case": f"{op}{c}", "rank": r + 1, "layer": 7 + r % 5, "neuron": 100 + r % 9,
             "imp_a": 0.5, "imp_b": 0.1, "coef_a": 1.0, "coef_b": 0.5, "op": op,
             "head": per_op[op]["head"], "prompt": "3+5=", "target": "8"}
            for op in "+-" for c in range(3) for r in range(50)]
    pd.DataFrame(rows).to_csv(d / "cna_neurons.csv", index=False)
    (d / "shallow.json").write_text(json.dumps(SHALLOW_NULL))
    tokens = json.dumps([" ten", "\u200d\u2640", "seven"])
    pd.DataFrame([{"layer": 6, "neuron": 1539, "name": "6.1539", "matches": 2,
                   "transform_layer": 7, "side": 1, "matches_untransformed": 0,
                   "concepts": json.dumps([" ten", "seven"]), "top_tokens": tokens,
                   "untransformed_tokens": tokens}]).to_csv(d / "shallow.csv", index=False)
    pd.DataFrame(_explain_rows(), columns=EXPLAIN_COLS).to_csv(d / "explain.csv", index=False)
    toks = ["<bos>", "2", "+", "5", "=", "7", "\\n", "3", "+", "5", "="]
    (d / "explain.json").write_text(json.dumps({"cases": [{
        "case": "add-3-5", "question": "3+5=", "target": "8", "pred": "8", "logp": -0.73,
        "head": "7.0", "tokens": toks, "head_attention": [0.05] * 8 + [0.8, 0.1, 0.05],
        "question_start": 7, "links": [{"src": "13.308", "dst": "14.1066", "drop": 0.5}]}]}))
    return d


def _text(page: str) -> str:
    """The page's visible text, details included, spaces collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.split("<body>", 1)[-1]))


def test_findings_open_the_report(tmp_path):
    d = full_results(tmp_path)
    page = render_report(d, strict=True).read_text(encoding="utf-8")
    # findings first, naming each op's top head and what zeroing it costs, with interval
    assert page.index('id="findings"') < page.index('id="eval"')
    find = html.unescape(_text(page[page.index('id="findings"'):page.index('id="eval"')]))
    assert "Top head for +: 7.0 (layer 7, head 0)" in find
    assert "a drop of 50.0% ≈[" not in find and "a drop of 50.0% [" in find
    assert "Top head for -: 5.3 (layer 5, head 3)" in find
    # verification headline: effect [Wilson interval] vs random, with n
    assert ("zeroing each case's top-K CNA neurons drops accuracy by 87.5% [52.9, 97.8] vs "
            "random 0.0% at K = 10") in find and "n = 8 correctly answered cases" in find
    # why fewer CNA cases than selected; lens faithfulness and what it means
    assert "8 cases of 10 selected; the model answered 2 wrongly" in find
    assert "Spearman 0.02, Pearson 0.27" in find and "trust the verification" in find
    assert "read a top-K as a set of candidates" in find  # - : Pearson high, Spearman low
    assert "Null result" in find
    assert "Not in this folder: lora, prune, debias" in find
    assert "L.H (layer.head)" in find and "L.N (layer.neuron)" in find
    # the terminal prints the same sentences
    from cnalens.report.findings import findings

    for line in findings(d):
        assert re.sub(r"\s+", " ", line) in find


def test_sections_interpret_and_sign_consistently(tmp_path):
    d = full_results(tmp_path)
    page = render_report(d, strict=True).read_text(encoding="utf-8")
    # one interpretation line (at least) under every section
    for stage in ("eval", "heads", "cna", "verification", "shallow", "explain"):
        body = page[page.index(f'id="{stage}"'):]
        body = body[:body.index("</section>")]
        assert 'class="interp"' in body, stage
    text = html.unescape(_text(page))
    assert "Keep-only (the top-K kept, every other deep neuron zeroed): the drop goes " \
           "100% → 62% → 100%" in text and "not monotone" in text
    assert "route score" in text and "read through the head" in text
    # chain: one sign convention on cards and in the table
    assert "zeroed: log p −0.13 · deep Σ|m| +2.9%" in text
    table = page[page.index("zeroed: Δ log p"):]
    assert ">−0.13<" in table and ">+2.9%<" in table and "+3%" not in text
    # control characters shown, not escaped; every token list readable
    assert "⟨U+200D⟩" in text and "\\u200d" not in page and "\\n" not in text
    # the 20 few-shot prefix cards collapsed
    assert re.search(r"<details><summary>Few-shot prefixes \(20\)</summary>", page)
    # top heads: 10 rows visible (2 groups and "all ops": top 3 each), the rest behind a toggle
    top = page[page.index("<h3>Top heads</h3>"):]
    first = top[:top.index("</table>")]
    assert first.count("<tr>") - 1 == 9 and "drop [95% CI]" in first
    assert re.search(r"All 30 rows \(top 10 per group\)", top)
    assert "50.0% ≈[40.0, 60.0]" not in first  # two digits rows pooled: combined interval
    assert re.search(r"50\.0% ≈\[4\d\.\d, 5\d\.\d\]", first)


def test_figures_are_legible_and_heatmaps_label_every_layer(tmp_path, monkeypatch):
    from cnalens.report import plots

    figs = {}
    embed = plots.embed

    def keep(fig, dir, name):
        uri = embed(fig, dir, name)
        figs[name] = fig
        return uri

    monkeypatch.setattr(plots, "embed", keep)
    render_report(full_results(tmp_path), strict=True)
    assert {"eval_acc", "heads_drop", "cna_layers", "verification", "shallow_sweep"} <= set(figs)
    for name, fig in figs.items():
        assert fig.get_figwidth() * plots.DPI >= 600, name
        fig.canvas.draw()
        for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text")):
            if t.get_visible() and t.get_text():
                assert plots.text_px(fig, t.get_fontsize()) >= 10, (name, t.get_text())
    heat = figs["heads_drop"].axes[0]
    assert [int(x) for x in heat.get_yticks()] == list(range(8))
    # verification: one panel per experiment, each with its y label, the legend apart
    ver = [ax for ax in figs["verification"].axes if ax.axison]
    assert len(ver) == 5 and all(ax.get_ylabel() for ax in ver)
    assert not any(ax.get_legend() for ax in ver)


def test_findings_wording_follows_the_numbers(tmp_path):
    from cnalens.report import findings as F

    assert "ordered" in F.faithfulness_meaning(0.8, 0.9)
    assert "top of a ranking" in F.faithfulness_meaning(0.5, 0.6)
    assert "set of candidates" in F.faithfulness_meaning(0.05, 0.6)
    assert "says little" in F.faithfulness_meaning(0.05, 0.1)
    # shallow: a located set far above random and 3x the null count is not a null result
    strong = json.loads(json.dumps(SHALLOW_NULL))
    strong["sweep"][0].update(drop=0.9, random_mean=0.1, random_std=0.01)
    strong["null"][0]["null_expected"] = 800.0
    line = F.shallow_findings(strong)[0]
    assert "Null result" not in line and "At M ≥ 1 the located set hurts more" in line
    assert "Null result" in F.shallow_findings(SHALLOW_NULL)[0]
    # heads: a top head clear of the next one, or not
    df = pd.DataFrame(_heads_rows())
    lines = F.heads_findings(df)
    assert lines[0].startswith("Top head for +: 7.0 (layer 7, head 0); zeroing it takes "
                               "accuracy from 90.0% to 40.0%, a drop of 50.0%")
    assert lines[0].endswith("below that interval.")
    close = pd.DataFrame(_heads_rows(best={"+": (7, 0), "-": (5, 3)}))
    close.loc[(close.layer == 6) & (close["head"] == 0), ["drop", "acc_ablated"]] = [.45, .45]
    assert "not clearly ahead" in F.heads_findings(close)[0]
    # keep-only: like random at every K, or better at some
    ver = pd.DataFrame(_verification_rows())
    sub = ver[ver.op == "+"]
    assert "at K = 20 only" in F.keep_meaning(sub)
    like = sub.assign(value=sub.value.where(sub.experiment != "keep_topk", 1.0))
    assert "about as many answers as keeping random" in F.keep_meaning(like)
    # verification below random
    weak = sub.assign(value=sub.value.where(sub.experiment != "zero_topk", 0.0))
    assert "not clear of random at any K" in F.verification_findings(weak, ["op"])[0]
    assert F.findings(tmp_path / "nothing") == []


def test_visible_tokens():
    from cnalens.report.html import unrepr, visible

    assert visible("a\u200db") == "a⟨U+200D⟩b" and visible("x\ny\tz") == "x↵y→z"
    assert visible(" ten") == " ten" and visible("é数") == "é数"
    assert unrepr("\\u200d\\n\\\\n\\x00") == "\u200d\n\\n\x00"


def test_app_findings():
    from cnalens.report import findings as F

    metric = [{"split": "heldout", "by": "total", "key": "all", "n": 4, "before": 2.0,
               "cna": 1.0, "cna_change": -0.5, "random_mean": 2.0, "random_change": 0.0},
              {"split": "select", "by": "total", "key": "all", "n": 4, "before": 2.0,
               "cna": 2.2, "cna_change": 0.1, "random_mean": 2.4, "random_change": 0.2}]
    lines = F.debias_findings({"metric": metric})
    assert lines[0].endswith("(−50.0%) vs random neurons +0.0%; the CNA edit shrinks it more "
                             "than random neurons.")
    assert lines[1].endswith("the CNA edit does no better than random.")
    # a debias.json with the interval and verdict (metric_summary): the rule's verdict
    metric[0].update(cna_change_lo=-0.7, cna_change_hi=-0.3, verdict="cannot be judged")
    line = F.debias_findings({"metric": metric})[0]
    assert "(−50.0% [−70.0, −30.0]) vs random neurons +0.0%; verdict: cannot be judged" in line
    # the report's summary table shows the interval and the verdict
    from cnalens.report.sections.debias import summary_table

    html = summary_table({"metric": metric})
    assert "95% interval" in html and "[-70.0%, -30.0%]" in html.replace("−", "-")
    assert "cannot be judged" in html
    summ = pd.DataFrame([{"variant": v, "acc": a, "acc_lo": lo, "acc_hi": hi, "n": 50,
                          "deep_pruned": 0.95} for v, a, lo, hi in
                         (("cna_pruned_lora", 0.8, 0.67, 0.89),
                          ("random_pruned_lora", 0.2, 0.11, 0.33))])
    assert F.prune_findings(summ)[0].endswith("CNA's choice keeps clearly more.")
    acc = pd.DataFrame([{"run": r, "layer": la, "op": "all", "n": 40, "acc": a,
                         "acc_lo": a - 0.1, "acc_hi": a + 0.1}
                        for r, la, a in (("original", None, 0.5), ("lora", 3, 0.9))])
    assert F.lora_findings(acc, {"layer": 3})[0] == (
        "LoRA on layer 3: test accuracy 50.0% [40.0, 60.0] → 90.0% [80.0, 100.0] (n = 40); "
        "the intervals do not overlap.")
