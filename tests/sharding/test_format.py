"""The shard format module: what the sharder publishes is what the readers parse, through one owner."""

import json
import tarfile

import pytest

from flora.sharding.format import schema as fmt


def test_published_shards_follow_the_format(shard_root):
    manifest = fmt.read_manifest(shard_root)
    assert manifest.shards and set(manifest.splits()) >= {"train", "val"}
    for entry in manifest.shards:
        index = int(entry.path.rsplit("-", 1)[1][:-4])
        assert entry.path == fmt.shard_name(entry.split, entry.region, index)
        tar = manifest.path(entry)
        samples = fmt.read_index(tar)
        assert len(samples) == entry.samples
        assert all(set(s) == set(fmt.MEMBERS) for s in samples)
        assert fmt.index_lines(tar) == tar.with_suffix(".idx").read_text().splitlines()[1:]
    entry = manifest.shards[0]
    tar = manifest.path(entry)
    with tarfile.open(tar) as t:
        names = [m.name for m in t.getmembers()]
        meta = fmt.SampleMeta.from_json(t.extractfile(names[2]).read())
    assert [n.split(".", 1)[1] for n in names[:3]] == list(fmt.MEMBERS)
    assert fmt.check_key(names[0].split(".")[0])
    assert meta.split == entry.split and meta.region == entry.region
    assert meta.license_class in fmt.LICENSE_CLASSES and len(meta.sha256) == 64
    assert meta.label in entry.classes and meta.width and meta.height
    mapping = fmt.read_class_mapping(shard_root)
    assert meta.label == mapping[meta.latin_name]


def test_selection_errors_name_what_exists(shard_root):
    manifest = fmt.read_manifest(shard_root)
    with pytest.raises(
        fmt.ShardFormatError, match=r"split 'holdout' has no shards .* \(splits with shards: \["
    ):
        manifest.select("holdout")
    with pytest.raises(fmt.ShardFormatError, match="unknown region 'ATLANTIS'"):
        manifest.select("train", ["ATLANTIS"])
    assert {s.region for s in manifest.select("train", [manifest.regions()[0]])} == {manifest.regions()[0]}


def test_broken_roots_are_clear(tmp_path, shard_copy):
    with pytest.raises(fmt.ShardFormatError, match="no manifest.json in"):
        fmt.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(fmt.ShardFormatError, match="not a shard manifest"):
        fmt.read_manifest(tmp_path)
    manifest = fmt.read_manifest(shard_copy)
    entry = manifest.shards[0]
    (shard_copy / entry.path).unlink()
    with pytest.raises(fmt.ShardFormatError, match="shard listed in the manifest is missing"):
        manifest.path(entry)
    idx = shard_copy / manifest.shards[1].path.replace(".tar", ".idx")
    idx.write_text("v9 3\n")
    with pytest.raises(fmt.ShardFormatError, match="expected a 'v1.2 <samples>' header"):
        fmt.read_index(shard_copy / manifest.shards[1].path)
    (shard_copy / "class_mapping.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(fmt.ShardFormatError, match="without gaps"):
        fmt.read_class_mapping(shard_copy)


def test_sample_meta_from_a_record_and_back():
    record = {"plant_id": 7, "latin_name": "Quercus ilex", "image_url": "http://x/1.jpg", "license": "CC0",
              "license_class": "permissive", "source": "s", "country": "ES", "region": "EU_SW",
              "split": "train", "not_a_sample_field": 1}  # fmt: skip
    image = {"sha256": "ab" * 32, "width": 10, "height": 8, "original_width": 20, "original_height": 16,
             "original_format": "PNG"}  # fmt: skip
    meta = fmt.SampleMeta.from_record(record, 3, image)
    data = meta.as_json()
    assert "not_a_sample_field" not in data and data["label"] == 3 and data["original_format"] == "PNG"
    assert fmt.SampleMeta.from_json(json.dumps({**data, "a_newer_field": 1})) == meta
    with pytest.raises(fmt.ShardFormatError, match="must be an object"):
        fmt.SampleMeta.from_json("[1, 2]")


def test_license_classes_have_one_owner():
    from flora.loaders import index
    from flora.sharding.catalog import licenses

    assert licenses.PERMISSIVE is fmt.PERMISSIVE and index.PERMISSIVE is fmt.PERMISSIVE
