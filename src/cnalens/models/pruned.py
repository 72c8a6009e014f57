"""Real FFN pruning: shrink layers' FFN matrices in place, save, and load back.

``prune_ffn(view, {layer: kept neuron indices})`` keeps those neurons of each layer: the
rows of the FFN input projections (gate and up, or the single up projection, with their
biases; in a fused gate | up projection, as Phi-3's, both rows ``i`` and ``d_ffn + i``:
``ModelView.ffn_in_rows``) and the columns of the down projection (its bias, which no
neuron owns, stays). It is architecture-neutral through the family table
(``Family.ffn_in``, ``ffn_in_blocks``, ``down_proj``; GPT-2's Conv1D stores weights
transposed). The model is edited in place: no copies.

Mixture-of-experts layers are pruned by the same flat neuron indices (``ModelView``): an
expert none of whose neurons is kept is dropped whole (its router row and its slices of
the fused 3-D weights), and the kept experts keep the same number of neurons each (the
fused ``gate_up_proj`` (E, 2F, d) and ``down_proj`` (E, d, F) hold one width ``F`` for all
experts of a layer), at least ``top_k`` experts; the shared expert (Qwen2-MoE) is a dense
FFN with its own width. Token routing then runs over the kept experts only (the router's
softmax over fewer logits: as re-routing around the dropped ones). A width whose rows are not
a multiple of 16 bytes switches the model to transformers' eager experts implementation
(torch's grouped matmul needs such strides).

Transformers' configs hold one FFN width, so a pruned model is saved as a normal
``save_pretrained`` folder plus ``cnalens_pruning.json`` (``ffn_widths``: one width per
layer, and which neurons were kept; ``experts``: each mixture-of-experts layer's experts,
width per expert and shared expert width). ``load_pruned(dir)`` (used by
``cnalens.models.load_model`` when that file is present) builds the model from its config,
shrinks the layers to the saved widths, then loads the weights: the result is a plain
transformers model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnalens.errors import CnaError
from cnalens.io import read_json, write_json

if TYPE_CHECKING:
    from cnalens.models.shape import ExpertLayout
    from cnalens.models.view import ModelView

PRUNING_FILE = "cnalens_pruning.json"
FORMAT = 1


def _take(p: nn.Parameter | None, idx: torch.Tensor, dim: int) -> nn.Parameter | None:
    if p is None:
        return None
    return nn.Parameter(p.data.index_select(dim, idx.to(p.device)).contiguous(),
                        requires_grad=p.requires_grad)


def _shrink_out(mod: nn.Module, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep output features ``idx`` (rows, ``ModelView.ffn_in_rows``) of an FFN input
    projection (and its bias)."""
    mod.weight = _take(mod.weight, idx, 1 if conv1d else 0)
    if getattr(mod, "bias", None) is not None:
        mod.bias = _take(mod.bias, idx, 0)
    if conv1d:
        mod.nf = len(idx)
    elif hasattr(mod, "out_features"):
        mod.out_features = len(idx)


def _shrink_in(mod: nn.Module, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep input features ``idx`` of the down projection (its bias stays)."""
    mod.weight = _take(mod.weight, idx, 0 if conv1d else 1)
    if conv1d:
        mod.nx = len(idx)
    elif hasattr(mod, "in_features"):
        mod.in_features = len(idx)


def _check_keep(view: ModelView, keep: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    out = {}
    for layer, idx in keep.items():
        layer = int(layer)
        view.check_layers([layer])
        idx = torch.as_tensor(idx, dtype=torch.long).flatten()
        width = view.ffn_width(layer)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= width):
            raise CnaError(f"cannot prune layer {layer}: kept neuron indices must lie in "
                           f"0..{width - 1}")
        uniq = torch.unique(idx)  # sorted
        if len(uniq) != len(idx):
            raise CnaError(f"cannot prune layer {layer}: kept neuron indices repeat")
        if not len(uniq):
            raise CnaError(f"cannot prune layer {layer}: at least one neuron must be kept")
        out[layer] = uniq
    return out


def _expert_plan(view: ModelView, layer: int, idx: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For kept flat neurons of a mixture-of-experts layer: the kept experts (E',), their
    kept neurons (E', F') and the shared expert's (S',); CnaError for what the fused
    weights cannot hold."""
    lay = view.layout(layer)
    route = lay.route_of()[idx]
    experts = torch.unique(route[route < lay.n_experts])
    counts = {int(e): int((route == e).sum()) for e in experts}
    if len(set(counts.values())) > 1:
        raise CnaError(f"cannot prune layer {layer}: its kept experts would keep "
                       f"{', '.join(sorted({str(c) for c in counts.values()}))} neurons: the "
                       f"experts of a layer share one width (keep as many in each)")
    if len(experts) < lay.top_k:
        raise CnaError(f"cannot prune layer {layer} to {len(experts)} experts: each token is "
                       f"routed to {lay.top_k}")
    inner = (idx[route < lay.n_experts] - route[route < lay.n_experts] * lay.width)
    inner = inner.reshape(len(experts), -1) if len(experts) else inner.reshape(0, 0)
    shared = idx[route == lay.n_experts] - lay.n_experts * lay.width
    if lay.shared and not len(shared):
        raise CnaError(f"cannot prune layer {layer}: keep at least one neuron of its shared "
                       "expert")
    return experts, inner, shared


def _prune_experts(view: ModelView, layer: int, idx: torch.Tensor) -> None:
    """Shrink one mixture-of-experts layer to the kept flat neurons ``idx`` (sorted)."""
    from cnalens.models.shape import ExpertLayout

    lay = view.layout(layer)
    experts, inner, shared = _expert_plan(view, layer, idx)
    ex, router = view.moe_module(layer, "experts"), view.moe_module(layer, "router")
    rows = torch.cat([inner, inner + lay.width], -1)  # gate rows n, up rows F + n
    dev = ex.down_proj.device
    e, r, k = experts.to(dev), rows.to(dev), inner.to(dev)
    gate_up = ex.gate_up_proj.data[e[:, None], r]  # (E', 2F', d)
    down = ex.down_proj.data[e].gather(2, k[:, None, :].expand(-1, ex.down_proj.shape[1], -1))
    ex.gate_up_proj = nn.Parameter(gate_up.contiguous(), ex.gate_up_proj.requires_grad)
    ex.down_proj = nn.Parameter(down.contiguous(), ex.down_proj.requires_grad)
    router.weight = _take(router.weight, experts, 0)
    for mod in (ex, router):
        mod.num_experts = len(experts)
    ex.intermediate_dim = inner.shape[1]
    if lay.shared:
        se = view.moe_module(layer, "shared_expert")
        for mod in (se.gate_proj, se.up_proj):
            _shrink_out(mod, shared, False)
        _shrink_in(se.down_proj, shared, False)
    view.experts[layer] = ExpertLayout(len(experts), inner.shape[1], len(shared), lay.top_k)
    view.ffn_widths[layer] = len(idx)
    impl = getattr(view.model.config, "_experts_implementation", None)
    if impl == "grouped_mm" and inner.shape[1] * ex.down_proj.element_size() % 16:
        # torch's grouped matmul needs 16-byte strides: run the experts one by one instead
        view.model.set_experts_implementation("eager")


def expert_keep(view: ModelView, layer: int, order: torch.Tensor, width: int,
                experts: int | None = None, shared: int | None = None) -> torch.Tensor:
    """Flat neurons to keep in a mixture-of-experts layer from a ranking ``order`` (flat
    indices, best first): the ``width`` best neurons of each of the ``experts`` experts
    whose best neuron ranks highest (default all), and the ``shared`` best of the shared
    expert (default ``width``): what ``prune_ffn`` can hold (one width per layer)."""
    lay = view.layout(layer)
    if lay is None:
        raise CnaError(f"layer {layer} is dense: keep its neurons directly")
    order = torch.as_tensor(order, dtype=torch.long).flatten()
    route = lay.route_of()[order]
    first = torch.full((lay.n_routes,), len(order), dtype=torch.long)
    first.scatter_reduce_(0, route, torch.arange(len(order)), "amin")
    pick = torch.argsort(first[:lay.n_experts], stable=True)[:experts or lay.n_experts]
    rank = torch.empty_like(order)  # each neuron's place within its own expert's ranking
    for e in range(lay.n_routes):  # a loop over experts, not neurons
        at = (route == e).nonzero()[:, 0]
        rank[at] = torch.arange(len(at))
    routed = torch.isin(route, pick) & (rank < min(width, lay.width))
    extra = (route == lay.n_experts) & (rank < (width if shared is None else shared))
    return torch.sort(order[routed | extra]).values


def prune_ffn(view: ModelView, keep: Mapping[int, torch.Tensor]) -> dict:
    """Keep only neurons ``keep[layer]`` (any order; stored sorted) of each listed layer.

    Shrinks the model behind ``view`` in place and updates the view's widths (and, in
    mixture-of-experts layers, the experts: see the module's docstring; ``expert_keep``
    picks a keep that fits). Returns ``{"params_removed", "widths_before",
    "widths_after"}``.
    """
    keep = _check_keep(view, keep)
    if not view.family.ffn_in:
        raise CnaError(f"{view.family.name}: the family table names no FFN input projections")
    before = list(view.ffn_widths)
    n0 = sum(p.numel() for p in view.model.parameters())
    conv = view.family.conv1d
    for layer, idx in keep.items():  # checked before any layer is shrunk
        if view.is_moe(layer):
            _expert_plan(view, layer, idx)
            continue
        mods = (*view.ffn_in(layer), view.module(layer, "down_proj"))
        if len(idx) != view.ffn_width(layer) and any(hasattr(m, "base_layer") for m in mods):
            raise CnaError(f"cannot prune layer {layer}: its FFN carries a LoRA adapter "
                           f"(merge it with merge_and_unload, or unload it, first)")
    with torch.no_grad():
        for layer, idx in keep.items():
            if len(idx) == view.ffn_width(layer):
                continue
            if view.is_moe(layer):
                _prune_experts(view, layer, idx)
                continue
            rows = view.ffn_in_rows(layer, idx)
            for mod in view.ffn_in(layer):
                _shrink_out(mod, rows, conv)
            _shrink_in(view.module(layer, "down_proj"), idx, conv)
            view.ffn_widths[layer] = len(idx)
    view.d_ffn = max(view.ffn_widths)
    n1 = sum(p.numel() for p in view.model.parameters())
    return {"params_removed": n0 - n1, "widths_before": before,
            "widths_after": list(view.ffn_widths)}


@contextmanager
def _hf_quiet() -> Iterator[None]:
    """transformers' logging at error level and no progress bars, for a while."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def is_pruned(path: str | Path) -> bool:
    return (Path(path) / PRUNING_FILE).is_file()


def pruned_widths(path: str | Path) -> list[int]:
    """The per-layer FFN widths a pruned model folder was saved with."""
    file = Path(path) / PRUNING_FILE
    try:
        return [int(w) for w in read_json(file)["ffn_widths"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CnaError(f"cannot read {file}: {e}") from None


def pruned_experts(path: str | Path) -> list[ExpertLayout | None] | None:
    """The per-layer experts a pruned mixture-of-experts model folder was saved with (None
    for a dense model)."""
    from cnalens.models.shape import ExpertLayout

    file = Path(path) / PRUNING_FILE
    try:
        rows = read_json(file).get("experts")
        return None if rows is None else [None if r is None else ExpertLayout(*map(int, r))
                                           for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CnaError(f"cannot read {file}: {e}") from None


def save_pruned(view: ModelView, out: str | Path, meta: dict | None = None) -> Path:
    """``save_pretrained`` (weights as safetensors, config, tokenizer) + ``cnalens_pruning.json``.

    Written into a temporary folder beside ``out`` and renamed, so ``out`` is complete or
    absent; an existing ``out`` is replaced.
    """
    import shutil
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        moe = any(e is not None for e in view.experts)
        with _hf_quiet():  # experts in the fused layout the pruned widths are read in
            view.model.save_pretrained(tmp, **({"save_original_format": False} if moe else {}))
        if view.tokenizer is not None and hasattr(view.tokenizer, "save_pretrained"):
            view.tokenizer.save_pretrained(tmp)
        experts = {"experts": [None if e is None else [e.n_experts, e.width, e.shared, e.top_k]
                               for e in view.experts]} if moe else {}
        write_json(tmp / PRUNING_FILE, {
            "format": FORMAT, "ffn_widths": list(view.ffn_widths), **experts,
            "what": "per-layer FFN widths; load with cnalens.models.load_model(DIR)",
            **(meta or {})})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def weights_bytes(path: str | Path) -> int:
    """Total size of a folder's safetensors weight files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_pruned(path: str | Path, **kwargs: Any) -> nn.Module:
    """A pruned model saved by ``save_pruned``, as a plain transformers model.

    ``from_pretrained`` loads every weight whose shape matches the config (all but the pruned
    FFN matrices, which it leaves freshly initialised at full width); the pruned layers are
    then shrunk to the saved widths and their FFN weights read from the safetensors files.
    ``kwargs`` go to ``from_pretrained`` (``dtype``, ...).
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from cnalens.models.view import ModelView

    path = Path(path)
    widths, experts = pruned_widths(path), pruned_experts(path)
    with _hf_quiet():  # the size-mismatch report is expected
        model = AutoModelForCausalLM.from_pretrained(path, ignore_mismatched_sizes=True,
                                                     **kwargs)
    view = ModelView(model, check_weights=False)  # checked once, by the caller's view
    if len(widths) != view.n_layers or (experts and len(experts) != view.n_layers):
        raise CnaError(f"{PRUNING_FILE} lists {len(widths)} widths for {view.n_layers} layers")
    pruned = [layer for layer, w in enumerate(widths) if w != view.ffn_width(layer)
              or (experts and experts[layer] != view.layout(layer))]
    keep = {}
    for layer in pruned:
        lay, now = (experts[layer] if experts else None), view.layout(layer)
        if lay is None:
            keep[layer] = torch.arange(widths[layer])
            continue
        inner = torch.arange(lay.n_experts)[:, None] * now.width + torch.arange(lay.width)
        keep[layer] = torch.cat([inner.flatten(),
                                 torch.arange(lay.shared) + now.n_experts * now.width])
    prune_ffn(view, keep)
    names = {id(p): name for name, p in model.named_parameters()}

    wanted = {names[id(p)]: p for layer in pruned for p in view.ffn_parameters(layer)}
    found = set()
    with torch.no_grad():
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in set(sf.keys()) & set(wanted):
                    t = sf.get_tensor(key)
                    if t.shape != wanted[key].shape:
                        raise CnaError(f"pruned weight {key} in {path} has shape "
                                       f"{tuple(t.shape)}, expected {tuple(wanted[key].shape)}")
                    wanted[key].copy_(t)
                    found.add(key)
    if missing := sorted(set(wanted) - found):
        raise CnaError(f"pruned model folder {path} lacks weights: {', '.join(missing[:3])}")
    return model.eval()
