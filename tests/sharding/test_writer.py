"""Rolling tar parts, reproducible bytes, DALI index files and sample removal."""

import tarfile

import pytest
from wds2idx import IndexCreator

from flora.sharding.format.schema import check_key, index_lines, safe_key, write_index
from flora.sharding.format.writer import RollingTarWriter, Sample, drop_samples


def sample(i, size=1000):
    return Sample(
        key=safe_key(f"h/{i}"),
        jpg=bytes([i % 256]) * size,
        label=i % 3,
        meta={"i": i, "license_class": "permissive"},
    )


def write(tmp_path, n, max_samples=4, max_bytes=10**9, size=1000, name="w"):
    writer = RollingTarWriter(tmp_path / name, "part", max_samples, max_bytes)
    for i in range(n):
        writer.write(sample(i, size))
    return writer.close()


def test_rolls_at_count_and_at_bytes(tmp_path):
    parts = write(tmp_path, 10, max_samples=4)
    assert [p.samples for p in parts] == [4, 4, 2]
    parts = write(tmp_path, 5, max_samples=100, max_bytes=2500, name="b")
    assert [p.samples for p in parts] == [2, 2, 1]
    one = write(
        tmp_path, 1, max_samples=100, max_bytes=10, name="c"
    )  # a sample larger than the cap still goes
    assert [p.samples for p in one] == [1]
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_samples_same_bytes_and_sha(tmp_path):
    a = write(tmp_path, 7, name="a")
    b = write(tmp_path, 7, name="b")
    for pa, pb in zip(a, b, strict=True):
        assert pa.path.read_bytes() == pb.path.read_bytes() and pa.sha256 == pb.sha256
        import hashlib

        assert hashlib.sha256(pa.path.read_bytes()).hexdigest() == pa.sha256


def test_index_matches_dalis_wds2idx(tmp_path):
    (part,) = write(tmp_path, 3, max_samples=10)
    assert part.index == index_lines(part.path), "offsets recorded while writing match the headers"
    ours = write_index(part.path, part.index).read_text()
    with IndexCreator(str(part.path), str(tmp_path / "ref.idx"), verbose=False) as creator:
        creator.create_index()
    assert ours == (tmp_path / "ref.idx").read_text()
    assert ours.splitlines()[0] == "v1.2 3"


def test_drop_samples_rewrites_the_shard(tmp_path):
    (part,) = write(tmp_path, 4, max_samples=10)
    gone = {safe_key("h/1"), safe_key("h/3")}
    assert drop_samples(part.path, gone) == 2
    with tarfile.open(part.path) as tar:
        stems = {m.name.split(".")[0] for m in tar}
    assert stems == {safe_key("h/0"), safe_key("h/2")}
    write_index(part.path)


def test_unsafe_keys_are_refused(tmp_path):
    for bad in ["../x", "a/b", "a.b", "", "x\n", "é"]:
        with pytest.raises(ValueError, match="unsafe sample key"):
            check_key(bad)
    writer = RollingTarWriter(tmp_path, "p", 10, 10**6)
    with pytest.raises(ValueError):
        writer.write(Sample(key="../../etc", jpg=b"x", label=0, meta={}))
    writer.abort()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.tar"))


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    (part,) = write(tmp_path, 5, max_samples=10)
    samples = list(wds.WebDataset(str(part.path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [safe_key(f"h/{i}") for i in range(5)]
    assert [int(s["cls"]) for s in samples] == [i % 3 for i in range(5)]
    assert all(set(s) >= {"jpg", "json", "cls"} for s in samples)


@pytest.mark.parametrize(
    ("name", "size"), [("a.jpg", 0), (f"{'k' * 24}.json", 1), (f"{'x' * 90}.json", 123456789)]
)
def test_our_headers_are_the_bytes_tarfile_writes(name, size):
    from flora.sharding.format.writer import TAR_MODE, TAR_MTIME, TAR_OWNER, tar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uname = info.gname = TAR_OWNER
    assert tar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_a_whole_part_is_the_tar_tarfile_writes(tmp_path):
    import io

    from flora.sharding.format.writer import TAR_MODE, TAR_MTIME, TAR_OWNER

    (part,) = write(tmp_path, 3, max_samples=10, size=700)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|") as tar:
        for i in range(3):
            for name, data in sample(i, 700).members():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
                info.uname = info.gname = TAR_OWNER
                tar.addfile(info, io.BytesIO(data))
    assert part.path.read_bytes() == buf.getvalue()
