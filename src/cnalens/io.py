"""Atomic file writes and run metadata shared by every stage."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

_UMASK = os.umask(0)
os.umask(_UMASK)
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def write_with(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically by ``write(tmp)`` on a temp file beside it, then rename.

    If ``write`` raises, the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: Path) -> str:
    """sha256 of a file, memoised per process on (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def write_text(path: Path, text: str) -> Path:
    """Write text atomically (temp file in the same folder, then rename)."""
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> Path:
    return write_with(path, lambda p: p.write_bytes(data))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    """``df`` as CSV, atomically. pandas leaves a field holding a lone carriage return
    (a token such as "\\r") unquoted, which breaks the row on reading; such a table is
    written with every field quoted (read back with the same types)."""
    text = df.select_dtypes(include=["object", "string", "category"])
    cr = any(text[c].astype(str).str.contains("\r", regex=False).any() for c in text)
    return write_with(path, lambda p: df.to_csv(p, index=False,
                                                quoting=csv.QUOTE_ALL if cr else None))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
