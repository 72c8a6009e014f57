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
   Each deep layer keeps at least its best-ranked neuron (a layer cannot be empty). In a
   mixture-of-experts layer the union becomes what the fused experts can hold
   (``fit_experts``: one width for the kept experts, chosen by their best neurons).
2. **Pruning** removes the neurons for real (``cnalens.models.pruned``): smaller matrices,
   a smaller file, a faster model; ``load_model(DIR)`` loads it back.
3. **Experiment.** A fresh LoRA with the given adapter's settings is trained on the pruned
   model and evaluated on the LoRA test split, beside the same with random neurons kept in
   the same numbers per layer (several seeds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.data.arithmetic import OPS, arithmetic_cases
from cnalens.data.cases import Case, Cases, Encoded, as_encoded
from cnalens.errors import CnaError
from cnalens.models.pruned import (  # noqa: F401 (re-exported)
    PRUNING_FILE,
    expert_keep,
    load_pruned,
    prune_ffn,
    save_pruned,
    weights_bytes,
)
from cnalens.tables import PRUNE_VARIANTS as VARIANTS  # re-exported

if TYPE_CHECKING:
    from cnalens.apps.lora import Adapter, LoraSettings
    from cnalens.cna import Comparison
    from cnalens.models import ModelView
    from cnalens.models.shape import ExpertLayout, ModelShape

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
            raise CnaError(f"n must lie in 1..{len(self.best)} (the number of deep FFN "
                           f"neurons, layers {self.layers[0]}-{self.layers[-1]}), not {n}")
        chosen = self.best < n
        for layer in self.layers:  # no layer left empty
            in_layer = self.units[:, 0] == layer
            if not chosen[in_layer].any():
                i = torch.nonzero(in_layer).flatten()
                chosen[i[self.best[i].argmin()]] = True
        return {layer: self.units[chosen & (self.units[:, 0] == layer), 1]
                for layer in self.layers}

    def order(self, layer: int) -> torch.Tensor:
        """One deep layer's neurons best first (best rank, ties by neuron): the ranking
        ``pruned.expert_keep`` reads in a mixture-of-experts layer (``fit_experts``)."""
        units = self.units[self.units[:, 0] == layer]
        best = self.best[self.units[:, 0] == layer]
        return units[torch.argsort(best, stable=True), 1]

    def union_size(self, n: int) -> int:
        return int((self.best < n).sum())

    def choose_n(self, fraction: float) -> int:
        """The N whose union prunes closest to ``fraction`` of the deep neurons (ties: the
        larger N). Exact: the union of the top-N is the neurons with best rank < N."""
        if not 0 < fraction < 1:
            raise CnaError(f"fraction must lie strictly between 0 and 1, not {fraction}")
        total = len(self.best)
        want = max(1, round((1 - fraction) * total))
        s = torch.sort(self.best).values
        n_hi = int(s[min(want, total) - 1]) + 1  # smallest N with union >= want
        n_lo = max(1, n_hi - 1)
        hi, lo = self.union_size(n_hi), self.union_size(n_lo)
        return n_lo if abs(lo - want) < abs(hi - want) else n_hi


def rank_deep(comp: Comparison, layers: Sequence[int], widths: Sequence[int]) -> Ranking:
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


def lora_ranking(view: ModelView, adapter: Adapter, cases: Cases, deep_from: int,
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


def expert_sizes(layout: ExpertLayout, idx: torch.Tensor) -> tuple[int, int, int]:
    """``(experts, width, shared)`` of a mixture-of-experts layer's kept flat neurons
    ``idx``: the routed experts holding one, the most kept of one routed expert, the shared
    expert's kept (what ``pruned.expert_keep`` takes to keep the same shape)."""
    route = layout.route_of()[torch.as_tensor(idx, dtype=torch.long)]
    routed = route[route < layout.n_experts]
    per = torch.bincount(routed, minlength=layout.n_experts)
    return int((per > 0).sum()), int(per.max()) if len(routed) else 0, \
        int((route == layout.n_experts).sum())


def fit_experts(view: ModelView, keep: Keep, order: Callable[[int], torch.Tensor]) -> Keep:
    """``keep`` with each mixture-of-experts layer's neurons made prunable (one width for
    the kept experts, at least top-k of them, one neuron of a shared expert): about as many
    neurons (``expert_sizes``: as many experts as hold a kept neuron, their mean count
    each, the shared expert's count) chosen by ``pruned.expert_keep`` from ``order(layer)``
    (that layer's flat neurons, best first). Dense layers stay as they are."""
    out = dict(keep)
    for layer, idx in keep.items():
        lay = view.layout(layer)
        if lay is None or len(idx) == lay.n_neurons:
            continue
        experts, _, shared = expert_sizes(lay, idx)
        n_routed = len(idx) - shared
        experts = min(lay.n_experts, max(experts, lay.top_k))
        width = min(lay.width, max(1, round(n_routed / experts)))
        out[layer] = expert_keep(view, layer, order(layer), width, experts,
                                 max(1, shared) if lay.shared else 0)
    return out


def random_keep(counts: dict[int, int], widths: Sequence[int], seed: int,
                view: ModelView | None = None, like: Keep | None = None) -> Keep:
    """Random neurons, the same number per layer as ``counts``. With ``view`` and ``like``
    (the keep to match), a mixture-of-experts layer keeps as many random experts, as many
    random neurons of each, and as many of the shared expert's, as ``like`` does
    (``expert_sizes``; ``pruned.expert_keep`` of a random order)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for layer, k in sorted(counts.items()):
        perm = torch.randperm(widths[layer], generator=gen)
        lay = None if view is None or like is None else view.layout(layer)
        if lay is None:
            out[layer] = perm[:k].sort().values
            continue
        experts, width, shared = expert_sizes(lay, like[layer])
        out[layer] = expert_keep(view, layer, perm, width, experts, shared)
    return out


def counts(keep: Keep) -> dict[int, int]:
    return {int(layer): len(idx) for layer, idx in keep.items()}


def pruned_fraction(keep: Keep, widths: Sequence[int]) -> float:
    total = sum(widths[layer] for layer in keep)
    return 1 - sum(len(v) for v in keep.values()) / total


def keep_frame(keep: Keep, variant: str, seed: int | None = None,
               shape: ModelShape | None = None) -> pd.DataFrame:
    """The kept neurons as rows: variant, seed, layer, neuron (flat); a mixture-of-experts
    model's ``shape`` adds ``expert`` and ``index`` (``scores.expert_columns``)."""
    rows = [(variant, seed, layer, int(n)) for layer, idx in keep.items() for n in idx.tolist()]
    df = pd.DataFrame(rows, columns=["variant", "seed", "layer", "neuron"])
    if shape is not None and shape.is_moe:
        from cnalens.scores import expert_columns

        df = expert_columns(df, shape)
    return df


# --------------------------------------------------------------------------- speed
@torch.inference_mode()
def forward_seconds(views: Sequence[ModelView], enc: Sequence[Encoded], batch_size: int = 64,
                    repeats: int = 5, warmup: int = 1) -> list[float]:
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
    """Parameters of the FFNs (``ModelView.ffn_parameters``: input projections, down
    projection, their biases; a mixture's router, experts and shared expert)."""
    layers = range(view.n_layers) if layers is None else layers
    return sum(p.numel() for layer in layers for p in view.ffn_parameters(layer))


# --------------------------------------------------------------------------- experiment

def accuracy_row(per_case: pd.DataFrame, variant: str, seed: int | None,
                 **extra: object) -> dict:
    """One row of prune.csv: a variant's accuracy on ``per_case`` (``evaluate``'s per-case
    results): n, correct, acc with its Wilson 95% interval, acc_first, mean logp, and
    ``extra`` columns."""
    from cnalens.stats import wilson

    n, k = len(per_case), int(per_case["correct"].sum())
    lo, hi = wilson(k, n)
    return {"variant": variant, "label": VARIANTS[variant], "seed": seed, "n": n,
            "correct": k, "acc": k / n if n else float("nan"), "acc_lo": lo, "acc_hi": hi,
            "acc_first": float(per_case["correct_first"].mean()),
            "logp": float(per_case["logp"].mean()), **extra}


def adapter_settings(lora_dir: Path) -> tuple[LoraSettings, dict]:
    """The LoRA settings a saved adapter was trained with, and its whole ``cnalens.json``;
    CnaError when that file records no usable settings."""
    from cnalens.apps.lora import LoraSettings, read_adapter_meta

    meta = read_adapter_meta(lora_dir)
    try:
        return LoraSettings.from_dict(meta["settings"]), meta
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


def save_and_measure(view: ModelView, pv: ModelView, folder: Path, keep: Keep, frac: float,
                     ffn_before: int, info: dict, enc: Sequence[Encoded], batch_size: int,
                     repeats: int, meta: dict) -> dict:
    """Save the pruned model ``pv`` (``keep`` of ``view``'s neurons kept, ``frac`` of the
    deep ones pruned; ``info``: what ``prune_ffn`` returned) to ``folder`` with ``meta``,
    reload it, check it gives the same logits, and time it against the original ``view``
    on ``enc``; returns the sizes, the reload check and the speed."""
    from cnalens.models import ModelView

    path = save_pruned(pv, folder, {**meta, "pruned_fraction": frac,
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


# --------------------------------------------------------------------------- profiles
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
