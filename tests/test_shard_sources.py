"""Shards read from file:// URLs, pipe: commands and fsspec URLs, against the same shards read
as local files."""
from __future__ import annotations

import hashlib
import json
import shlex
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.data.manifest import load_manifest
from pipeline.data.shards import RandomAccess, _iter_groups, _open_tar, iter_raw, iter_samples
from pipeline.data.writing import build_manifest, write_manifest
from pipeline.errors import ShardError
from tests._data_helpers import cut_points, png_bytes, simple_members, write_tar

NAMES = ("s-000000.tar", "s-000001.tar")


def _store(tmp_path: Path) -> Path:
    """Two good shards in a folder outside any dataset directory."""
    store = tmp_path / "store"
    store.mkdir()
    write_tar(store / NAMES[0], simple_members(["k0", "k1"], seed=0))
    write_tar(store / NAMES[1], simple_members(["k2", "k3", "k4"], seed=10))
    return store


def _pipe(path: Path) -> str:
    return f"pipe:cat {shlex.quote(str(path))}"


def _forms(store: Path) -> dict[str, list[str]]:
    """The same shards named as each kind of source."""
    return {"file": [(store / n).as_uri() for n in NAMES],
            "pipe": [_pipe(store / n) for n in NAMES],
            "absolute": [str(store / n) for n in NAMES],
            "relative": [f"../store/{n}" for n in NAMES],
            "pipe_braces": [f"pipe:cat {store}/s-{{000000..000001}}.tar"],
            "file_glob": [(store / "x").as_uri()[:-1] + "s-*.tar"]}


def _local_dataset(tmp_path: Path, store: Path, name: str = "local") -> Path:
    root = tmp_path / name
    root.mkdir()
    for n in NAMES:
        (root / n).write_bytes((store / n).read_bytes())
    write_manifest(root)
    return root


def _dataset(tmp_path: Path, name: str, sources: list[str]) -> Path:
    """A dataset directory whose shards.txt lists ``sources``; manifest written."""
    root = tmp_path / name
    root.mkdir()
    lines = [f"{spec}   # shard {i}" if i % 2 else spec for i, spec in enumerate(sources)]
    (root / "shards.txt").write_text("# shards kept elsewhere\n\n" + "\n".join(lines) + "\n")
    write_manifest(root)
    return root


def _as_rows(samples) -> list[tuple]:
    return [(s.sample_id, s.captions, s.label, np.asarray(s.image).tobytes()) for s in samples]


def test_every_source_form_reads_the_same_samples(tmp_path: Path) -> None:
    store = _store(tmp_path)
    local = load_manifest(_local_dataset(tmp_path, store), verify=True)
    expected = _as_rows(iter_samples(local))
    assert len(expected) == 5 and expected[2][0] == "s-000001.tar/k2"
    assert "source" not in json.loads((local.root / "manifest.json").read_text())["shards"][0]
    for form, sources in _forms(store).items():
        manifest = load_manifest(_dataset(tmp_path, form, sources), verify=True)
        assert manifest.fingerprint == local.fingerprint, form  # content, not location
        assert [s.name for s in manifest.shards] == list(NAMES)
        assert _as_rows(iter_samples(manifest)) == expected, form
        assert _as_rows(iter_samples(manifest, start=1, stop=4)) == expected[1:4], form
        raw = [k for info in manifest.shards for k, _ in iter_raw(manifest.location(info), info.name)]
        assert raw == ["k0", "k1", "k2", "k3", "k4"]
    file_manifest = load_manifest(tmp_path / "file")
    reader = RandomAccess(file_manifest)
    try:
        assert _as_rows([reader.read("s-000001.tar/k3"), reader.read("s-000000.tar/k0")]) == \
            [expected[3], expected[0]]
    finally:
        reader.close()


def test_streamed_shard_holds_one_sample_at_a_time(tmp_path: Path) -> None:
    big = [(f"k{i}.png", png_bytes(i, size=128)) for i in range(40)]  # ~49 KiB each, ~2 MiB in all
    members = [m for i, png in enumerate(big) for m in (png, (f"k{i}.txt", b"caption"))]
    path = write_tar(tmp_path / "big-000000.tar", members)
    tar = _open_tar(_pipe(path), "big-000000.tar")
    held = []
    try:
        for key, group in _iter_groups(tar, "big-000000.tar"):
            held.append(tar.fileobj.held)
        assert len(held) == 40 and tar.fileobj.finish()[0] == path.stat().st_size
    finally:
        tar.close()
    assert max(held) < (1 << 20) + 2 * 50_000 < path.stat().st_size  # read-ahead + about one sample


def test_pipe_source_refuses_reads_by_id(tmp_path: Path) -> None:
    store = _store(tmp_path)
    reader = RandomAccess(load_manifest(_dataset(tmp_path, "pipe", _forms(store)["pipe"])))
    with pytest.raises(ShardError, match=r"shard s-000000\.tar: source 'pipe:cat .*' is a command.*"
                                         r"hard_negative_fraction.*seekable"):
        reader.read("s-000000.tar/k0")


def _broken_shards(tmp_path: Path) -> list[tuple[str, bytes]]:
    """(what, tar bytes): truncated at every kind of point, and the two duplicate-key layouts."""
    good = write_tar(tmp_path / "good.tar", simple_members(["k0", "k1", "k2"]))
    whole = good.read_bytes()
    out = [(f"cut at {c}", whole[:c]) for c in cut_points(good)]
    for i, members in enumerate([
        [("a.png", png_bytes(0)), ("a.png", png_bytes(1)), ("a.txt", b"x")],
        [("a.png", png_bytes(0)), ("a.txt", b"x"), ("b.png", png_bytes(1)), ("b.txt", b"y"), ("a.json", b"{}")],
    ]):
        out.append((f"duplicate {i}", write_tar(tmp_path / f"dup{i}.tar", members).read_bytes()))
    return out


def _error(fn) -> str:
    with pytest.raises(ShardError) as info:
        fn()
    return str(info.value)


def _same_error(got: str, expected: str, source: str) -> bool:
    """The local file's error, word for word; a source that is not a local file (a command, a
    URL) is named after it, so the message says which object failed."""
    local = not source.startswith(("pipe:", "memory:", "s3:", "http"))
    return got == (expected if local else f"{expected} [source: {source}]")


def test_every_source_form_raises_the_same_structural_errors(tmp_path: Path) -> None:
    for n, (what, data) in enumerate(_broken_shards(tmp_path)):
        case = tmp_path / f"case{n}"
        case.mkdir()
        shard = case / "bad-000000.tar"
        shard.write_bytes(data)
        local_root = case / "local"
        local_root.mkdir()
        (local_root / shard.name).write_bytes(data)
        expected = _error(lambda: build_manifest(local_root))
        assert expected.startswith("shard bad-000000.tar")
        assert ("truncated" in expected) if what.startswith("cut") else ("key 'a': duplicate key" in expected)
        for source in (shard.as_uri(), _pipe(shard), str(shard)):
            got = _error(lambda: build_manifest(case, [source]))
            assert _same_error(got, expected, source), (what, source, got)


def test_every_source_form_raises_the_same_truncation_error_while_reading(tmp_path: Path) -> None:
    store = _store(tmp_path)
    whole = (store / NAMES[1]).read_bytes()
    local = load_manifest(_local_dataset(tmp_path, store))
    streamed = {form: load_manifest(_dataset(tmp_path, form, _forms(store)[form]))
                for form in ("file", "pipe")}
    cut = cut_points(store / NAMES[1])[0]  # inside the first image's data
    (store / NAMES[1]).write_bytes(whole[:cut])
    (local.root / NAMES[1]).write_bytes(whole[:cut])
    expected = _error(lambda: list(iter_samples(local)))
    assert expected.startswith("shard s-000001.tar: truncated")
    for form, manifest in streamed.items():
        got = _error(lambda: list(iter_samples(manifest)))
        assert _same_error(got, expected, str(manifest.location(manifest.shards[1]))), (form, got)


def test_streamed_read_checks_content_against_the_manifest(tmp_path: Path) -> None:
    store = _store(tmp_path)
    manifest = load_manifest(_dataset(tmp_path, "pipe", _forms(store)["pipe"]), verify=True)
    path = store / NAMES[0]
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first png's pixels: same size, structure intact
    path.write_bytes(bytes(data))
    load_manifest(manifest.root, verify=True)  # a pipe: source is only checked when read
    with pytest.raises(ShardError, match=r"shard s-000000\.tar: content changed since the manifest"):
        list(iter_samples(manifest, decode_images=False))


def test_pipe_command_failure_names_command_and_stderr(tmp_path: Path) -> None:
    store = _store(tmp_path)
    missing = tmp_path / "nowhere" / "m-000000.tar"
    msg = _error(lambda: build_manifest(store, [_pipe(missing)]))
    assert msg.startswith("shard m-000000.tar: command `cat ") and "exited with status 1" in msg
    assert "No such file" in msg
    # a whole tar, then a failure: the exit status still counts
    late = f"pipe:cat {shlex.quote(str(store / NAMES[0]))} && exit 3"
    assert "exited with status 3" in _error(lambda: build_manifest(store, [late]))
    manifest = load_manifest(_dataset(tmp_path, "pipe", _forms(store)["pipe"]))
    (store / NAMES[1]).unlink()
    assert "No such file" in _error(lambda: list(iter_samples(manifest)))


def test_source_list_errors(tmp_path: Path) -> None:
    store = _store(tmp_path)
    twice = [str(store / NAMES[0]), _pipe(store / NAMES[0])]
    assert "both give shard name 's-000000.tar'" in _error(lambda: build_manifest(store, twice))
    assert "matches no file" in _error(lambda: build_manifest(store, [str(store / "none-*.tar")]))
    assert "cannot name the shard" in _error(lambda: build_manifest(store, ["pipe:echo hi"]))
    missing = _error(lambda: build_manifest(store, ["nosuchproto9://bucket/x.tar"]))
    assert "'nosuchproto9://bucket/x.tar'" in missing


@pytest.fixture
def memory_bucket():
    """A fresh folder on fsspec's in-memory filesystem (a real fsspec backend, like s3fs's API)."""
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_fsspec_url_source(tmp_path: Path, memory_bucket) -> None:
    fs, bucket = memory_bucket
    store = _store(tmp_path)
    for n in NAMES:
        fs.pipe(f"{bucket}/{n}", (store / n).read_bytes())
    local = load_manifest(_local_dataset(tmp_path, store))
    manifest = load_manifest(_dataset(tmp_path, "memory", [f"memory://{bucket}/s-*.tar"]), verify=True)
    assert manifest.fingerprint == local.fingerprint
    assert [s.source for s in manifest.shards] == [f"memory://{bucket}/{n}" for n in NAMES]
    expected = _as_rows(iter_samples(local))
    assert _as_rows(iter_samples(manifest)) == expected
    reader = RandomAccess(manifest)  # fsspec files seek: reads by id work
    try:
        assert _as_rows([reader.read("s-000001.tar/k4"), reader.read("s-000000.tar/k1")]) == \
            [expected[4], expected[1]]
    finally:
        reader.close()
    fs.pipe(f"{bucket}/{NAMES[1]}", (store / NAMES[1]).read_bytes()[:-1024])
    with pytest.raises(ShardError, match=r"s-000001\.tar: size \d+ != \d+ in manifest \(memory://"):
        load_manifest(manifest.root, verify=True)


class EtagMemoryFileSystem(MemoryFileSystem):
    """fsspec's in-memory store reporting an ``ETag`` (the md5 of the content), as S3 does."""

    protocol = "etagmemory"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("etagmemory://"))

    def info(self, path, **kwargs):
        info = super().info(path, **kwargs)
        if info["type"] == "file":
            info["ETag"] = hashlib.md5(self.cat_file(path)).hexdigest()
        return info


def test_fsspec_version_tag_is_recorded_and_checked(tmp_path: Path, memory_bucket) -> None:
    fsspec.register_implementation("etagmemory", EtagMemoryFileSystem, clobber=True)
    fs, bucket = memory_bucket
    store = _store(tmp_path)
    data = (store / NAMES[0]).read_bytes()
    fs.pipe(f"{bucket}/{NAMES[0]}", data)
    source = f"etagmemory://{bucket}/{NAMES[0]}"
    manifest = load_manifest(_dataset(tmp_path, "etag", [source]), verify=True)
    assert manifest.shards[0].version == f"ETag={hashlib.md5(data).hexdigest()}"
    changed = bytearray(data)
    changed[600] ^= 0xFF  # same size: only the version tag tells
    fs.pipe(f"{bucket}/{NAMES[0]}", bytes(changed))
    load_manifest(manifest.root)  # without verify, remote shards are not contacted
    with pytest.raises(ShardError, match=r"s-000000\.tar: version ETag=\w+ != ETag=\w+ in manifest"):
        load_manifest(manifest.root, verify=True)
