"""CNA-guided pruning of deep FFN neurons (paper section 6b), with random controls.

1. **Selection.** CNA between the LoRA model (run A) and the original (run B, the adapter
   disabled) over the 1-digit cases of the four operations (design.md: both runs scored
   with A's target and frozen final-norm scale; ``apps.lora_cna.lora_comparison``, every
   deep neuron scored: the selection needs each neuron's best rank, not only a top-K).
   Each case ranks the deep layers' neurons
   (layers >= ``deep_from``) by ``imp_a - imp_b``; the union of every case's top-N is kept,
   every other neuron of those layers is pruned. A neuron is in the union for N exactly
   when its best rank over the cases is below N, so the union's size for every N is one
   sort of those best ranks: ``choose_n`` finds the N that prunes closest to a fraction.
   Each deep layer keeps at least its best-ranked neuron (a layer cannot be empty).
2. **Pruning** removes the neurons for real (``cnalens.models.pruned``): smaller matrices,
   a smaller file, a faster model; ``load_model(DIR)`` loads it back.
3. **Experiment.** A fresh LoRA with the given adapter's settings is trained on the pruned
   model and evaluated on the LoRA test split, beside the same with random neurons kept in
   the same numbers per layer (several seeds).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.data.arithmetic import OPS, arithmetic_cases
from cnalens.data.cases import Case, as_encoded, encode_all
from cnalens.errors import CnaError
from cnalens.models.pruned import (  # noqa: F401 (re-exported)
    PRUNING_FILE,
    load_pruned,
    prune_ffn,
    save_pruned,
    weights_bytes,
)
from cnalens.progress import console

if TYPE_CHECKING:
    from cnalens.apps.lora import Adapter
    from cnalens.models import ModelView

Keep = dict[int, torch.Tensor]


# --------------------------------------------------------------------------- selection
def selection_cases(ops: Sequence[str] = OPS, n: int | None = None, seed: int = 0,
                    shots: int = 0) -> list[Case]:
    """The 1-digit ``eq`` cases of ``ops`` (all, or ``n`` seeded operand pairs per op)."""
    return arithmetic_cases(ops, (1,), ("eq",), n=n, seed=seed, shots=shots)


@dataclass
class Ranking:
    """The deep neurons (``units``: (U, 2) layer, neuron) and each one's best (lowest,
    0-based) rank by ``imp_a - imp_b`` over the cases."""

    units: torch.Tensor
    best: torch.Tensor
    layers: tuple[int, ...]
    n_cases: int

    def keep(self, n: int) -> Keep:
        """The union of every case's top-``n``, plus each layer's best neuron."""
        if not 1 <= n <= len(self.best):
            raise CnaError(f"--keep-top {n} must lie in 1..{len(self.best)} (the number of "
                           f"deep FFN neurons, layers {self.layers[0]}-{self.layers[-1]})")
        chosen = self.best < n
        for layer in self.layers:  # no layer left empty
            in_layer = self.units[:, 0] == layer
            if not chosen[in_layer].any():
                i = torch.nonzero(in_layer).flatten()
                chosen[i[self.best[i].argmin()]] = True
        return {layer: self.units[chosen & (self.units[:, 0] == layer), 1]
                for layer in self.layers}

    def union_size(self, n: int) -> int:
        return int((self.best < n).sum())

    def choose_n(self, fraction: float) -> int:
        """The N whose union prunes closest to ``fraction`` of the deep neurons (ties: the
        larger N). Exact: the union of the top-N is the neurons with best rank < N."""
        if not 0 < fraction < 1:
            raise CnaError(f"--prune-fraction must lie strictly between 0 and 1, not {fraction}")
        total = len(self.best)
        want = max(1, round((1 - fraction) * total))
        s = torch.sort(self.best).values
        n_hi = int(s[min(want, total) - 1]) + 1  # smallest N with union >= want
        n_lo = max(1, n_hi - 1)
        hi, lo = self.union_size(n_hi), self.union_size(n_lo)
        return n_lo if abs(lo - want) < abs(hi - want) else n_hi


def rank_deep(comp, layers: Sequence[int], widths: Sequence[int]) -> Ranking:
    """Every case's ranking of the deep neurons (``comp.key("decrease")``), reduced to each
    neuron's best rank: one argsort over all cases at once."""
    layers = tuple(sorted(set(int(x) for x in layers)))
    if not layers:
        raise CnaError("no deep layers to prune")
    units = torch.cat([torch.stack([torch.full((widths[la],), la), torch.arange(widths[la])], 1)
                       for la in layers])
    key = comp.key("decrease")[:, units[:, 0], units[:, 1]]  # (n_cases, U)
    order = key.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return Ranking(units, rank.min(0).values, layers, key.shape[0])


def lora_ranking(view: ModelView, adapter: Adapter, cases, deep_from: int,
                 batch_size: int = 32, progress: bool = True) -> Ranking:
    """The selection's ranking: CNA of the LoRA model (``adapter``, attached to ``view``)
    against the original (``lora_cna.lora_comparison``) on ``cases``, every neuron of the
    deep layers (``deep_from`` up) reduced to its best rank over the cases."""
    from cnalens.apps.lora_cna import lora_comparison

    view.check_layers([deep_from])
    enc = as_encoded(view.tokenizer, cases)
    comp = lora_comparison(view, adapter, enc, deep_from, batch_size=batch_size,
                           progress=progress)
    return rank_deep(comp, range(deep_from, view.n_layers), list(view.ffn_widths))


def random_keep(counts: dict[int, int], widths: Sequence[int], seed: int) -> Keep:
    """Random neurons, the same number per layer as ``counts``."""
    gen = torch.Generator().manual_seed(int(seed))
    return {layer: torch.randperm(widths[layer], generator=gen)[:k].sort().values
            for layer, k in sorted(counts.items())}


def counts(keep: Keep) -> dict[int, int]:
    return {int(layer): len(idx) for layer, idx in keep.items()}


def pruned_fraction(keep: Keep, widths: Sequence[int]) -> float:
    total = sum(widths[layer] for layer in keep)
    return 1 - sum(len(v) for v in keep.values()) / total


def keep_frame(keep: Keep, variant: str, seed: int | None = None) -> pd.DataFrame:
    rows = [(variant, seed, layer, int(n)) for layer, idx in keep.items() for n in idx.tolist()]
    return pd.DataFrame(rows, columns=["variant", "seed", "layer", "neuron"])


# --------------------------------------------------------------------------- speed
@torch.inference_mode()
def forward_seconds(views: Sequence, enc, batch_size: int = 64, repeats: int = 5,
                    warmup: int = 1) -> list[float]:
    """Median seconds of one forward pass (last-position logits) over the same prompts,
    for each view; the views take turns so the machine's load affects them alike."""
    items = enc[:batch_size]
    batches = [v.batch([e.prompt_ids for e in items]) for v in views]
    times: list[list[float]] = [[] for _ in views]
    for r in range(warmup + repeats):
        for i, (v, b) in enumerate(zip(views, batches, strict=True)):
            t0 = time.perf_counter()
            v.last_logits(b)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def ffn_params(view: ModelView, layers: Sequence[int] | None = None) -> int:
    """Parameters of the FFN matrices (input projections, down projection, their biases)."""
    layers = range(view.n_layers) if layers is None else layers
    return sum(p.numel() for layer in layers
               for m in (*view.ffn_in(layer), view.module(layer, "down_proj"))
               for p in m.parameters(recurse=False))


# --------------------------------------------------------------------------- experiment
VARIANTS = {
    "original": "original",
    "lora": "LoRA",
    "cna_pruned": "CNA-pruned",
    "cna_pruned_lora": "CNA-pruned + LoRA",
    "random_pruned": "random-pruned",
    "random_pruned_lora": "random-pruned + LoRA",
}


def _acc_row(per_case: pd.DataFrame, variant: str, seed: int | None, **extra) -> dict:
    from cnalens.stats import wilson

    n, k = len(per_case), int(per_case["correct"].sum())
    lo, hi = wilson(k, n)
    return {"variant": variant, "label": VARIANTS[variant], "seed": seed, "n": n,
            "correct": k, "acc": k / n if n else float("nan"), "acc_lo": lo, "acc_hi": hi,
            "acc_first": float(per_case["correct_first"].mean()),
            "logp": float(per_case["logp"].mean()), **extra}


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: accuracy (mean and sd over seeds for the random controls), the
    Wilson 95% interval of the pooled cases, and the fraction of deep neurons pruned."""
    from cnalens.stats import wilson

    out = []
    for variant in VARIANTS:
        g = rows[rows["variant"] == variant]
        if g.empty:
            continue
        n, k = int(g["n"].sum()), int(g["correct"].sum())
        lo, hi = wilson(k, n)
        out.append({"variant": variant, "label": VARIANTS[variant], "runs": len(g),
                    "n": int(g["n"].iloc[0]), "acc": float(g["acc"].mean()),
                    "acc_sd": float(g["acc"].std(ddof=1)) if len(g) > 1 else float("nan"),
                    "acc_lo": lo, "acc_hi": hi, "acc_first": float(g["acc_first"].mean()),
                    "logp": float(g["logp"].mean()),
                    "deep_pruned": float(g["deep_pruned"].mean())})
    return pd.DataFrame(out)


def _adapter_settings(lora_dir: Path):
    from cnalens.apps.lora import LoraSettings, read_adapter_meta

    meta = read_adapter_meta(lora_dir)
    try:
        raw = meta["settings"]
        fields = LoraSettings.__dataclass_fields__
        return LoraSettings(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in raw.items() if k in fields}), meta
    except (KeyError, TypeError) as e:
        raise CnaError(f"the adapter's cnalens.json in {lora_dir} has no usable settings: "
                       f"{e}") from None


def heads_layer(*folders: Path) -> int | None:
    """The layer of the top head (all ops pooled) of the first ``heads.csv`` found."""
    from cnalens.heads import top_heads

    for d in folders:
        path = Path(d) / "heads.csv"
        if path.is_file():
            top = top_heads(pd.read_csv(path, dtype={"op": str}), 1)
            row = top[top["op"] == "all"]
            if len(row):
                return int(row["layer"].iloc[0])
    return None


def run_prune(view: ModelView, fresh, lora_dir: Path, out: Path, *,
              keep_top: int | None = None,
              fraction: float | None = None, deep_from: int, seeds: Sequence[int] = (1, 2),
              train: bool = True, n_select: int | None = None, batch_size: int = 32,
              speed_repeats: int = 5, progress: bool = True,
              settings_extra: dict | None = None) -> pd.DataFrame:
    """The whole experiment; writes DIR/prune.csv (one row per variant and seed),
    prune_summary.csv, prune_neurons.csv, prune_cases.csv, prune.json and DIR/model/.

    ``view``: the original model, without an adapter (the one in ``lora_dir`` is attached
    for the evaluation and the selection, and removed again); ``fresh()``: a newly loaded
    original model (each variant prunes its own, in place).
    """
    from cnalens.apps.lora import evaluate_runs, load_adapter, lora_cases, train_lora, unload_lora
    from cnalens.evaluate import evaluate
    from cnalens.io import write_csv, write_json
    from cnalens.pipeline import now

    t0 = time.perf_counter()
    out = Path(out)
    if (keep_top is None) == (fraction is None):
        raise CnaError("give exactly one of --keep-top N and --prune-fraction F")
    if fraction is not None and not 0 < fraction < 1:
        raise CnaError(f"--prune-fraction must lie strictly between 0 and 1, not {fraction}")
    if keep_top is not None and keep_top < 1:
        raise CnaError(f"--keep-top must be at least 1, not {keep_top}")
    view.check_layers([deep_from])
    n_deep = sum(view.ffn_widths[deep_from:])
    if keep_top is not None and keep_top > n_deep:
        raise CnaError(f"--keep-top {keep_top} must lie in 1..{n_deep} (the number of deep "
                       f"FFN neurons, layers {deep_from}-{view.n_layers - 1})")
    settings, adapter_meta = _adapter_settings(lora_dir)
    train_cases, test_cases = lora_cases(settings)
    deep = list(range(deep_from, view.n_layers))
    widths = list(view.ffn_widths)
    tok = view.tokenizer
    test_enc, train_enc = encode_all(tok, test_cases), encode_all(tok, train_cases)
    sel = selection_cases(settings.ops, n_select, settings.seed, settings.shots)
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        times[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    console.print(f"[bold]prune[/]: evaluating the original and the LoRA model on "
                  f"{len(test_enc)} test cases")
    t = time.perf_counter()
    adapter = load_adapter(view, lora_dir)
    try:
        per = evaluate_runs(view, adapter, test_enc, batch_size=batch_size,
                            progress=progress)
        rows = [_acc_row(per[per["run"] == "original"], "original", None, deep_pruned=0.0),
                _acc_row(per[per["run"] == "lora"], "lora", None, deep_pruned=0.0)]
        cases = [per.assign(variant=per["run"].map({"original": "original", "lora": "lora"}),
                            seed=None)]
        t = lap("evaluate", t)
        console.print(f"[bold]prune[/]: CNA LoRA vs original on {len(sel)} 1-digit cases, "
                      f"layers {deep[0]}-{deep[-1]}")
        ranking = lora_ranking(view, adapter, sel, deep_from, batch_size=batch_size,
                               progress=progress)
    finally:
        unload_lora(adapter)
    n_top = keep_top if keep_top is not None else ranking.choose_n(fraction)
    keep = ranking.keep(n_top)
    t = lap("select", t)
    per_layer = counts(keep)
    variants = [("cna", None, keep)] + [
        ("random", s, random_keep(per_layer, widths, s)) for s in seeds]
    sizes: dict = {}
    histories: dict = {}

    def _write(rows, cases, variants, complete: bool) -> pd.DataFrame:
        """All files from what is done so far (after each variant: a long run that is
        stopped keeps its finished rows; ``complete`` says whether every variant ran)."""
        table = pd.DataFrame(rows)
        table.insert(0, "model", view.info.get("spec"))
        neurons = pd.concat([keep_frame(kp, kind, seed) for kind, seed, kp in variants],
                            ignore_index=True)
        write_csv(out / "prune_neurons.csv", neurons)
        write_csv(out / "prune_cases.csv", pd.concat(cases, ignore_index=True))
        write_csv(out / "prune_summary.csv", summary(table))
        write_csv(out / "prune.csv", table)
        write_json(out / "prune.json", {
            "stage": "prune", "complete": complete, "model": view.summary(),
            "settings": settings_extra or {}, "lora_adapter": str(lora_dir),
            "lora_settings": settings.to_dict(),
            "lora_base": adapter_meta.get("base", {}).get("spec"),
            "selection": {"cases": len(sel), "pairs_per_op": n_select,
                          "ops": list(settings.ops), "digits": [1], "shots": settings.shots,
                          "ranking": "imp_a - imp_b",
                          "scoring": "exhaustive (every deep neuron: the selection needs "
                                     "each neuron's best rank over the cases)",
                          "runs": {"a": "LoRA model", "b": "original (adapter disabled)"},
                          "target": "run A's prediction, A's frozen final-norm scale for both"},
            "deep_layers": [deep[0], deep[-1]], "deep_neurons": sum(widths[la] for la in deep),
            "keep_top": keep_top, "target_fraction": fraction, "n_top": n_top,
            "pruned_fraction": pruned_fraction(keep, widths),
            "kept_per_layer": {str(k): v for k, v in per_layer.items()},
            "seeds": list(seeds), "trained": train, "n_test": len(test_enc),
            "n_train": len(train_enc), "sizes": sizes, "histories": histories,
            "timings": times, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1),
            "finished": now() if complete else None})
        return table

    for kind, seed, kp in variants:
        tag = "cna" if kind == "cna" else f"random seed {seed}"
        pv = fresh()
        ffn_before = ffn_params(pv)
        info = prune_ffn(pv, kp)
        frac = pruned_fraction(kp, widths)
        if kind == "cna":
            t = time.perf_counter()
            meta = {"selection": "cna", "n_top": n_top, "deep_from": deep_from,
                    "lora_adapter": str(lora_dir)}
            sizes = _save_and_measure(view, pv, out, kp, frac, ffn_before, info, test_enc,
                                      batch_size, speed_repeats, meta)
            t = lap("save_and_speed", t)
        t = time.perf_counter()
        res = evaluate(pv, test_enc, batch_size=batch_size, progress=progress,
                       description=f"evaluating {tag} pruned")
        rows.append(_acc_row(res, f"{kind}_pruned", seed, deep_pruned=frac))
        cases.append(res.assign(variant=f"{kind}_pruned", seed=seed))
        if train:
            console.print(f"[bold]prune[/]: training a fresh LoRA on the {tag} pruned model")
            pruned_lora, hist = train_lora(pv, train_enc, settings, progress=progress)
            histories[f"{kind}:{seed}"] = {"loss_first": float(hist["loss"].iloc[0]),
                                           "loss_last": float(hist["loss"].iloc[-1]),
                                           "seconds": float(hist["seconds"].iloc[-1])}
            res = evaluate(pv, test_enc, batch_size=batch_size, progress=progress,
                           description=f"evaluating {tag} pruned + LoRA")
            rows.append(_acc_row(res, f"{kind}_pruned_lora", seed, deep_pruned=frac))
            cases.append(res.assign(variant=f"{kind}_pruned_lora", seed=seed))
            del pruned_lora
        del pv
        lap(f"variant {tag}", t)
        _write(rows, cases, variants, False)
    return _write(rows, cases, variants, True)


def _save_and_measure(view, pv, out, keep, frac, ffn_before, info, enc, batch_size,
                      repeats, meta) -> dict:
    """Save the pruned model to DIR/model, reload it, check it gives the same logits, and
    time it against the original."""
    from cnalens.models import ModelView

    path = save_pruned(pv, out / "model", {**meta, "pruned_fraction": frac,
                                            "kept": {str(k): v.tolist() for k, v in keep.items()}})
    src = view.info.get("cache_path") or view.info.get("path")
    before = weights_bytes(src) if src and Path(src).is_dir() else None
    if not before:
        before = sum(p.numel() * p.element_size() for p in view.model.parameters())
    after = weights_bytes(path)
    # the loading path of load_model(DIR), with this model's tokenizer
    back = ModelView(load_pruned(path, dtype=view.dtype).to(view.device), view.tokenizer,
                     {"spec": str(path)})
    items = enc[:8]
    with torch.inference_mode():
        b = pv.batch([e.prompt_ids for e in items])
        diff = float((pv.last_logits(b) - back.last_logits(b)).abs().max())
    t_orig, t_pruned = forward_seconds([view, back], enc, batch_size, repeats)
    n_params = sum(p.numel() for p in view.model.parameters())
    return {"ffn_params_before": ffn_before, "ffn_params_removed": info["params_removed"],
            "params_before": n_params, "params_after": n_params - info["params_removed"],
            "weights_bytes_before": before, "weights_bytes_after": after,
            "file_reduction": 1 - after / before, "reload_max_abs_diff": diff,
            "speed": {"prompts": min(batch_size, len(enc)), "repeats": repeats,
                      "what": "median seconds of one batched forward (last-position logits)",
                      "original_s": t_orig, "pruned_s": t_pruned, "speedup": t_orig / t_pruned,
                      "threads": torch.get_num_threads()},
            "widths": info["widths_after"], "model_dir": str(path)}


# --------------------------------------------------------------------------- profiles, stage
@dataclass(frozen=True)
class PruneProfile:
    """Sizes of the experiment. ``quick``: a seeded sample of the 1-digit cases for the
    selection and 2 random seeds; ``full``: every 1-digit case, 5 seeds (the paper's)."""

    name: str
    n_select: int | None  # operand pairs per op for the CNA selection (None: all)
    seeds: int


PRUNE_PROFILES = {"quick": PruneProfile("quick", 10, 2), "full": PruneProfile("full", None, 5)}
DEFAULT_FRACTION = 0.95


def find_adapter(*folders: Path) -> Path | None:
    """The first folder holding a saved adapter: F, F/adapter, F/lora, F/lora/adapter."""
    for f in folders:
        for cand in (f, f / "adapter", f / "lora", f / "lora" / "adapter"):
            if (cand / "adapter_config.json").is_file():
                return cand
    return None


def prune_stage(ctx) -> None:
    """Main-job stage (``--stages ...,lora,prune``): prune 95% of the deep FFN neurons
    guided by the lora stage's adapter (found in DIR, DIR/adapter, DIR/lora or
    DIR/lora/adapter), deep layers from the top head's layer (head scan of this run)."""
    from cnalens.heads import top_heads
    from cnalens.models import load_model

    lora_dir = find_adapter(ctx.out)
    if lora_dir is None:
        raise CnaError(f"the prune stage needs the lora stage's adapter in {ctx.out} "
                       "(run with --stages ...,lora,prune)")
    if ctx.heads is None or ctx.heads.empty:
        raise CnaError("the prune stage needs the head scan (the top head's layer)")
    top = top_heads(ctx.heads, 1)
    deep_from = int(top[top["op"] == "all"]["layer"].iloc[0])
    prof = PRUNE_PROFILES["full" if ctx.profile.name == "full" else "quick"]
    v = ctx.view
    dtype = str(v.dtype).split(".")[-1]

    def fresh():
        return load_model(v.info.get("spec"), device=str(v.device), dtype=dtype,
                          progress=False)

    run_prune(fresh(), fresh, lora_dir, ctx.out, fraction=DEFAULT_FRACTION,
              deep_from=deep_from, seeds=tuple(range(1, prof.seeds + 1)),
              n_select=prof.n_select, batch_size=min(ctx.batch_size, 32),
              progress=ctx.progress, settings_extra={**ctx.settings, "prune_profile": prof.name})
