"""Shards and caches in remote storage, against real servers on 127.0.0.1 started by the tests:
an HTTP server that answers range requests, and an S3 API (moto in server mode) read and
written through ``s3fs``. Nothing leaves the loopback interface.

From both servers, ``prepare source: webdataset`` (``split: none`` and ``split: hash``) and
``teach`` give the stores local files give; a truncated object and a missing one are errors
naming the URL. Teacher caches written to an ``s3://`` root read back as the local ones, with
the same checks.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import TeacherEntry
from pipeline.data.manifest import load_manifest
from pipeline.data.writing import write_shards
from pipeline.errors import ShardError
from pipeline.stores.teacher import TeacherCache
from stages.prepare.run import PrepareConfig, prepare
from stages.teach.run import TeachConfig, run_teach
from tests._servers import http_server, s3_server
from tests.conftest import TINY_CLIP_CFG, tiny_samples

pytestmark = pytest.mark.slow
TINY = TeacherEntry("open_clip", {"model_cfg": TINY_CLIP_CFG, "pretrained": None})
N_SHARDS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three tiny WebDataset shards (7 samples, 2 captions each) in a local folder."""
    folder = tmp_path_factory.mktemp("wds")
    write_shards(tiny_samples(18), folder, "part", 7)
    assert len(list(folder.glob("*.tar"))) == N_SHARDS
    return folder


@pytest.fixture(scope="module")
def local(shards, tmp_path_factory):
    """``split`` -> (dataset, stores) prepared and taught from the local shards (once per mode)."""
    made: dict[str, tuple[Path, dict]] = {}

    def get(split: str) -> tuple[Path, dict]:
        if split not in made:
            made[split] = prepared_and_taught(tmp_path_factory.mktemp(f"local-{split}"), "local",
                                              str(shards), split)
        return made[split]
    return get


def arrays(store: Path | str) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: np.asarray(group[name][:]) for name in sorted(group.array_keys())}


def prepared_and_taught(tmp_path: Path, name: str, src: str, split: str) -> tuple[Path, dict]:
    """``prepare`` from ``src`` with ``split``, then ``teach`` every split it made."""
    out = tmp_path / name / "data"
    summary = prepare(PrepareConfig(source="webdataset", src=src, out=str(out), split=split,
                                    shard_size=5, test_percent=25, val_percent=25), progress=False)
    splits = tuple(sorted(summary["splits"]))
    teach = TeachConfig(dataset=str(out), splits=splits, out_root=str(tmp_path / name / "caches"),
                        rows_per_shard=8, rows_per_chunk=4, summary_dir=str(tmp_path / name / "reports"))
    run_teach(teach, "tiny", entry=TINY, progress=False)
    return out, {s: tmp_path / name / "caches" / "tiny" / f"{s}.zarr" for s in splits}


def assert_same_stores(local: dict[str, Path], remote: dict[str, Path]) -> None:
    assert sorted(local) == sorted(remote)
    for split in local:
        mine, theirs = arrays(local[split]), arrays(remote[split])
        assert sorted(mine) == sorted(theirs)
        for name in mine:
            np.testing.assert_array_equal(mine[name], theirs[name], err_msg=f"{split} {name}")


def remote_pattern(base: str) -> str:
    return f"{base}/part-{{000000..{N_SHARDS - 1:06d}}}.tar"


@pytest.mark.parametrize("split", ["none", "hash"])
def test_http_shards_give_the_stores_of_local_files(shards, local, tmp_path, split):
    local_data, local_stores = local(split)
    with http_server(shards) as base:
        data, remote = prepared_and_taught(tmp_path, "http", remote_pattern(base), split)
        if split == "none":  # the manifest lists the URLs with their version tags (ETag)
            manifest = load_manifest(data / "train")
            assert all(s.source.startswith(base) and s.version.startswith("ETag=") for s in manifest.shards)
    assert_same_stores(local_stores, remote)
    if split == "hash":  # the shards were copied: the very same datasets
        for s in local_stores:
            assert load_manifest(local_data / s).fingerprint == load_manifest(data / s).fingerprint


@pytest.mark.parametrize("split", ["none", "hash"])
def test_s3_shards_give_the_stores_of_local_files(shards, local, tmp_path, split):
    import fsspec

    _, local_stores = local(split)
    with s3_server():
        fs = fsspec.filesystem("s3")
        fs.mkdir("wds")
        for p in sorted(shards.glob("*.tar")):
            fs.put_file(str(p), f"wds/laion/{p.name}")
        data, remote = prepared_and_taught(tmp_path, "s3", "s3://wds/laion/*.tar", split)
        if split == "none":
            assert [s.source for s in load_manifest(data / "train").shards] == [
                f"s3://wds/laion/part-{i:06d}.tar" for i in range(N_SHARDS)]
    assert_same_stores(local_stores, remote)


def test_truncated_and_missing_objects_are_errors_naming_the_url(shards, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shards, served)
    with http_server(served) as base:
        prepare(PrepareConfig(source="webdataset", src=remote_pattern(base), out=str(tmp_path / "data"),
                              split="none"), progress=False)
        teach = TeachConfig(dataset=str(tmp_path / "data"), splits=("train",), out_root=str(tmp_path / "caches"),
                            rows_per_shard=8, rows_per_chunk=4, summary_dir=str(tmp_path / "reports"))
        victim = served / "part-000001.tar"
        whole = victim.read_bytes()
        victim.write_bytes(whole[: len(whole) // 2])  # the object was cut short after prepare
        with pytest.raises(ShardError, match=rf"part-000001.tar.*{base}/part-000001.tar"):
            run_teach(teach, "tiny", entry=TINY, progress=False)
        victim.unlink()
        with pytest.raises(ShardError, match=rf"{base}/part-000001.tar not found"):
            run_teach(teach, "tiny", entry=TINY, progress=False)
        with pytest.raises(ShardError, match=rf"{base}/part-000009.tar"):  # named in prepare already
            prepare(PrepareConfig(source="webdataset", src=f"{base}/part-000009.tar",
                                  out=str(tmp_path / "data2"), split="hash"), progress=False)
    with s3_server():
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("wds")
        fs.put_file(str(shards / "part-000000.tar"), "wds/part-000000.tar")
        fs.pipe("wds/part-000001.tar", (shards / "part-000001.tar").read_bytes()[:3000])
        with pytest.raises(ShardError, match=r"s3://wds/part-000001.tar"):
            prepare(PrepareConfig(source="webdataset", src="s3://wds/part-{000000..000001}.tar",
                                  out=str(tmp_path / "data3"), split="hash"), progress=False)
        with pytest.raises(ShardError, match=r"s3://wds/part-000002.tar not found"):
            prepare(PrepareConfig(source="webdataset", src="s3://wds/part-000002.tar",
                                  out=str(tmp_path / "data4"), split="none"), progress=False)


# ----------------------------------------------------------------------------- caches in S3


def test_caches_are_written_to_and_read_from_an_s3_root(make_dataset, tmp_path, monkeypatch):
    import fsspec

    from pipeline.errors import CacheError
    from pipeline.stores.inspect import cache_info, verify_cache
    from pipeline.stores.neighbors import open_neighbors
    from stages.neighbors.run import NeighborsConfig, run_neighbors

    monkeypatch.chdir(tmp_path)  # a remote output's lock and scratch live under .remote/ here
    root = make_dataset(n_train=12, n_test=4)
    cfg = TeachConfig(dataset=str(root), splits=("train",), out_root=str(tmp_path / "local"),
                      rows_per_shard=8, rows_per_chunk=4, summary_dir=str(tmp_path / "reports"))
    run_teach(cfg, "tiny", entry=TINY, progress=False)
    local = tmp_path / "local/tiny/train.zarr"
    nn = dict(teacher="tiny", k=3, rows_per_shard=8)
    run_neighbors(NeighborsConfig(cache_root=str(tmp_path / "local"), out_root=str(tmp_path / "nn"), **nn),
                  "tiny", progress=False)
    with s3_server():
        fs = fsspec.filesystem("s3")
        fs.mkdir("team")
        remote_cfg = TeachConfig(**{**cfg.__dict__, "out_root": "s3://team/caches"})
        assert not run_teach(remote_cfg, "tiny", entry=TINY, progress=False)["up_to_date"]
        url = "s3://team/caches/tiny/train.zarr"
        assert fs.exists("team/caches/tiny/train.zarr/zarr.json")
        assert not list((tmp_path / ".remote").rglob("*.zarr"))  # the scratch work is gone
        for lazy in (False, True):
            eager_local, remote = TeacherCache.open(local), TeacherCache.open(url, lazy=lazy)
            np.testing.assert_array_equal(np.asarray(remote.image_emb[:]), eager_local.image_emb.astype(
                np.float16 if lazy else np.float32))
            np.testing.assert_array_equal(np.asarray(remote.text_ids[:]), eager_local.text_ids.astype(object))
        assert arrays(url).keys() == arrays(local).keys()
        assert verify_cache(url).ok and cache_info(url)["files"] == cache_info(local)["files"]
        assert run_teach(remote_cfg, "tiny", entry=TINY, progress=False)["up_to_date"]  # current: kept
        from pipeline.training.targets import TargetSources, open_targets

        targets = open_targets([url], load_manifest(root / "train"), TargetSources((url,)))  # training
        np.testing.assert_array_equal(targets.text_emb[np.array([5, 0])], TeacherCache.open(
            local, lazy=True).text_emb[np.array([5, 0])])
        # neighbours read their teacher store from S3 and are written there: the local lists
        run_neighbors(NeighborsConfig(cache_root="s3://team/caches", out_root="s3://team/nn", **nn),
                      "tiny", progress=False)
        got, want = open_neighbors("s3://team/nn/tiny/train.zarr"), open_neighbors(tmp_path / "nn/tiny/train.zarr")
        for name in ("i2t_topk_idx", "t2t_topk_sim"):
            np.testing.assert_array_equal(got[name], want[name])
        # the same checks as on local disk: a lost object and a cut one are named
        fs.rm_file("team/caches/tiny/train.zarr/image_emb/c/1/0")
        with pytest.raises(CacheError, match=r"s3://team/caches/tiny/train.zarr: .*shard file image_emb/c/1/0 is missing"):
            TeacherCache.open(url)
        assert any("image_emb/c/1/0 is missing" in f for f in verify_cache(url).faults)
        assert not run_teach(remote_cfg, "tiny", entry=TINY, progress=False)["up_to_date"]  # rebuilt
        shard = fs.cat_file("team/caches/tiny/train.zarr/text_emb/c/2/0")
        fs.pipe("team/caches/tiny/train.zarr/text_emb/c/2/0", shard[: len(shard) // 2])
        lazy = TeacherCache.open(url, lazy=True, verify=False)
        with pytest.raises(CacheError, match=r"s3://team/caches/tiny/train.zarr: array text_emb rows \[16, 20\)"):
            lazy.text_emb[np.array([17])]
        assert any("text_emb rows [16, 24): unreadable" in f for f in verify_cache(url).faults)
