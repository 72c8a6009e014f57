"""Choose the default few-shot examples per operation and template by measurement.

For each op x template, several seeded candidate triples of 1-digit operand pairs are
scored by 1-digit accuracy (``acc``) on every model given; the candidate with the best
mean accuracy over the models wins. Writes src/cnalens/data/prefixes.json and
docs/prefix_selection.csv (every candidate's accuracy per model).

    python scripts/choose_prefixes.py --models gemma3-270m,smollm2-135m --candidates 6
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pandas as pd

from cnalens import load_model
from cnalens.data.arithmetic import OPS, TEMPLATES, arithmetic_cases, operand_pairs
from cnalens.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]


def candidates(op: str, k: int) -> list[list[tuple[int, int]]]:
    pairs = [p for p in operand_pairs(op, 1) if p[1] != 0 or op != "/"]
    rng = random.Random(f"candidates|{op}")
    return [rng.sample(pairs, 3) for _ in range(k)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m")
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--n", type=int, default=60, help="cases per op (sampled)")
    args = ap.parse_args()
    rows = []
    for spec in args.models.split(","):
        view = load_model(spec)
        for op in OPS:
            for ci, ex in enumerate(candidates(op, args.candidates)):
                for template in TEMPLATES:
                    cases = arithmetic_cases([op], [1], [template], n=args.n, seed=7,
                                             examples={f"{op}|{template}": ex})
                    df = evaluate(view, cases, progress=False)
                    rows.append({"model": spec, "op": op, "template": template,
                                 "candidate": ci, "examples": json.dumps(ex), "n": len(df),
                                 "acc": df["correct"].mean(),
                                 "acc_first": df["correct_first"].mean()})
                    print(rows[-1], flush=True)
    res = pd.DataFrame(rows)
    (ROOT / "docs").mkdir(exist_ok=True)
    res.to_csv(ROOT / "docs" / "prefix_selection.csv", index=False)
    mean = res.groupby(["op", "template", "candidate", "examples"])["acc"].mean().reset_index()
    best = mean.loc[mean.groupby(["op", "template"])["acc"].idxmax()]
    table = {f"{r.op}|{r.template}|1": json.loads(r.examples) for r in best.itertuples()}
    path = ROOT / "src" / "cnalens" / "data" / "prefixes.json"
    doc = json.loads(path.read_text())
    doc["examples"] = table
    doc["chosen_by"] = (f"scripts/choose_prefixes.py --models {args.models} --candidates "
                        f"{args.candidates} --n {args.n}: best mean acc over the models")
    items = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(table.items()))
    path.write_text(f'{{\n "note": {json.dumps(doc["note"])},\n "chosen_by": '
                    f'{json.dumps(doc["chosen_by"])},\n "examples": {{\n{items}\n }}\n}}\n')
    print(best.to_string())


if __name__ == "__main__":
    main()
