"""One run's residual states at the last prompt position of every case, captured in one
batched forward with interventions applied: what every importance score reads.

Also the small resolvers the scorers share: targets ("pred", "gold" or token ids), frozen
final-norm scales and layer lists, checked once with one clear error each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cnalens.data.cases import Cases, as_encoded
from cnalens.errors import CnaError
from cnalens.lens import Lens

if TYPE_CHECKING:
    from cnalens.interventions import Intervention
    from cnalens.models import ModelView

TARGETS = ("pred", "gold")
Target = str | torch.Tensor | Sequence[int]


# --------------------------------------------------------------------------- states
@dataclass
class CaseStates:
    """One run's states at the last prompt position of every case (all layers), every
    tensor on the model's device.

    ``coef`` is NaN beyond a layer's FFN width (pruned models). ``attn_raw``/``ffn_raw`` are
    the inputs of the post-attention / post-FFN norms (None if the family has none).
    Mixture-of-experts models: ``coef`` holds the weighted coefficients (router weight times
    coefficient, 0 for experts a case was not routed to: ``ModelView``'s ``coef`` point) and
    ``route`` (n, L, routes) the router weights of each layer's experts (then the shared
    expert's gate), 0 where not routed, NaN for dense layers and beyond a layer's routes.
    """

    case_ids: list[str]
    gold: torch.Tensor  # (n,) first answer token
    resid_pre: torch.Tensor  # (n, L, d)
    resid_mid: torch.Tensor  # (n, L, d)
    coef: torch.Tensor  # (n, L, d_ffn)
    z: torch.Tensor  # (n, L, n_heads * head_dim)
    final: torch.Tensor  # (n, d) final residual (before the final norm)
    logits: torch.Tensor  # (n, V) the model's real logits at the last position
    attn_raw: torch.Tensor | None = None
    ffn_raw: torch.Tensor | None = None
    interventions: list[dict] = field(default_factory=list)
    route: torch.Tensor | None = None  # (n, L, routes): mixture-of-experts models only

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def pred(self) -> torch.Tensor:
        """The model's own top-1 next token (this run)."""
        return self.logits.argmax(-1)


def concat_states(parts: Sequence[CaseStates]) -> CaseStates:
    """Several runs' states as one (cases stacked), so one projection scores them all."""
    if not parts:
        raise CnaError("no states to concatenate")
    out = {}
    for f in fields(CaseStates):
        vals = [getattr(p, f.name) for p in parts]
        if f.name == "case_ids":
            out[f.name] = [c for v in vals for c in v]
        elif f.name == "interventions":
            out[f.name] = [d for v in vals for d in v]
        elif any(v is None for v in vals):
            out[f.name] = None
        else:
            out[f.name] = torch.cat(vals)
    return CaseStates(**out)


def frozen_scale(view: ModelView, states: CaseStates, lens: str = "frozen") -> torch.Tensor:
    """The final-norm scale of each case of a run (what the frozen lens fixes)."""
    return Lens(view, lens).scale(states.final)


def case_states(view: ModelView, encoded: Cases, *interventions: Intervention,
                batch_size: int = 32) -> CaseStates:
    """One batched forward (interventions applied) capturing the last prompt position."""
    enc = as_encoded(view.tokenizer, encoded)
    cd = view.compute_dtype
    moe = [layer for layer in range(view.n_layers) if view.is_moe(layer)]
    points = ["resid_pre", "resid_mid", "coef", "z", "resid_post"] + (["route"] if moe else [])
    n_routes = max((view.layout(layer).n_routes for layer in moe), default=0)
    post = view.norm(0, "ln_attn_post") is not None
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                             (*points, "logits", "attn_raw", "ffn_raw")}
    desc: list[dict] = [iv.describe(view.shape) for iv in interventions]
    L = view.n_layers
    for start in range(0, len(enc), batch_size):
        chunk = enc[start:start + batch_size]
        b = view.batch([e.prompt_ids for e in chunk])
        with torch.no_grad(), view.intervene(*interventions), \
                view.capture(points, position=-1) as cache:
            hidden = view.hidden(b)
            logits = view.logits(hidden[:, -1])
        parts["logits"].append(logits.float().to(view.device))
        for p in ("resid_pre", "resid_mid", "z", "resid_post"):
            # .to: a model sharded over devices (--device-map) captures each layer on its own
            parts[p].append(torch.stack([cache[(p, layer)][:, 0].to(view.device)
                                         for layer in range(L)], 1))
        coef = torch.full((len(chunk), L, view.d_ffn), float("nan"), dtype=cd,
                          device=view.device)
        for layer in range(L):
            coef[:, layer, :view.ffn_width(layer)] = cache[("coef", layer)][:, 0]
        parts["coef"].append(coef)
        if moe:
            route = torch.full((len(chunk), L, n_routes), float("nan"), dtype=cd,
                               device=view.device)
            for layer in moe:
                r = cache[("route", layer)][:, 0]
                route[:, layer, :r.shape[-1]] = r
            parts["route"].append(route)
        if post:
            with torch.no_grad():
                parts["attn_raw"].append(torch.stack(
                    [view.module(layer, "o_proj")(cache[("z", layer)][:, 0]).to(view.device)
                     for layer in range(L)], 1))
                parts["ffn_raw"].append(torch.stack(
                    [view.module(layer, "down_proj")(cache[("coef", layer)][:, 0]).to(view.device)
                     for layer in range(L)], 1))

    def cat(name):
        return torch.cat(parts[name]).to(cd) if parts[name] else None

    resid_post = cat("resid_post")
    return CaseStates(
        case_ids=[e.case.case_id or f"c{i}" for i, e in enumerate(enc)],
        gold=torch.tensor([e.answer_ids[0] if e.answer_ids else -1 for e in enc],
                          dtype=torch.long, device=view.device),
        resid_pre=cat("resid_pre"), resid_mid=cat("resid_mid"), coef=cat("coef"), z=cat("z"),
        final=resid_post[:, -1], logits=torch.cat(parts["logits"]),
        attn_raw=cat("attn_raw"), ffn_raw=cat("ffn_raw"), interventions=list(desc),
        route=cat("route") if moe else None)


def neuron_routes(view: ModelView, route: torch.Tensor) -> torch.Tensor:
    """Per-layer router weights ``route`` (..., n_layers, routes) spread over the layers'
    flat neurons: (..., n_layers, d_ffn), each neuron its expert's weight (the shared
    expert's gate for its neurons), NaN for dense layers and beyond a layer's width."""
    out = torch.full((*route.shape[:-1], view.d_ffn), float("nan"), dtype=route.dtype,
                     device=route.device)
    for layer in range(view.n_layers):
        lay = view.layout(layer)
        if lay is not None:
            out[..., layer, :lay.n_neurons] = route[..., layer, lay.route_of()]
    return out


def routing_frame(view: ModelView, states_a: CaseStates, states_b: CaseStates,
                  changed_only: bool = True) -> pd.DataFrame:
    """Per case, mixture-of-experts layer and expert routed in run A or B: ``weight_a``,
    ``weight_b`` (0: not routed in that run; the shared expert, ``S``, always is: its gate).
    ``changed``: whether the case's routed experts of that layer differ between the runs;
    ``changed_only`` keeps only those layers. Empty for a dense model."""
    if states_a.route is not None and states_a.case_ids != states_b.case_ids:
        raise CnaError("runs A and B cover different cases: cannot compare their routing")
    return route_table(view, states_a.case_ids, states_a.route, states_b.route, changed_only)


def route_table(view: ModelView, case_ids: Sequence[str], route_a: torch.Tensor | None,
                route_b: torch.Tensor | None, changed_only: bool = True) -> pd.DataFrame:
    """``routing_frame`` of two runs' router weights (each (n, n_layers, routes), as
    ``CaseStates.route``; None for a dense model: an empty table) over ``case_ids``."""
    cols = ["case", "layer", "expert", "weight_a", "weight_b", "changed"]
    if route_a is None or route_b is None:
        return pd.DataFrame(columns=cols)
    rows = []
    ids = np.asarray(case_ids, dtype=object)
    for layer in range(view.n_layers):
        lay = view.layout(layer)
        if lay is None:
            continue
        wa = route_a[:, layer, :lay.n_routes]
        wb = route_b[:, layer, :lay.n_routes]
        changed = ((wa[:, :lay.n_experts] != 0) != (wb[:, :lay.n_experts] != 0)).any(-1)
        keep = (wa != 0) | (wb != 0)
        if changed_only:
            keep &= changed[:, None]
        case, expert = keep.nonzero(as_tuple=True)
        names = np.asarray([str(e) for e in range(lay.n_experts)] + ["S"] * (lay.n_routes
                                                                           - lay.n_experts),
                           dtype=object)
        rows.append(pd.DataFrame({"case": ids[case.cpu().numpy()], "layer": layer,
                                  "expert": names[expert.cpu().numpy()],
                                  "weight_a": as_numpy(wa[case, expert]),
                                  "weight_b": as_numpy(wb[case, expert]),
                                  "changed": changed[case].cpu().numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor (any device) as numpy: float64 stays float64, other floats become float32."""
    t = t.detach().cpu()
    return (t if t.dtype == torch.float64 else t.float()).reshape(-1).numpy()


def targets_for(states: CaseStates, target: Target) -> torch.Tensor:
    if isinstance(target, str):
        if target == "pred":
            return states.pred.clone()
        if target == "gold":
            if bool((states.gold < 0).any()):
                raise CnaError("a case has no target to score: give it one or use the "
                               "prediction (target='pred')")
            return states.gold.clone()
        raise CnaError(f"unknown target '{target}': use pred, gold or token ids")
    t = torch.as_tensor(target, dtype=torch.long, device=states.gold.device).reshape(-1)
    if t.numel() == 1 and len(states) > 1:
        t = t.expand(len(states)).clone()
    if t.numel() != len(states):
        raise CnaError(f"{t.numel()} target ids for {len(states)} cases")
    return t


def check_targets(view: ModelView, t: torch.Tensor) -> None:
    if ((t < 0) | (t >= view.vocab_size)).any():
        bad = int(t[(t < 0) | (t >= view.vocab_size)][0])
        raise CnaError(f"target token id {bad} out of range: the vocabulary has "
                       f"{view.vocab_size} tokens")


def scales_for(lens: Lens, states: CaseStates, scale: torch.Tensor | float | None
               ) -> torch.Tensor:
    if scale is None:
        return lens.scale(states.final)
    s = torch.as_tensor(scale, dtype=lens.dt, device=lens.W.device).reshape(-1)
    if s.numel() == 1 and len(states) > 1:
        s = s.expand(len(states)).clone()
    if s.numel() != len(states):
        raise CnaError(f"{s.numel()} scales for {len(states)} cases")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise CnaError("the frozen final-norm scale must be finite and positive")
    return s


def resolve_layers(view: ModelView, layers: Sequence[int] | None) -> list[int]:
    out = list(range(view.n_layers)) if layers is None else sorted({int(x) for x in layers})
    view.check_layers(out)
    return out


def describe_run(view: ModelView, lens: str, target: Target, states: CaseStates,
                 layers: list[int], extra: dict | None = None) -> dict:
    """The metadata every score table carries: lens, target, interventions, layers, model."""
    meta = {"lens": lens, "target": target if isinstance(target, str) else "ids",
            "interventions": states.interventions, "layers": layers,
            "position": "last prompt token", "model": view.summary()}
    meta.update(extra or {})
    return meta


__all__ = ["TARGETS", "CaseStates", "Target", "as_numpy", "case_states", "check_targets",
           "concat_states", "describe_run", "frozen_scale", "neuron_routes", "route_table",
           "routing_frame", "scales_for", "targets_for"]
