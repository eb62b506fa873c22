"""Opting out by ``X-Robots-Tag`` (download/optout.py): the header read as img2dataset reads it (comma
lists, user-agent tokens), the fetcher failing such responses as ``opted_out`` against the real loopback
server (which sends the header for chosen files or folders), and builds over a world of our own: the
opted-out images are failures (``failures.jsonl``, ``failures_by_reason``), never in the tars nor in
ATTRIBUTION.csv; with ``download.opt_out_directives=[]`` they are sharded; the image cache never lets a
response that opted out be sharded by a build that honours the header, and never keeps one that
ignores it from fetching the image."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from flora.config import ConfigError, load_config
from flora.io import read_jsonl
from flora.sharding.build.plan import image_fingerprint
from flora.sharding.build.run import build
from flora.sharding.cache.image_cache import ImageCache
from flora.sharding.catalog.records import url_key
from flora.sharding.catalog.run import run_catalog
from flora.sharding.config import CatalogConfig
from flora.sharding.download.fetch import DownloadConfig, Downloader
from flora.sharding.download.optout import addressed, agent_token, opted_out
from flora.sharding.format.schema import safe_key
from world import ImageServer, WorldSpec, build_world

from .build_settings import LOOPBACK, config
from .test_incremental import tar_keys

AGENT = "flora-sharder"
DEFAULT = ["noai", "noimageai"]
#: Header values given to chosen files of the world: opted out (True) or not (False) under the default.
HEADERS = {
    "noai": True,
    "noindex, NoImageAI": True,
    "flora-sharder: noai": True,
    "otherbot: noai": False,
    "noindex, nofollow": False,
}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], ["noai"]),
        (["noindex, noimageai"], ["noimageai"]),
        ([" NOAI ,noindex"], ["noai"]),
        (["otherbot: noai"], []),  # someone else's
        (["otherbot: noindex", "noimageai"], ["noimageai"]),  # header values are separate
        (["otherbot: noindex, flora-sharder: noai"], ["noai"]),  # a token holds until the next
        (["Flora-Sharder: noai, noimageai"], ["noai", "noimageai"]),
        (["*: noai"], ["noai"]),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], ["noai"]),  # a valued directive
        (["noindex", "nofollow"], []),
        ([], []),
    ],
)
def test_header_values_are_read_as_img2dataset_reads_them(values, expected):
    assert opted_out(values, DEFAULT, AGENT) == expected
    assert opted_out(values, [], AGENT) == [], "an empty list ignores the header"


def test_our_token_is_the_user_agents_product_name():
    assert agent_token(DownloadConfig().user_agent) == AGENT
    assert agent_token("MyBot/2.0 (+https://x.invalid)") == "mybot"
    assert addressed(["mybot: noai"], "mybot") == {"noai"}


def test_the_directives_setting_is_checked_in_one_line():
    assert load_config(DownloadConfig, None, []).opt_out_directives == DEFAULT
    assert load_config(DownloadConfig, None, ["opt_out_directives=[NoAI]"]).opt_out_directives == ["noai"]
    for bad in ("opt_out_directives=noai", "opt_out_directives=['no ai']", "opt_out_directives=[1]"):
        with pytest.raises(ConfigError, match="opt_out_directives"):
            load_config(DownloadConfig, None, [bad])


def test_the_fetcher_refuses_opted_out_responses_of_the_real_server(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.jpg", "a/2.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff\xe0 not decoded here")
    with ImageServer(tmp_path) as server:
        server.set_headers("/a/", {"X-Robots-Tag": "noimageai"})  # a whole folder
        server.set_headers("/b.jpg", {"X-Robots-Tag": "otherbot: noai"})
        cfg = DownloadConfig(allow_networks=[LOOPBACK], retries=0)
        with Downloader(cfg) as dl:
            for name in ("a/1.jpg", "a/2.jpg"):
                got = dl.fetch(server.url(name))
                assert (got.ok, got.reason, got.data, got.robots) == (
                    False,
                    "opted_out",
                    None,
                    ("noimageai",),
                )
                assert "noimageai" in got.message and got.attempts == 1, "an answer, not retried"
            got = dl.fetch(server.url("b.jpg"))
            assert got.ok and got.robots == ("otherbot: noai",)
            got = dl.fetch(server.url("c.jpg"))
            assert got.ok and got.robots == ()
        with Downloader(DownloadConfig(allow_networks=[LOOPBACK], opt_out_directives=[])) as dl:
            got = dl.fetch(server.url("a/1.jpg"))
            assert got.ok and got.data.startswith(b"\xff\xd8") and got.robots == ("noimageai",)
        server.set_headers("/a/", {})
        with Downloader(cfg) as dl:
            assert dl.fetch(server.url("a/1.jpg")).ok, "the header removed, the folder is served plainly"


@pytest.fixture(scope="module")
def opted(tmp_path_factory):
    """A world of our own whose server sends ``HEADERS`` with five of its images."""
    root = tmp_path_factory.mktemp("opt-out")
    (root / "world" / "images").mkdir(parents=True)
    server = ImageServer(root / "world" / "images")
    spec = WorldSpec(n_records=60, n_species=4, seed=9, fault_rate=0.0, duplicate_rate=0.0, invalid_rate=0.0)
    w = build_world(root / "world", spec, base_url=server.base_url)
    cat = load_config(CatalogConfig, None, ["progress=false"])
    run_catalog(str(w.catalog_path), root / "splits", cat)
    rows = read_jsonl(root / "splits" / "dataset_splits.jsonl")
    chosen = dict(zip(HEADERS, (r["image_url"] for r in rows[::7]), strict=False))
    for value, url in chosen.items():
        server.set_headers(urlsplit(url).path, {"X-Robots-Tag": value})
    with server:
        yield SimpleNamespace(root=root, server=server, splits=root / "splits", rows=rows, chosen=chosen)


def failures(out: Path) -> dict[str, str]:
    return {f["image_url"]: f["reason"] for f in read_jsonl(out / "failures.jsonl")}


def credited(out: Path) -> set[str]:
    lines = (out / "ATTRIBUTION.csv").read_text(encoding="utf-8").splitlines()[1:]
    return {line.split(",", 1)[0] for line in lines}


def key(url: str) -> str:
    return safe_key(url_key(url))


def test_opted_out_images_are_failures_never_samples_and_ignoring_the_header_shards_them(opted):
    out_urls = {url for value, url in opted.chosen.items() if HEADERS[value]}
    kept_urls = set(opted.chosen.values()) - out_urls
    cache = opted.root / "cache"
    manifest = build(opted.splits, opted.root / "default", config(cache))
    got = failures(opted.root / "default")
    assert {u for u, r in got.items() if r == "opted_out"} == out_urls
    assert manifest["failures_by_reason"]["opted_out"] == len(out_urls) == 3
    assert manifest["accounting"]["ok"] and manifest["accounting"]["sharded"] == len(opted.rows) - 3
    keys = tar_keys(opted.root / "default")
    assert not {key(u) for u in out_urls} & keys and {key(u) for u in kept_urls} <= keys
    assert credited(opted.root / "default") == keys

    before = {u: opted.server.request_count(urlsplit(u).path) for u in out_urls}
    ignoring = build(opted.splits, opted.root / "ignoring", config(cache, "download.opt_out_directives=[]"))
    assert "opted_out" not in ignoring["failures_by_reason"] and ignoring["accounting"]["sharded"] == len(
        opted.rows
    )
    assert (
        {key(u) for u in out_urls} <= tar_keys(opted.root / "ignoring") == credited(opted.root / "ignoring")
    )
    assert all(opted.server.request_count(urlsplit(u).path) == before[u] + 1 for u in out_urls), (
        "the cached refusals are not reused by a build that ignores the header: fetched again"
    )

    # the cache now holds those images, with their header: a build that honours it still refuses them
    again = build(opted.splits, opted.root / "again", config(cache))
    assert {u for u, r in failures(opted.root / "again").items() if r == "opted_out"} == out_urls
    assert all(opted.server.request_count(urlsplit(u).path) == before[u] + 1 for u in out_urls), (
        "decided from the cached header, without a request"
    )
    assert tar_keys(opted.root / "again") == keys
    shards = {s["path"]: s["sha256"] for s in manifest["shards"]}
    assert {s["path"]: s["sha256"] for s in again["shards"]} == shards, "the same shards, byte for byte"


def test_a_retry_round_that_ignores_the_header_shards_them_in_place(opted):
    out = opted.root / "retried"
    cache = opted.root / "cache-retry"
    first = build(opted.splits, out, config(cache))
    assert first["failures_by_reason"] == {"opted_out": 3}
    retried = build(opted.splits, out, config(cache, "download.opt_out_directives=[]"), retry_failed=True)
    assert retried["failures_by_reason"] == {} and retried["accounting"]["sharded"] == len(opted.rows)
    assert json.loads((out / "manifest.json").read_text())["attribution"]["rows"] == len(opted.rows)
    assert credited(out) == tar_keys(out)


def test_an_image_cached_before_headers_were_kept_is_fetched_again_and_judged(opted):
    """A cache filled before responses' X-Robots-Tag values were stored (entries without ``robots``)
    cannot say whether the host opts out: a build that honours the header fetches those images again
    rather than shard them from the cache."""
    out_urls = {url for value, url in opted.chosen.items() if HEADERS[value]}
    cache = opted.root / "cache-old"
    build(opted.splits, opted.root / "old-fill", config(cache, "download.opt_out_directives=[]"))
    cfg = config(cache)
    prefix = image_fingerprint(cfg.images)
    store = ImageCache(cache, cfg.cache.max_bytes)
    try:
        for url in out_urls:  # as an older Flora wrote them: no robots
            entry = store.get(f"{prefix}|{url}")
            assert entry is not None and entry.meta["robots"]
            store.put(f"{prefix}|{url}", entry.data, {k: v for k, v in entry.meta.items() if k != "robots"})
    finally:
        store.close()
    before = {u: opted.server.request_count(urlsplit(u).path) for u in out_urls}
    build(opted.splits, opted.root / "old-default", cfg)
    assert {u for u, r in failures(opted.root / "old-default").items() if r == "opted_out"} == out_urls
    assert all(opted.server.request_count(urlsplit(u).path) == before[u] + 1 for u in out_urls)
    assert not {key(u) for u in out_urls} & tar_keys(opted.root / "old-default")
