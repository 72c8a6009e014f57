"""A broken model stops a run: NaN or inf in weights, activations or logits is an error.

A NaN left by a failed conversion or an overflow in half precision would otherwise look
like a model that cannot add. ``check_finite_weights`` runs once when a ``ModelView`` is
made (one reduction per tensor); ``ModelView`` checks the final hidden states of every
forward pass and the logits it computes once per batch (``check_finite``), and only after
a failure runs the batch again with a hook on every module (``first_nonfinite_module``)
to say where the numbers first went bad. cnalens's own NaN (the padding of pruned layers'
widths in score tables) lives in its outputs, never in what is checked here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from cnalens.errors import CnaError

if TYPE_CHECKING:
    from cnalens.models import ModelView


def _bad(t: torch.Tensor) -> str:
    """'NaN', 'inf' or 'NaN and inf': what a non-finite tensor holds."""
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return " and ".join(w for w, f in (("NaN", nan), ("inf", inf)) if f) or "NaN"


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, True iff ``t`` holds no NaN or inf, without a sync: one pass of
    ``aminmax`` (which propagates NaN; no temporary the size of ``t``, several times faster
    than ``isfinite(t).all()`` on CPUs)."""
    if t.numel() == 0 or not t.is_floating_point() or t.is_meta:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.isfinite(lo) & torch.isfinite(hi)


def _uniform_name(view: ModelView, names: dict[int, str], mod_path: str) -> str | None:
    """'layer 1 down_proj', 'embedding', ... for a module's full name, if the view knows.

    ``names``: full module name by ``id`` of each module of ``view.model``."""
    if view is None:
        return None
    for what, mod in (("embedding", view.embed), ("final norm", view.final_norm),
                      ("unembedding", view.unembed)):
        if mod is not None and names.get(id(mod)) == mod_path:
            return what
    fam = view.family
    roles = {getattr(fam, r): r for r in ("o_proj", "v_proj", "down_proj", "ln_attn", "ln_ffn",
                                          "ln_attn_post", "ln_ffn_post")
             if getattr(fam, r)}
    roles.update({p: p.rsplit(".", 1)[-1] for p in fam.ffn_in})
    for layer, blk in enumerate(view.layers):
        prefix = names.get(id(blk))
        if prefix is not None and (mod_path == prefix or mod_path.startswith(prefix + ".")):
            role = roles.get(mod_path[len(prefix) + 1:])
            return f"layer {layer}" + (f" {role}" if role else "")
    return None


def check_finite_weights(model: nn.Module, view: ModelView=None) -> None:
    """CnaError naming the first parameter that holds NaN or inf (by module path, and by
    layer and uniform name when ``view``, a ``ModelView`` of ``model``, is given)."""
    bad = [(n, p) for n, p in model.named_parameters() if not bool(finite_flag(p))]
    if not bad:
        return
    name, p = bad[0]
    names = {id(m): n for n, m in model.named_modules()}
    where = _uniform_name(view, names, name.rsplit(".", 1)[0])
    count = int((~torch.isfinite(p.detach())).sum())
    more = f", and {len(bad) - 1} more weight tensors do too" if len(bad) > 1 else ""
    raise CnaError(f"non-finite weights: {name}{f' ({where})' if where else ''} holds "
                   f"{count} {_bad(p.detach())} value{'s' if count != 1 else ''}{more} "
                   f"(a broken conversion or save?); the model cannot be scored")


def first_nonfinite_module(model: nn.Module, run: Callable[[], object]) -> str | None:
    """Run ``run()`` (a forward pass of ``model``) with a hook on every module; the full
    name of the first module whose output holds NaN or inf, or None. For diagnosis only:
    one reduction per module output."""
    found: list[str] = []

    def hook(name):
        def fn(mod, args, output):
            out = output[0] if isinstance(output, tuple) and output else output
            if not found and torch.is_tensor(out) and not bool(finite_flag(out)):
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the error it explains
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: which rows (first dimension; a 1-D tensor is one row) hold NaN or inf."""
    return ~torch.isfinite(t.detach().reshape(t.shape[0] if t.dim() > 1 else 1, -1)).all(-1)


def nonfinite_error(view: ModelView, what: str, kind: str, rows: torch.Tensor | None = None,
                    ids: torch.Tensor | None = None,
                    rerun: Callable[[], object] | None = None) -> CnaError:
    """The one-line error for non-finite ``what`` (``kind``: 'NaN', 'inf', ...): in how many
    ``rows`` of the batch, for which prompt (``ids``, decoded with the view's tokenizer),
    and where it first went bad (``rerun``: the same forward pass again, run only now, with
    a hook on every module)."""
    msg = f"non-finite {what} ({kind})"
    several = rows is not None and len(rows) > 1
    msg += f" in {int(rows.sum())} of {len(rows)} rows of a batch" if several else " in a batch"
    if rows is not None and ids is not None and getattr(view.tokenizer, "decode", None):
        row = ids[int(rows.nonzero()[0, 0])] if ids.dim() > 1 and len(ids) == len(rows) else ids
        try:
            text = view.tokenizer.decode([i for i in row.reshape(-1).tolist()
                                          if i != view.pad_id])
        except Exception:  # noqa: BLE001 - the prompt only illustrates the error
            text = None
        if text is not None:
            text = text if len(text) <= 60 else "..." + text[-57:]
            msg += f" (the first for {text!r})" if several else f" for {text!r}"
    if rerun is not None and (mod := first_nonfinite_module(view.model, rerun)):
        where = _uniform_name(view, {id(m): n for n, m in view.model.named_modules()}, mod)
        msg += f", first at {mod}{f' ({where})' if where else ''}"
    hint = ("; float16 overflows: try --dtype bfloat16 or float32"
            if view.dtype == torch.float16 else "")
    return CnaError(f"{msg}: the model cannot be scored{hint}")


def check_finite(view: ModelView, t: torch.Tensor, what: str, ids: torch.Tensor | None = None,
                 rerun: Callable[[], object] | None = None) -> torch.Tensor:
    """``t`` if it holds no NaN or inf (one reduction), else ``nonfinite_error`` (rows:
    ``t``'s first dimension)."""
    if bool(finite_flag(t)):
        return t
    with torch.no_grad():
        raise nonfinite_error(view, what, _bad(t.detach()), _bad_rows(t), ids, rerun)
