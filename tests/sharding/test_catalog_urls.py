"""Image URLs as people write them: spaces, raw non-ASCII paths and queries, internationalised and
odd hosts are normalised as a browser reads them (WHATWG URL), before dedup; what is really malformed
is still ``bad_url``; an already normal URL is unchanged, so catalogs written before keep their keys
and splits, including a catalog that kept non-ASCII URLs raw."""

import hashlib
import json
from pathlib import Path

import pytest

from flora.config import load_config
from flora.io import read_jsonl
from flora.sharding.__main__ import main
from flora.sharding.catalog.records import RecordError, normalize_url, url_key
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from world import WorldSpec, generate_catalog

NORMALISED = [
    # spaces and raw non-ASCII: percent-encoded as UTF-8 (path set in the path, special-query set after ?)
    ("http://example.com/a b.jpg", "http://example.com/a%20b.jpg"),
    ("HTTP://Example.COM:80/a b", "http://example.com/a%20b"),
    ("http://example.com/flores/café.jpg", "http://example.com/flores/caf%C3%A9.jpg"),
    ("http://example.com/植物/1.jpg", "http://example.com/%E6%A4%8D%E7%89%A9/1.jpg"),
    ("http://example.com/x?name=Rosa canina&k=ü", "http://example.com/x?k=%C3%BC&name=Rosa%20canina"),
    ('http://example.com/a"b<c>d`e{f}g^h|i', "http://example.com/a%22b%3Cc%3Ed%60e%7Bf%7Dg%5Eh|i"),
    (
        "http://example.com/p?a='b'&c=\"d\"&e=<f>&g=`{}",
        "http://example.com/p?a=%27b%27&c=%22d%22&e=%3Cf%3E&g=`{}",
    ),
    # existing escapes are kept as written (not double-encoded), a lone % too, as a browser keeps it
    ("http://example.com/a%20b/caf%C3%A9.jpg", "http://example.com/a%20b/caf%C3%A9.jpg"),
    ("http://example.com/a%7eb%2f?q=%zz", "http://example.com/a%7eb%2f?q=%zz"),
    ("http://example.com/100%/x y%", "http://example.com/100%/x%20y%"),
    # hosts: case, IDNA (UTS #46 mapping, punycode), percent-escapes, IPv4 forms, IPv6
    ("http://bücher.example/x", "http://xn--bcher-kva.example/x"),
    ("http://BÜCHER.Example/x", "http://xn--bcher-kva.example/x"),
    ("http://XN--BCHER-KVA.example/x", "http://xn--bcher-kva.example/x"),
    ("http://bücher。example/x", "http://xn--bcher-kva.example/x"),
    ("http://ｅｘａｍｐｌｅ.com/x", "http://example.com/x"),
    ("http://faß.de/x", "http://xn--fa-hia.de/x"),
    ("http://ex%41mple.com/x", "http://example.com/x"),
    ("http://img_cdn.bücher.example/x", "http://img_cdn.xn--bcher-kva.example/x"),
    ("http://0x7f.1/x", "http://127.0.0.1/x"),
    ("http://2130706433/x", "http://127.0.0.1/x"),
    ("http://[2001:DB8:0:0:1:0:0:1]:8080/x", "http://[2001:db8::1:0:0:1]:8080/x"),
    ("http://[::ffff:1.2.3.4]/x", "http://[::ffff:102:304]/x"),
    # default ports, fragments, dot segments, backslashes, empty path and query
    ("https://example.com:443/a/./b/../c.jpg#top", "https://example.com/a/c.jpg"),
    ("http://example.com/a/%2E%2e/b.jpg", "http://example.com/b.jpg"),
    ("http:\\\\example.com\\a\\b.jpg?x=\\", "http://example.com/a/b.jpg?x=\\"),
    ("http://example.com?", "http://example.com/"),
    ("http://example.com:/x", "http://example.com/x"),
]

ALREADY_NORMAL = [
    "http://example.org/a/B.jpg",
    "https://static.inaturalist.org/photos/123/medium.jpg?1545",
    "http://127.0.0.1:8765/img/0001.jpg",
    "https://example.org:8443/a.jpg",
    "http://[::1]:8080/x",
    "http://example.org/a.jpg?v=2&w=5",
    "http://example.org/a%20b%7e/caf%C3%A9.jpg",
    "http://example.org/100%",
    "http://my_cdn.example.org/x",
    "http://example.org/a;b,c!$&'()*+=:@|[]~/x",
    "http://example.org/?q=%3D&q=a+b",
    "http://example.org./x",
    "http://xn--bcher-kva.example/x",
]

REFUSED = [
    ("ftp://example.com/a.jpg", "bad_scheme"),
    ("not available", "bad_scheme"),
    ("http:///a.jpg", "bad_url"),  # no host
    ("http:/example.com/a.jpg", "bad_url"),
    ("http://exa mple.com/a.jpg", "bad_url"),  # a space in the host
    ("http://exa<mple.com/a.jpg", "bad_url"),
    ("http://h%zz/a.jpg", "bad_url"),
    ("http://h%C3/a.jpg", "bad_url"),  # a percent-escaped host that is not UTF-8
    ("http://xn--zz.example/a.jpg", "bad_url"),  # bad punycode
    ("http://a\u200db.example/a.jpg", "bad_url"),  # a joiner out of context
    ("http://-bücher.example/a.jpg", "bad_url"),  # hyphen at the start of an IDN label
    ("http://☃.net/a.jpg", "bad_url"),  # a symbol: UTS #46 allows it, IDNA 2008 does not
    ("http://1.2.3.4.5/a.jpg", "bad_url"),
    ("http://999.1.1.1/a.jpg", "bad_url"),
    ("http://1.2.3.09/a.jpg", "bad_url"),
    ("http://[fe80::1%25eth0]/a.jpg", "bad_url"),  # a zone identifier
    ("http://[1:2:3]/a.jpg", "bad_url"),
    ("http://user:secret@example.com/a.jpg", "bad_url"),
    ("http://example.com:99999/a.jpg", "bad_url"),
    ("http://example.com/a\tb.jpg", "bad_url"),  # control characters: a corrupt field, not a URL
    ("http://example.com/a\nb.jpg", "bad_url"),
    ("http://example.com/a\x00b.jpg", "bad_url"),
    ("http://example.com/a\x85b.jpg", "bad_url"),
    ("http://example.com/\ud800.jpg", "bad_url"),  # a lone surrogate from a JSON escape
    ("http://example.com/" + "a" * 5000, "bad_url"),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_urls_are_normalised_as_a_browser_reads_them(raw, expected):
    assert normalize_url(raw) == expected
    assert normalize_url(expected) == expected  # the normal form is a fixed point


@pytest.mark.parametrize("url", ALREADY_NORMAL)
def test_an_already_normal_url_is_unchanged(url):
    assert normalize_url(url) == url


@pytest.mark.parametrize(("raw", "reason"), REFUSED)
def test_malformed_urls_are_still_refused(raw, reason):
    with pytest.raises(RecordError) as info:
        normalize_url(raw)
    assert info.value.reason == reason
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


def test_the_world_s_urls_are_fixed_points():
    """Every URL the sample world writes (the shape of real exports) normalises in one step."""
    records = generate_catalog(WorldSpec(n_records=3000, n_species=60, seed=11), "http://127.0.0.1:9")
    accepted = 0
    for record in records:
        try:
            url = normalize_url(record.get("image_url") or "")
        except RecordError:
            continue
        accepted += 1
        assert normalize_url(url) == url
        assert url.isascii() and " " not in url
    assert accepted > 2000


def rec(i, url, name="Olea europaea"):
    return {"plant_id": i, "latin_name": name, "image_url": url, "license": "cc-by"}


def test_spellings_of_one_url_are_one_image(tmp_path):
    lines = [
        rec(1, "HTTP://Example.COM:80/a b"),
        rec(2, "http://example.com/a%20b"),
        rec(3, "http://bücher.example/x"),
        rec(4, "http://xn--bcher-kva.example/x"),
        rec(5, "http://example.com/caf%C3%A9.jpg"),
        rec(6, "http://example.com/café.jpg"),
        rec(7, "http://example.com/%7euser/a.jpg"),
        rec(8, "http://example.com/~user/a.jpg"),
        rec(9, "http://exa mple.com/a.jpg"),
        rec(10, "http://xn--zz.example/a.jpg"),
    ]
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    stats = run_catalog(
        str(source), tmp_path / "out", load_config(CatalogConfig, None, ["progress=false"])
    ).stats
    assert (stats["written"], stats["duplicates"], stats["rejected"]) == (4, 4, 2)
    assert stats["rejects_by_reason"] == {"bad_url": 2}
    rows = read_jsonl(tmp_path / "out" / "dataset_splits.jsonl")
    urls = sorted(row["image_url"] for row in rows)
    assert urls == [
        "http://example.com/%7euser/a.jpg",
        "http://example.com/a%20b",
        "http://example.com/caf%C3%A9.jpg",
        "http://xn--bcher-kva.example/x",
    ]
    raw = {row["meta"]["image_url_raw"] for row in rows if "image_url_raw" in row["meta"]}
    duplicates = read_jsonl(tmp_path / "out" / "duplicates.jsonl")
    raw |= {d["record"]["meta"].get("image_url_raw") for d in duplicates} - {None}
    assert {"HTTP://Example.COM:80/a b", "http://bücher.example/x", "http://example.com/café.jpg"} <= raw


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_catalog_that_kept_urls_raw_keeps_its_splits(tmp_path):
    """A catalog written when non-ASCII URLs were kept as they came (``http://bücher.example/é``) is a
    valid ``--previous``: each of its images keeps its split although this version writes the URL
    percent-encoded with a punycode host; a URL refused then (a space) is a new image now."""
    names = ["Olea europaea", "Abies alba", "Pinus pinea"]
    plain = [rec(i, f"http://example.com/{i}.jpg", names[i % 3]) for i in range(30)]
    raw = [
        rec(100 + i, url, names[i % 3])
        for i, url in enumerate(
            ["http://bücher.example/é.jpg", "http://example.com/植物/1.jpg", "http://example.com/x?k=ü"]
        )
    ]
    v1 = tmp_path / "v1"
    assert (
        main(["catalog", "--source", str(write(tmp_path / "v1.jsonl", plain + raw)), "--out", str(v1)]) == 0
    )
    # what an older Flora wrote: the same rows with the raw URL, and the fingerprint of those bytes
    rows = read_jsonl(v1 / "dataset_splits.jsonl")
    for row in rows:
        row["image_url"] = row["meta"].pop("image_url_raw", row["image_url"])
    assert {r["image_url"] for r in rows} >= {r["image_url"] for r in raw}
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    (v1 / "dataset_splits.jsonl").write_bytes(data)
    version = json.loads((v1 / "catalog_version.json").read_text())
    version["fingerprint"] = version["lineage"][-1] = f"sha256:{hashlib.sha256(data).hexdigest()}"
    (v1 / "catalog_version.json").write_text(json.dumps(version))

    spaced = rec(200, "http://example.com/with space.jpg", "Olea europaea")  # bad_url in that older version
    v2 = tmp_path / "v2"
    source = write(tmp_path / "v2.jsonl", plain + raw + [spaced])
    assert main(["catalog", "--source", str(source), "--out", str(v2), "--previous", str(v1)]) == 0
    growth = json.loads((v2 / "split_analysis.json").read_text())["growth"]
    assert (growth["kept"], growth["moved"], growth["removed"], growth["new"]) == (len(rows), 0, 0, 1)
    assert read_jsonl(v2 / "split_changes.jsonl") == []
    before = {url_key(normalize_url(r["image_url"])): r["split"] for r in rows}
    after = {url_key(r["image_url"]): r["split"] for r in read_jsonl(v2 / "dataset_splits.jsonl")}
    assert {k: after[k] for k in before} == before
    assert "example.com/with%20space.jpg" in after
    for row in rows:  # the plain URLs are written as the older version wrote them
        if row["image_url"].isascii():
            assert url_key(row["image_url"]) in after
