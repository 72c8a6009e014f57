"""Resolve a model spec (alias, .gguf file, save_pretrained folder, hub id) and load it.

GGUF files are dequantised by transformers, which is slow, so each one is converted once into
``cache_dir()/models/<sha256[:16]>/`` (safetensors + tokenizer) and later loads read that folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnalens.errors import CnaError
from cnalens.errors import first_line as _why
from cnalens.io import read_json, sha256_file, write_json
from cnalens.models.aliases import ALIASES
from cnalens.models.pruned import is_pruned, load_pruned, pruned_experts, pruned_widths
from cnalens.models.shape import ModelShape
from cnalens.progress import notice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "gemma3-270m"

MARKER = "cnalens_cache.json"
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "auto": "auto",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Root of cnalens' caches: ``$CNALENS_CACHE`` or ``~/.cache/cnalens``."""
    return Path(os.environ.get("CNALENS_CACHE") or "~/.cache/cnalens").expanduser()


def _check_gguf_magic(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CnaError(f"cannot read GGUF file {path}: {_why(e)}") from None
    if magic != b"GGUF":
        raise CnaError(f"cannot read GGUF file {path}: not a GGUF file (bad magic {magic!r})")


def resolve_spec(spec: str) -> dict[str, Any]:
    """Classify ``spec`` as alias / gguf / dir / hub without loading a model.

    Returns ``{"spec", "kind", "path", "gguf_sha256"}``; assembles an alias's GGUF into
    ``cache_dir()/gguf`` if needed (``cnalens.models.aliases``).
    """
    spec = str(spec).strip()
    if spec in ALIASES:
        path, sha = ALIASES[spec].locate(cache_dir() / "gguf")
        return {"spec": spec, "kind": "alias", "path": str(path), "gguf_sha256": sha}
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CnaError(f"model file {p} is not a .gguf file")
        _check_gguf_magic(p)
        sha = sha256_file(p)
        return {"spec": spec, "kind": "gguf", "path": str(p.resolve()), "gguf_sha256": sha}
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = f"; to load a GGUF pass the file itself, e.g. {p / ggufs[0]}" if ggufs else ""
            raise CnaError(
                f"model directory {p} has no config.json (not a save_pretrained output){hint}"
            )
        return {"spec": spec, "kind": "dir", "path": str(p.resolve()), "gguf_sha256": None}
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if p.suffix.lower() == ".gguf" or looks_like_path:
        raise CnaError(f"model path {spec} does not exist")
    if _HUB_ID.match(spec):
        return {"spec": spec, "kind": "hub", "path": None, "gguf_sha256": None}
    raise CnaError(
        f"unknown model '{spec}': not an alias ({', '.join(ALIASES)}), a directory, "
        "a .gguf file, or a hub id that can be reached"
    )


def model_shape(spec: str) -> ModelShape:
    """The shape of model ``spec`` from its config alone: nothing converted or loaded.

    A GGUF not yet in the cache is read for its metadata only (seconds), so the command
    line can check layer, head and neuron numbers before a first-use conversion.
    """
    from transformers import AutoConfig

    res = resolve_spec(spec)
    src, kw = res["path"] or res["spec"], {}
    if res["gguf_sha256"]:
        cache = cache_dir() / "models" / res["gguf_sha256"][:16]
        if _valid_cache(cache, res["gguf_sha256"]):
            src = str(cache)
        else:
            src, kw = str(Path(res["path"]).parent), {"gguf_file": Path(res["path"]).name}
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(src, **kw)
    except Exception as e:
        what = f"GGUF file {res['path']}" if kw else f"the config of '{spec}'"
        raise CnaError(f"cannot read {what}: {_why(e)}") from None
    pruned = res["kind"] == "dir" and is_pruned(res["path"])
    if not pruned:
        return ModelShape.from_config(config)
    return ModelShape.from_config(config, pruned_widths(res["path"]),
                                  pruned_experts(res["path"]))


def resolve_device(device: str) -> str:
    """Map ``auto`` to cuda/cpu and check that the requested device exists."""
    device = (device or "cpu").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CnaError(f"unknown device '{device}' (use cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CnaError(f"device '{device}' requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise CnaError(f"device '{device}' requested but only {n} GPU(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CnaError(f"device '{device}' requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CnaError(f"unsupported device '{device}' (use cpu, cuda, cuda:N, mps or auto)")
    return device


def _torch_dtype(dtype: str) -> torch.dtype | str:
    if dtype not in _DTYPES:
        raise CnaError(f"unknown dtype '{dtype}' (use one of {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logging and progress bars (incl. the GGUF tqdm) for a while."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    old_tqdm = gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        gguf_utils.tqdm = old_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _status(progress: bool, message: str) -> contextlib.AbstractContextManager:
    return _console().status(message) if progress else contextlib.nullcontext()


def _valid_cache(path: Path, sha: str) -> bool:
    try:
        return read_json(path / MARKER).get("gguf_sha256") == sha
    except (OSError, ValueError, AttributeError):
        return False


def _share(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the cache the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _convert_gguf(gguf: Path, sha: str, final: Path) -> None:
    """Dequantise ``gguf`` once and save it as safetensors + tokenizer into ``final`` atomically."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        try:
            from gguf import GGUFReader

            GGUFReader(str(gguf))  # parses header + tensor index: catches truncation early
            folder, kw = str(gguf.parent), {"gguf_file": gguf.name}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
            tok = AutoTokenizer.from_pretrained(folder, **kw)
        except Exception as e:
            raise CnaError(f"cannot read GGUF file {gguf}: {_why(e)}") from None
        # transformers refuses to save a GGUF-"quantised" model, but the weights are plain fp32
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(model)
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        marker = {
            "gguf_sha256": sha,
            "source": str(gguf),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "transformers": transformers.__version__,
        }
        write_json(tmp / MARKER, marker)
        _share(tmp)
        if _valid_cache(final, sha):  # another process finished first
            return
        if final.exists():  # stale or half-built cache from an older run: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _valid_cache(final, sha):  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish_tokenizer(tok: Any) -> Any:
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load ``spec`` as (model in eval mode, left-padding tokenizer, info dict)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    device = resolve_device(device) if device_map is None else device
    t0 = time.perf_counter()
    res = resolve_spec(spec)
    info: dict[str, Any] = {
        **res,
        "source": res["path"] or spec,
        "cache_path": None,
        "cache_hit": False,
    }
    src = res["path"] or spec
    with _quiet():
        if res["gguf_sha256"]:
            sha = res["gguf_sha256"]
            cache = cache_dir() / "models" / sha[:16]
            info["cache_path"] = str(cache)
            info["cache_hit"] = _valid_cache(cache, sha)
            if not info["cache_hit"]:
                notice(f"first use of {spec}: converting {Path(src).name} to safetensors "
                       f"once (1-2 min), cached in {cache}", progress)
                with _status(progress, "converting"):
                    _convert_gguf(Path(src), sha, cache)
                notice(f"converted {spec} in {time.perf_counter() - t0:.0f} s", progress)
            src = str(cache)
        kw: dict[str, Any] = {"dtype": torch_dtype}
        if device_map is not None:
            kw["device_map"] = device_map
        try:
            with _status(progress, f"loading {spec}"):
                if res["kind"] == "dir" and is_pruned(src):  # per-layer FFN widths
                    if device_map is not None:
                        raise CnaError("a pruned model loads without device_map")
                    model, info["pruned"] = load_pruned(src, **kw), True
                else:
                    model = AutoModelForCausalLM.from_pretrained(src, **kw)
                tok = AutoTokenizer.from_pretrained(src)
        except Exception as e:
            where = "from the hub" if res["kind"] == "hub" else f"from {src}"
            hint = f" (delete {src} to rebuild the cache)" if info["cache_path"] else ""
            raise CnaError(f"cannot load '{spec}' {where}: {_why(e)}{hint}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    if (model.dtype == torch.float64
            and getattr(model.config, "_experts_implementation", "eager") not in (None, "eager")):
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    tok = _finish_tokenizer(tok)
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id
    info.update(
        load_seconds=round(time.perf_counter() - t0, 3),
        model_class=type(model).__name__,
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        device_map=device_map,
    )
    return model, tok, info
