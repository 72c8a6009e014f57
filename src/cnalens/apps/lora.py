"""LoRA on one attention layer: data, training, saving, loading (issue 7, paper section 6a).

API (also used by ``cnalens.apps.prune``)::

    settings = LoraSettings.quick(layers=(7,))          # or .full(...), or LoraSettings(...)
    train, test = lora_cases(settings)                    # disjoint 2-digit splits, 4 ops
    adapter, history = train_lora(view, train, settings)  # an Adapter
    per_case = evaluate_runs(view, adapter, test)         # original vs LoRA, one pass each
    save_adapter(adapter, "DIR/adapter")                  # peft format + cnalens.json
    unload_lora(adapter)                                  # view.model is the original again
    adapter = load_adapter(view, "DIR/adapter")           # the LoRA model again

**In place.** ``train_lora`` and ``load_adapter`` inject peft LoRA layers into
``view.model``'s own modules (no copy), so the view, ``evaluate``, ``case_states`` and the
scores all see the LoRA model. Both return an :class:`Adapter`: the peft model
(``adapter.peft_model``) and what ``save_adapter`` records (``adapter.meta``); nothing is
attached to the view. ``with adapter.disabled():`` runs the original (exactly: the LoRA
branch is skipped); ``unload_lora(adapter)`` removes the LoRA layers and restores the
original modules for good. A view carries at most one adapter.

**Targets.** ``target_modules`` are uniform names resolved through the view (so they work
for every family): ``attn`` (every projection of the attention module: q, k, v, o; GPT-2's
fused Conv1D ``c_attn`` and ``c_proj``), ``qkv`` (the same without the output projection),
``o_proj``, ``down_proj``; anything else is a module path inside the decoder layer
(``self_attn.q_proj``) or a leaf name matched inside it (``q_proj``).

**Loss.** Cross-entropy of the answer tokens only (teacher forcing, mean over answer
tokens): the base model's final-normed hidden states are unembedded (soft-capping
included) only at the answer positions, never over the whole sequence, which matters for
a 262k vocabulary. Base weights are frozen, so autograd stops below the LoRA layer.

**Prompts.** Training and test prompts are the arithmetic ``eq`` form (``"23-57="``,
answer ``"-34"``) with ``shots`` few-shot examples as prefix (default 0: see the README's
LoRA section for the measured accuracy and cost with and without the prefix).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from cnalens.data.arithmetic import OPS, arithmetic_cases
from cnalens.data.cases import Case, Cases, Encoded, as_encoded
from cnalens.errors import CnaError
from cnalens.io import write_json
from cnalens.models.view import compute_dtype
from cnalens.progress import bar as progress_bar

if TYPE_CHECKING:
    from cnalens.models import ModelView

ROLES = ("attn", "qkv", "o_proj", "down_proj")
META_FILE = "cnalens.json"


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LoraSettings:
    """Everything a LoRA run depends on. ``n_train``/``n_test`` are totals over the ops
    (an equal share per op, fewer where an op has fewer pairs, e.g. exact division)."""

    layers: tuple[int, ...] = ()
    target_modules: tuple[str, ...] = ("attn",)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 2e-3  # ~125 steps; the paper's 1e-3 under the full profile
    epochs: int = 1
    batch_size: int = 16
    n_train: int = 2000
    n_test: int = 400
    seed: int = 0
    digits: tuple[int, ...] = (2,)
    ops: tuple[str, ...] = OPS
    shots: int = 0
    negative: bool = True
    profile: str = "quick"

    @classmethod
    def quick(cls, **overrides: Any) -> LoraSettings:
        """Minutes on a 2-core CPU: 2,000 train / 400 test cases, one epoch."""
        return cls(**_tuples(overrides))

    @classmethod
    def full(cls, **overrides: Any) -> LoraSettings:
        """The paper's scale: 18,000 train / 2,000 test cases, 4 epochs, lr 1e-3."""
        return cls(**{"n_train": 18_000, "n_test": 2_000, "epochs": 4, "lr": 1e-3,
                      "profile": "full", **_tuples(overrides)})

    def replace(self, **changes: Any) -> LoraSettings:
        return replace(self, **_tuples(changes))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        """Settings as ``to_dict`` gave them (an adapter's ``cnalens.json``): lists become
        tuples, keys that are no setting are ignored."""
        return cls(**_tuples({k: v for k, v in d.items() if k in cls.__dataclass_fields__}))

    def check(self) -> None:
        for name in ("rank", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CnaError(f"LoRA {name} must be at least 1, not {getattr(self, name)}")
        if self.n_train < 1:
            raise CnaError("the LoRA training split is empty (n_train < 1)")
        if self.n_test < 0:
            raise CnaError("n_test must not be negative")
        if not self.lr > 0:
            raise CnaError(f"learning rate must be positive, not {self.lr}")
        if not 0 <= self.dropout < 1:
            raise CnaError(f"dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules:
            raise CnaError("no LoRA target modules given")


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# --------------------------------------------------------------------------- the adapter
@dataclass
class Adapter:
    """A LoRA adapter attached (in place) to a view's model, as ``train_lora`` and
    ``load_adapter`` return it.

    ``peft_model``: peft's wrapper of ``view.model`` (its modules are the view's, with LoRA
    layers injected); ``meta``: what ``save_adapter`` writes to ``cnalens.json`` (settings,
    targets, base identity, training time and history); ``path``: the folder it was loaded
    from (None for a freshly trained one)."""

    peft_model: Any
    meta: dict
    path: Path | None = field(default=None)

    @property
    def targets(self) -> list[str]:
        """Full module names (relative to ``view.model``) carrying the LoRA."""
        return list(self.meta.get("targets", []))

    def disabled(self) -> AbstractContextManager:
        """``with adapter.disabled():`` runs the original model (the LoRA branch skipped)."""
        return self.peft_model.disable_adapter()


def _adapter(adapter: Adapter, what: str) -> Adapter:
    if not isinstance(adapter, Adapter):
        raise CnaError(f"{what} takes the Adapter that train_lora or load_adapter returns, "
                       f"not {type(adapter).__name__}")
    return adapter


# --------------------------------------------------------------------------- data
def _per_op(total: int, n_ops: int) -> int:
    return max(1, math.ceil(total / n_ops)) if total > 0 else 0


def lora_cases(settings: LoraSettings) -> tuple[list[Case], list[Case]]:
    """(train, test): disjoint operand pairs (the fixed arithmetic split), ``eq`` template,
    negative differences included; CnaError when either split is empty."""
    s = settings
    out = []
    for split, total in (("train", s.n_train), ("test", s.n_test)):
        n = _per_op(total, len(s.ops))
        if n == 0:
            raise CnaError(f"the LoRA {split} split is empty (n_{split} = {total})")
        try:
            cases = arithmetic_cases(s.ops, s.digits, ("eq",), n=n, seed=s.seed, split=split,
                                     negative=s.negative, shots=s.shots)
        except CnaError as exc:
            raise CnaError(f"the LoRA {split} split is empty: {exc}") from None
        out.append(cases)
    return out[0], out[1]


# --------------------------------------------------------------------------- targets
def _is_projection(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, (nn.Linear, Conv1D))


def _has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def target_names(view: ModelView, layers: Sequence[int],
                 target_modules: Sequence[str]) -> list[str]:
    """Full module names (relative to ``view.model``) of the LoRA targets."""
    if not layers:
        raise CnaError("no LoRA layer given")
    view.check_layers(layers)
    names = {id(m): n for n, m in view.model.named_modules()}
    out: list[str] = []
    for layer in layers:
        block = view.layers[layer]
        attn = view.module(layer, "attn")
        attn_proj = [m for m in attn.modules() if _is_projection(m)]
        o_proj = view.module(layer, "o_proj")
        for t in target_modules:
            if t == "attn":
                mods = attn_proj
            elif t == "qkv":
                mods = [m for m in attn_proj if m is not o_proj]
            elif t in ("o_proj", "down_proj"):
                mod = view.module(layer, t)
                if mod is None and t == "down_proj" and view.is_moe(layer):
                    raise CnaError(f"LoRA target 'down_proj': layer {layer} is a mixture of "
                                   "experts, whose down projections are fused 3-D parameters "
                                   "(no linear module): target attn, qkv or o_proj there")
                mods = [] if mod is None else [mod]
            else:
                mods = [m for n, m in block.named_modules()
                        if (n == t or n.endswith("." + t)) and _is_projection(m)]
            if not mods:
                raise CnaError(f"LoRA target '{t}' matches no linear module in layer {layer}: "
                               f"use {', '.join(ROLES)} or a module name such as "
                               f"{_example(block)}")
            out += [names[id(m)] for m in mods if names[id(m)] not in out]
    return out


def _example(block: nn.Module) -> str:
    leaves = [n for n, m in block.named_modules() if _is_projection(m)]
    return ", ".join(leaves[:4]) or "(none)"


# --------------------------------------------------------------------------- identity
def base_identity(view: ModelView, targets: Sequence[str] = ()) -> dict:
    """What an adapter must match: architecture sizes, source, and a fingerprint of the
    targeted base weights (sum and sum of squares, dtype-robust)."""
    s = view.summary()
    mods = dict(view.model.named_modules())
    fp = {}
    for name in targets:
        w = _base_weight(mods[name]).detach().double()
        fp[name] = [float(w.sum()), float(w.pow(2).sum())]
    return {"spec": s["spec"], "family": s["family"], "model_type": s["model_type"],
            "n_layers": s["n_layers"], "n_heads": s["n_heads"], "d_model": s["d_model"],
            "vocab_size": s["vocab_size"], "ffn_widths": list(view.ffn_widths),
            "source": s["source"], "gguf_sha256": s["gguf_sha256"], "fingerprint": fp}


def _base_weight(mod: nn.Module) -> torch.Tensor:
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    return base.weight


def _mismatch(saved: dict, view, targets: Sequence[str]) -> str | None:
    have = base_identity(view, [t for t in targets
                                if t in dict(view.model.named_modules())])
    for key in ("family", "n_layers", "n_heads", "d_model", "vocab_size", "ffn_widths"):
        if saved.get(key) != have.get(key):
            return f"{key} {saved.get(key)} vs {have.get(key)}"
    for name, (s1, s2) in saved.get("fingerprint", {}).items():
        if name not in have["fingerprint"]:
            return f"module {name} missing"
        h1, h2 = have["fingerprint"][name]
        if not (math.isclose(s1, h1, rel_tol=1e-3, abs_tol=1e-3)
                and math.isclose(s2, h2, rel_tol=1e-3)):
            return f"weights of {name} differ"
    return None


# --------------------------------------------------------------------------- loss
def _answer_targets(items: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
    """(B, k) answer token ids right-aligned (left padding), -100 before each answer."""
    k = max(len(e.answer_ids) for e in items)
    t = torch.full((len(items), k), -100, dtype=torch.long)
    for i, e in enumerate(items):
        t[i, k - len(e.answer_ids):] = torch.as_tensor(e.answer_ids)
    return t, k


def answer_loss(view: ModelView, items: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the answer tokens of a batch, and the token count.

    The unembedding runs only at the answer positions (the last ``k`` of each left-padded
    row, padding masked)."""
    targets, k = _answer_targets(items)
    b = view.batch([e.input_ids for e in items])
    hidden = view.hidden(b)[:, -k:]
    targets = targets.to(hidden.device)
    keep = targets >= 0
    logits = view.logits(hidden[keep])
    n = int(keep.sum())
    logits = logits.to(compute_dtype(logits.dtype))
    return nn.functional.cross_entropy(logits, targets[keep]), n


# --------------------------------------------------------------------------- training
def _progress_bar(show: bool):
    from rich.progress import TextColumn

    return progress_bar(show, TextColumn("loss {task.fields[loss]}"))


def train_lora(view: ModelView, train_cases: Sequence[Case] | Sequence[Encoded],
               settings: LoraSettings, progress: bool = True) -> tuple[Adapter, pd.DataFrame]:
    """Train a LoRA on ``settings.layers`` of ``view.model`` (in place: see the module doc).

    Seeded (LoRA init, batch order, dropout): the same settings on the same machine give
    the same adapter. AdamW, linear warm-up over the first 5% of steps then linear decay.
    Returns ``(adapter, history)``: the :class:`Adapter`, and one row per step: step,
    epoch, loss (mean over the batch's answer tokens), tokens, lr, seconds (wall) and
    cpu_seconds (process CPU time: on one thread, what the wall time would be on an idle
    machine).
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    settings.check()
    if _has_lora(view.model):
        raise CnaError("the model already carries a LoRA adapter: unload it first "
                       "(unload_lora) or load a fresh model")
    enc = as_encoded(view.tokenizer, train_cases)
    if not enc:
        raise CnaError("the LoRA training split is empty")
    targets = target_names(view, settings.layers, settings.target_modules)
    mods = dict(view.model.named_modules())
    conv = any(isinstance(mods[t], Conv1D) for t in targets)
    identity = base_identity(view, targets)
    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                        lora_dropout=settings.dropout, target_modules=targets, bias="none",
                        fan_in_fan_out=conv, init_lora_weights=True)
    with warnings.catch_warnings():  # transformers' deprecation notes inside peft
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(view.model, config)
    peft_model.eval()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for name, mod in peft_model.named_modules():
        if "lora_dropout" in name:
            mod.train()
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(enc) / settings.batch_size)
    total = per_epoch * settings.epochs
    warm = max(1, round(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    gen = torch.Generator().manual_seed(settings.seed)
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with _progress_bar(progress) as bar:
            task = bar.add_task(f"LoRA layer(s) {','.join(map(str, settings.layers))}",
                                total=total, loss="-")
            step = 0
            for epoch in range(settings.epochs):
                order = torch.randperm(len(enc), generator=gen)
                for i in range(0, len(enc), settings.batch_size):
                    batch = [enc[j] for j in order[i:i + settings.batch_size].tolist()]
                    loss, n_tok = answer_loss(view, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    value = float(loss.detach())
                    rows.append({"step": step, "epoch": epoch, "loss": value, "tokens": n_tok,
                                 "lr": sched.get_last_lr()[0],
                                 "seconds": time.perf_counter() - t0,
                                 "cpu_seconds": time.process_time() - c0})
                    step += 1
                    bar.update(task, advance=1, loss=f"{value:.3f}")
    finally:
        peft_model.eval()
        for p in params:
            p.requires_grad_(False)
    history = pd.DataFrame(rows)
    meta = {
        "settings": settings.to_dict(), "targets": targets, "base": identity,
        "n_train": len(enc), "train_seconds": round(time.perf_counter() - t0, 2),
        "train_cpu_seconds": round(time.process_time() - c0, 2),
        "steps": total, "loss_first": rows[0]["loss"] if rows else None,
        "loss_last": rows[-1]["loss"] if rows else None,
        "history": history[["step", "loss", "lr", "seconds"]].round(5).to_dict("list")
        if rows else None}
    return Adapter(peft_model, meta), history


def unload_lora(adapter: Adapter) -> nn.Module:
    """Remove the LoRA layers from the base model (restoring its original modules); returns
    the base model (``view.model``)."""
    return _adapter(adapter, "unload_lora").peft_model.unload()


# --------------------------------------------------------------------------- save / load
def save_adapter(adapter: Adapter, dir: str | Path) -> Path:
    """Save in peft's format (adapter_config.json, adapter_model.safetensors) plus
    ``cnalens.json`` (settings, targets, base model identity), atomically: an existing
    adapter folder is replaced, any other non-empty folder is refused."""
    import shutil
    import tempfile

    adapter = _adapter(adapter, "save_adapter")
    dir = Path(dir)
    if dir.exists() and any(dir.iterdir()) and not (dir / "adapter_config.json").is_file():
        raise CnaError(f"{dir} exists and holds no adapter: not overwriting it")
    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dir.name}.", dir=dir.parent))
    try:
        adapter.peft_model.save_pretrained(str(tmp))
        write_json(tmp / META_FILE, adapter.meta)
        if dir.exists():
            shutil.rmtree(dir)
        tmp.rename(dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dir


def _adapter_dir(dir: str | Path) -> Path:
    d = Path(dir)
    if (d / "adapter_config.json").is_file():
        return d
    if (d / "adapter" / "adapter_config.json").is_file():
        return d / "adapter"
    raise CnaError(f"no LoRA adapter in {d} (expected adapter_config.json there or in "
                   f"{d}/adapter)")


def read_adapter_meta(dir: str | Path) -> dict:
    """The ``cnalens.json`` of a saved adapter (settings, targets, base identity)."""
    d = _adapter_dir(dir)
    path = d / META_FILE
    if not path.is_file():
        raise CnaError(f"{d} lacks {META_FILE}: not saved by cnalens")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CnaError(f"{path} is not valid JSON: {exc}") from None


def load_adapter(view: ModelView, dir: str | Path) -> Adapter:
    """Attach a saved adapter (``DIR`` or ``DIR/adapter``) to ``view.model``, in place, and
    return it as an :class:`Adapter` (``adapter.disabled()``, ``unload_lora(adapter)``).

    CnaError when the folder holds no adapter or the adapter does not fit this base model
    (other family or sizes, other FFN widths, other weights in the targeted modules)."""
    from peft import PeftModel

    d = _adapter_dir(dir)
    meta = read_adapter_meta(d)
    targets = meta.get("targets", [])
    if _has_lora(view.model):
        raise CnaError("the model already carries a LoRA adapter: load a fresh model")
    why = _mismatch(meta.get("base", {}), view, targets)
    if why:
        raise CnaError(f"adapter {d} was trained on another base model "
                       f"({meta.get('base', {}).get('spec')}): {why}")
    try:
        with warnings.catch_warnings():  # transformers' deprecation notes inside peft
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(view.model, str(d), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CnaError(f"adapter {d} does not fit this model: {first}") from None
    peft_model.eval()
    return Adapter(peft_model, meta, d)


# --------------------------------------------------------------------------- evaluation
def evaluate_runs(view: ModelView, adapter: Adapter, cases: Cases, batch_size: int = 64,
                  progress: bool = True) -> pd.DataFrame:
    """Per-case results of the original (adapter disabled) and the LoRA model, with a
    ``run`` column (``original``, ``lora``)."""
    from cnalens.evaluate import evaluate

    enc = as_encoded(view.tokenizer, cases)
    with _adapter(adapter, "evaluate_runs").disabled():
        orig = evaluate(view, enc, batch_size=batch_size, progress=progress,
                        description="evaluating original")
    lora = evaluate(view, enc, batch_size=batch_size, progress=progress,
                    description="evaluating LoRA")
    return pd.concat([orig.assign(run="original"), lora.assign(run="lora")],
                     ignore_index=True)


def accuracy_by_run(per_case: pd.DataFrame) -> pd.DataFrame:
    """acc/acc_first with Wilson intervals per run x op (and op "all")."""
    from cnalens.evaluate import accuracy_table

    frames = []
    for run, g in per_case.groupby("run", sort=False):
        t = accuracy_table(g)
        t = t[(t["template"] == "all") | (t["template"] == "eq")]
        t = t.drop_duplicates(["op", "digits"], keep="last")
        frames.append(t.assign(run=run))
    out = pd.concat(frames, ignore_index=True)
    return out[["run", *[c for c in out.columns if c != "run"]]]


# --------------------------------------------------------------------------- the study
def default_layer(view: ModelView) -> int:
    """The LoRA layer used when none is given: a quarter of the depth (the paper's best
    LoRA layers were 1-9 of Llama-7B's 32, the shallow ones below its arithmetic heads)."""
    return max(1, view.n_layers // 4) if view.n_layers > 1 else 0


def sweep_layers(view: ModelView, spec: str | None, profile: str = "quick") -> list[int]:
    """``auto``: a spread of four layers (every layer under the full profile); ``all``;
    or a comma-separated list."""
    from cnalens.names import parse_ints

    if not spec:
        return []
    n = view.n_layers
    if spec == "all" or (spec == "auto" and profile == "full"):
        return list(range(n))
    if spec == "auto":
        return sorted({max(0, round(f * (n - 1))) for f in (0.1, 0.25, 0.5, 0.8)})
    layers = parse_ints(spec, "sweep-layers")
    view.check_layers(layers)
    return layers


def sample_per_op(enc: Sequence[Encoded], n: int, seed: int) -> list[Encoded]:
    """Up to ``n`` of the encoded cases of each op (label ``op``; ``custom`` without one),
    drawn without replacement by a generator seeded with ``seed`` and the op (the same
    cases for the same seed, whatever the other ops), in the order the ops first occur."""
    import random

    by_op: dict[str, list[Encoded]] = {}
    for e in enc:
        by_op.setdefault(e.case.labels.get("op", "custom"), []).append(e)
    out = []
    for op, items in by_op.items():
        rng = random.Random(f"{seed}|cna|{op}")
        out += rng.sample(items, min(n, len(items)))
    return out


__all__ = ["Adapter", "LoraSettings", "lora_cases", "train_lora", "save_adapter",
           "load_adapter", "unload_lora", "evaluate_runs", "accuracy_by_run", "target_names",
           "answer_loss", "read_adapter_meta", "base_identity", "default_layer",
           "sweep_layers", "sample_per_op"]
