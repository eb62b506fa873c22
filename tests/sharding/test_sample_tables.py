"""Sample tables (sharding/format/schema.py): what the publisher puts beside each tar in a store so readers
need no scan. A table's rows are exactly what the loaders' own scan finds in the tar; a tar that is
not the manifest's, or holds a damaged sample, gets no table; anything but a table is refused."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from flora.loaders.index import scan_shard
from flora.sharding.format.reader import Shard, ShardReader
from flora.sharding.format.schema import ShardFormatError, read_table, sample_rows, table_bytes, table_name


def manifest_shards(root):
    return json.loads((root / "manifest.json").read_text())["shards"]


def test_table_rows_are_what_the_loaders_scan_finds(shard_root):
    shards = manifest_shards(shard_root)
    assert shards
    reader = ShardReader(shard_root)
    for entry in shards:
        path = shard_root / entry["path"]
        shard = Shard(path, entry["path"], entry["split"], entry["region"], entry["bytes"], entry["sha256"])
        scanned, _ = scan_shard(shard, "full", None, reader)
        rows = sample_rows(path, entry["sha256"])
        assert rows == [[r.key, r.label, r.jpg_offset, r.jpg_size, r.license_class, r.latin_name, r.sha256]
                        for r in scanned]  # fmt: skip
        assert all(r.problem is None for r in scanned)
        table = read_table(table_bytes(rows, entry["bytes"], entry["sha256"], '"abc-2"'))
        assert table["rows"] == rows and table["tar_etag"] == "abc-2" and table["tar_bytes"] == entry["bytes"]
    assert table_name("train/EU/train-EU-000001.tar") == "train/EU/train-EU-000001.samples.json"


def test_no_table_for_a_tar_that_is_not_the_manifests_or_is_damaged(shard_root, tmp_path):
    entry = manifest_shards(shard_root)[0]
    tar = tmp_path / "t.tar"
    shutil.copy(shard_root / entry["path"], tar)
    shutil.copy((shard_root / entry["path"]).with_suffix(".idx"), tar.with_suffix(".idx"))
    assert sample_rows(tar, entry["sha256"]) is not None
    assert sample_rows(tar, "0" * 64) is None, "another tar than the manifest's"
    rows = sample_rows(tar, entry["sha256"])
    data = bytearray(tar.read_bytes())
    data[rows[0][2] + rows[0][3] // 2] ^= 0xFF  # a byte inside the first jpg
    tar.write_bytes(bytes(data))
    assert sample_rows(tar, hashlib.sha256(data).hexdigest()) is None, "a jpg that is not its json's sha256"


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'{"format": "other"}', b'{"format": "flora-sample-table/1", "fields": [], "rows": []}',
     b'{"format": "flora-sample-table/1", "fields": ["key", "label", "jpg_offset", "jpg_size", '
     b'"license_class", "latin_name", "sha256"], "rows": [[1, 2]]}'],
)  # fmt: skip
def test_anything_but_a_table_is_refused(data):
    with pytest.raises(ShardFormatError, match="not a flora-sample-table/1 sample table"):
        read_table(data)
