"""The HTML report: built from a fake results folder, no model needed."""

from __future__ import annotations

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


def test_findings_name_the_top_head_and_the_verification(tmp_path):
    from cnalens.report.findings import findings

    rows = []
    for op, best in (("+", (1, 2)), ("-", (0, 1))):
        for layer in range(2):
            for head in range(3):
                for digits, n in ((1, 40), (2, 10)):
                    drop = 0.5 if (layer, head) == best else 0.01 * (layer + head)
                    rows.append({"op": op, "digits": digits, "layer": layer, "head": head,
                                 "name": f"{layer}.{head}", "n": n, "acc_orig": 0.9,
                                 "acc_ablated": 0.9 - drop, "drop": drop, "drop_rel": drop / .9,
                                 "dlogp": -drop})
    pd.DataFrame(rows).to_csv(tmp_path / "heads.csv", index=False)
    assert findings(tmp_path) == [
        "top head for +: 1.2 (layer.head); zeroing it takes accuracy from 90% to 40% (n = 50)",
        "top head for -: 0.1 (layer.head); zeroing it takes accuracy from 90% to 40% (n = 50)"]
    ver = pd.DataFrame([{"op": "+", "head": "1.2", "experiment": e, "k": k, "value": v,
                         "random_mean": 0.05, "random_std": 0.01, "n": 11}
                        for e, k, v in (("zero_topk", 20, 0.8), ("zero_topk", 10, 0.6),
                                        ("keep_topk", 10, 0.9))])
    ver.to_csv(tmp_path / "verification.csv", index=False)
    assert findings(tmp_path)[-1] == (
        "+ (head 1.2 zeroed in run B), each case's top-K CNA neurons zeroed: accuracy drop "
        "vs random neurons K=10: 60% vs 5%, K=20: 80% vs 5% (n = 11)")
    assert findings(tmp_path / "nothing") == []
