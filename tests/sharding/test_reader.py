"""The shard format's reader (sharding/format/reader.py): a shard root read as the sharder wrote it,
checked against tarfile's own reading; tombstones never served; only the members asked for read; a
scan that sees every sample and the tar's sha256; and the same reads from an object store (a real S3
server on 127.0.0.1), whose errors name the store, never the local mirror."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from flora import store
from flora.sharding.format.reader import RemoteShardError, ShardReader, tar_samples, tar_stamp
from flora.sharding.format.schema import SampleMeta, ShardFormatError, sample_rows, table_bytes, table_name
from flora.store import S3Url


def tar_members(tar: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, ext -> bytes) of each sample, in tar order, read with tarfile (independently of the reader)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = t.extractfile(m).read()
    return out


def test_a_local_root_reads_what_tarfile_reads(shard_root):
    reader = ShardReader(shard_root)
    manifest = json.loads((shard_root / "manifest.json").read_text())
    shards = reader.shards("val")
    assert [s.rel for s in shards] == sorted(e["path"] for e in manifest["shards"] if e["split"] == "val")
    assert all(s.path == shard_root.resolve() / s.rel and s.sha256 and s.bytes for s in shards)
    for shard in shards:
        samples = list(reader.samples(shard))
        expected = tar_members(Path(shard.path))
        assert [s.key for s in samples] == [key for key, _ in expected] and samples
        for sample, (_key, members) in zip(samples, expected, strict=True):
            assert sample.jpg == members["jpg"] and sample.label == int(members["cls"])
            assert (
                sample.meta.label == sample.label
                and sample.meta.sha256 == hashlib.sha256(sample.jpg).hexdigest()
            )
    assert reader.class_mapping() == json.loads((shard_root / "class_mapping.json").read_text())


def test_tombstoned_samples_are_never_served(shard_copy):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["split"] == "train")
    keys = [key for key, _ in tar_members(shard_copy / entry["path"])]
    entry["tombstones"] = [keys[0], keys[3]]
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    reader = ShardReader(shard_copy)
    shard = next(s for s in reader.shards("train") if s.rel == entry["path"])
    assert shard.tombstones == {keys[0], keys[3]}
    served = [s.key for s in reader.samples(shard, ("json",))]
    assert served == [k for k in keys if k not in shard.tombstones]
    assert [s.key for s in tar_samples(Path(shard.path))] == keys  # one tar, no manifest: every sample


def test_only_the_members_asked_for_are_read(shard_root, tmp_path):
    tar = max((shard_root / "train").glob("*/*.tar"), key=lambda t: t.stat().st_size)
    metas = list(tar_samples(tar, ("json",)))
    assert len(metas) > 3
    assert all(s.jpg is None and s.label is None and s.meta is not None for s in metas)
    wanted = {metas[1].key, metas[-1].key}
    jpgs = list(tar_samples(tar, ("jpg",), keys=wanted))
    assert [s.key for s in jpgs] == [metas[1].key, metas[-1].key] and all(s.meta is None for s in jpgs)
    copy = tmp_path / tar.name  # without its .idx: the tar's headers say where the members are
    copy.write_bytes(tar.read_bytes())
    assert list(tar_samples(copy)) == list(tar_samples(tar))


def test_a_cls_that_is_not_a_label_is_a_format_error(tmp_path):
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in (("k1.cls", b"x7"), ("k1.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert list(tar_samples(tar, ("json",))) == [("k1", None, None, SampleMeta())]  # cls not asked for
    with pytest.raises(ShardFormatError, match=r"t.tar: sample k1: cls member b'x7' is not a label"):
        list(tar_samples(tar))


def test_a_scan_sees_every_sample_and_the_tars_sha256(shard_root):
    reader = ShardReader(shard_root)
    shard = reader.shards("train")[0]
    size, _mtime = tar_stamp(shard.path)
    with reader.scan(shard, size) as tar:
        jpgs = [get(comps["jpg"]) for comps, get in tar]
        assert tar.sha256() == shard.sha256
    assert jpgs == [s.jpg for s in reader.samples(shard)]
    assert size == shard.bytes and reader.table(shard, size, "etag") is None  # a local tar has no table


def test_broken_roots_are_format_errors(tmp_path, shard_copy):
    with pytest.raises(ShardFormatError, match="no manifest.json in"):
        ShardReader(tmp_path)
    reader = ShardReader(shard_copy)
    with pytest.raises(ShardFormatError, match=r"split 'holdout' has no shards"):
        reader.shards("holdout")
    (shard_copy / reader.manifest.shards[0].path).unlink()
    with pytest.raises(ShardFormatError, match="shard listed in the manifest is missing"):
        reader.shards(reader.manifest.shards[0].split)


# ------------------------------------------------------------------------------------ in a store
def upload(root: Path, url: str) -> None:
    base = S3Url.parse(url)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not rel.parts[0].startswith("_"):
            store.upload_file(path, base.join(rel.as_posix()))


@pytest.mark.s3
def test_a_store_root_reads_as_the_local_copy(shard_root, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/sets/world"
    upload(shard_root, url)
    local, remote = ShardReader(shard_root), ShardReader(url + "/", cache_root=str(tmp_path / "cache"))
    assert remote.root == url and remote.meta.is_relative_to((tmp_path / "cache").resolve())
    assert remote.class_mapping() == local.class_mapping()
    for here, there in zip(local.shards("val"), remote.shards("val"), strict=True):
        assert there.path == f"{url}/{here.rel}" and (there.bytes, there.sha256) == (here.bytes, here.sha256)
        assert list(remote.samples(there)) == list(local.samples(here))
        size, etag = tar_stamp(there.path)
        with remote.scan(there, size) as tar, local.scan(here, size) as mine:
            assert [get(c["json"]) for c, get in tar] == [get(c["json"]) for c, get in mine]
            assert tar.sha256() == here.sha256
        assert remote.table(there, size, etag) is None  # none published beside this tar
    # the publisher's table counts only while it names the tar's current sha256, size and ETag
    shard = remote.shards("val")[0]
    size, etag = tar_stamp(shard.path)
    rows = sample_rows(Path(local.shards("val")[0].path), shard.sha256)
    store.write_bytes(S3Url.parse(table_name(str(shard.path))), table_bytes(rows, size, shard.sha256, etag))
    assert remote.table(shard, size, etag) == rows
    assert remote.table(shard, size, '"another-etag"') is None


@pytest.mark.s3
def test_store_errors_name_the_store_not_the_mirror(shard_root, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/sets/partial"
    with pytest.raises(RemoteShardError, match=f"no manifest.json at {url}: not a shard root"):
        ShardReader(url, cache_root=str(tmp_path))
    for name in ("manifest.json", "class_mapping.json"):
        store.upload_file(shard_root / name, S3Url.parse(url).join(name))
    reader = ShardReader(url, cache_root=str(tmp_path))
    with pytest.raises(ShardFormatError) as err:
        reader.shards("holdout")
    assert f"has no shards in {url} " in str(err.value) and str(tmp_path) not in str(err.value)
    with pytest.raises(ShardFormatError, match=f"{url}/class_mapping_eu_sw.json is missing"):
        reader.class_mapping("EU_SW")
    with pytest.raises(RemoteShardError, match=r"no index s3://.*\.idx beside its tar"):
        list(reader.samples(reader.shards("val")[0]))
