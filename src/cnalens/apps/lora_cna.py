"""CNA between a LoRA model (run A) and its original (run B): does LoRA amplify the
coefficients of neurons the original already uses, or make new ones?

Runs (design.md): A = the LoRA model, B = the same model with the adapter disabled; both
are scored with A's target (its top-1 prediction) and A's frozen final-norm scale, at the
last prompt position, through ``cna.compare_runs`` (the frozen lens; every neuron, or with
``k`` the certified exact top-K where the LoRA leaves the FFN down projections alone).
Neurons are ranked per case by ``imp_a - imp_b`` (CNA's "decrease": what LoRA made more
important), over the layers from the lowest LoRA layer up (below it the two runs are
identical). ``cnalens.apps.prune`` selects its neurons with the same comparison.

For each K and each band of layers (``shallow`` below ``deep_from``, ``deep`` from it up,
``all``; or depth quartiles), over the top-K neurons of every case that fall in the band:

* ``coef_a``, ``coef_b``: sums of |m| (design.md) in A and B, pooled over cases;
* ``change = coef_a / coef_b - 1`` (relative change of the coefficient sum; +0.42 = the
  paper's "+42%");
* ``up_frac``: share of those neurons whose |m| grew;
* ``pct_b``: mean percentile of their |m| among all neurons of their layer in the ORIGINAL
  run (100 = the most active): high means LoRA picked neurons the original already used;
* ``random_mean``/``random_std``: ``change`` of random neurons with the same count per case
  and layer (over ``seeds``);
and one ``k = 0`` row per band: the change of the coefficient sum of all its neurons.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from cnalens.cna import Comparison, random_like, topk_mask
from cnalens.data.cases import Encoded
from cnalens.errors import CnaError

if TYPE_CHECKING:
    from cnalens.models import ModelView


def bands(n_layers: int, first: int, deep_from: int | None) -> dict[str, list[int]]:
    """Layer bands from ``first`` up: shallow/deep around ``deep_from``, else quartiles."""
    layers = list(range(first, n_layers))
    if deep_from is not None:
        out = {"shallow": [x for x in layers if x < deep_from],
               "deep": [x for x in layers if x >= deep_from]}
    else:
        span = n_layers - first
        out = {f"q{i + 1}": [x for x in layers
                             if first + i * span / 4 <= x < first + (i + 1) * span / 4]
               for i in range(4)}
    out = {k: v for k, v in out.items() if v}
    out["all"] = layers
    return out


def coef_change(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Sums of |coef| over ``mask`` in runs A and B."""
    a, b = a.abs().nan_to_num(0.0), b.abs().nan_to_num(0.0)
    return float(a[mask].double().sum()), float(b[mask].double().sum())


def _pct(coef_b: torch.Tensor) -> torch.Tensor:
    """Percentile (0-100) of each neuron's |m| within its case and layer (NaN last)."""
    x = coef_b.abs().nan_to_num(-1.0)
    ranks = x.argsort(-1).argsort(-1).double()
    return 100.0 * (ranks + 1) / x.shape[-1]


def summarize(comp: Comparison, ks: Sequence[int], band_layers: dict[str, list[int]],
              seeds: int = 3, seed: int = 0) -> pd.DataFrame:
    """The coefficient-change table (see the module doc) from a LoRA-vs-original CNA."""
    n, L, D = comp.coef_a.shape
    rank_layers = sorted({x for v in band_layers.values() for x in v})
    valid = torch.isfinite(comp.coef_b)
    pct = _pct(comp.coef_b)
    rows = []
    for band, layers in band_layers.items():
        in_band = torch.zeros(L, dtype=torch.bool)
        in_band[layers] = True
        allmask = valid & in_band[None, :, None]
        sa, sb = coef_change(comp.coef_a, comp.coef_b, allmask)
        rows.append({"band": band, "layers": f"{min(layers)}-{max(layers)}", "k": 0,
                     "n_cases": n, "n_neurons": int(allmask.sum()), "coef_a": sa,
                     "coef_b": sb, "change": sa / sb - 1 if sb else float("nan"),
                     "up_frac": float((comp.coef_a.abs() > comp.coef_b.abs())[allmask]
                                      .double().mean()),
                     "pct_b": float(pct[allmask].mean()), "random_mean": float("nan"),
                     "random_std": float("nan"), "seeds": 0})
    for k in ks:
        if k > len(rank_layers) * D:
            raise CnaError(f"top-K {k} exceeds the {len(rank_layers) * D} neurons compared")
        top = topk_mask(comp.topk(k, "decrease", rank_layers), L, D)
        gen = torch.Generator().manual_seed(seed)
        rand = [random_like(top, gen, valid) for _ in range(seeds)]
        for band, layers in band_layers.items():
            in_band = torch.zeros(L, dtype=torch.bool)
            in_band[layers] = True
            m = top & in_band[None, :, None]
            sa, sb = coef_change(comp.coef_a, comp.coef_b, m)
            rc = []
            for r in rand:
                ra, rb = coef_change(comp.coef_a, comp.coef_b, r & in_band[None, :, None])
                rc.append(ra / rb - 1 if rb else float("nan"))
            rc_t = torch.tensor(rc, dtype=torch.float64)
            rows.append({"band": band, "layers": f"{min(layers)}-{max(layers)}", "k": k,
                         "n_cases": n, "n_neurons": int(m.sum()), "coef_a": sa,
                         "coef_b": sb, "change": sa / sb - 1 if sb else float("nan"),
                         "up_frac": (float((comp.coef_a.abs() > comp.coef_b.abs())[m]
                                           .double().mean()) if m.any() else float("nan")),
                         "pct_b": float(pct[m].mean()) if m.any() else float("nan"),
                         "random_mean": float(rc_t.nanmean()) if rc else float("nan"),
                         "random_std": (float(rc_t.std()) if len(rc) > 1
                                        else float("nan")),
                         "seeds": seeds})
    return pd.DataFrame(rows)


def lora_comparison(view: ModelView, adapter: Any, encoded: Sequence[Encoded],
                    first_layer: int, k: int | None = None, batch_size: int = 32,
                    progress: bool = True) -> Comparison:
    """CNA of the LoRA model (run A) against the original (run B, adapter disabled) on the
    FFN neurons from ``first_layer`` up, both with A's target and frozen scale:
    ``cna.compare_runs(view, encoded, other_model=peft_model)`` (one pass where the runs'
    value vectors agree; in layers whose down projection carries the LoRA, each run with
    its own).

    ``adapter``: the ``apps.lora.Adapter`` attached to ``view`` (or its peft model).
    ``k``: only each case's top-``k`` is needed: certified exact where the LoRA leaves the
    down projections alone (``meta["scoring"]`` says which), the same top-``k`` as
    exhaustive scoring (in float32 up to the order of near ties, ~1e-6 apart); the other
    neurons' importances are then NaN (coefficients stay complete)."""
    from cnalens.apps.lora import Adapter
    from cnalens.cna import compare_runs

    if not encoded:
        raise CnaError("no cases for the LoRA comparison")
    peft_model = adapter.peft_model if isinstance(adapter, Adapter) else adapter
    comp = compare_runs(view, list(encoded), other_model=peft_model, k=k,
                        layers=range(first_layer, view.n_layers), batch_size=batch_size,
                        progress=progress)
    comp.meta = {**comp.meta, "a": "LoRA model", "b": "original (adapter disabled)",
                 "target": "run A's prediction", "lens": "frozen (run A's scale)",
                 "layers": [first_layer, view.n_layers - 1],
                 "scoring": comp.meta.get("scoring", "exhaustive")}
    return comp
