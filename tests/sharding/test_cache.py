"""The LMDB image cache: round trips, LRU order (also across restarts), corruption, map growth, two
processes at once (spawn and fork), threads sharing an instance, and config validation. Real LMDB
environments in tmp_path, no mocks."""

import hashlib
import multiprocessing
import pickle
import struct
import threading
import traceback
import zlib

import lmdb
import pytest

from flora.config import ConfigError, from_dict
from flora.sharding.cache.image_cache import CacheConfig, CacheEntry, ImageCache, encode_record, url_hash

MiB = 2**20
META = {"width": 64, "height": 48, "format": "JPEG", "sha256": "ab" * 32}


def payload(url: str, size: int = 8_000) -> bytes:
    """Deterministic bytes for ``url`` (so two processes store identical data for a shared URL)."""
    seed = hashlib.sha256(url.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def record_size(url: str, size: int = 8_000, meta: dict = META) -> int:
    return len(encode_record(payload(url, size), meta))


def fill(cache: ImageCache, urls, size: int = 8_000) -> None:
    for url in urls:
        assert cache.put(url, payload(url, size), META)


def survivors(cache: ImageCache, urls) -> list[str]:
    return [url for url in urls if cache.contains(url)]


# --------------------------------------------------------------------------------------- basics


def test_round_trip_keeps_bytes_and_meta_and_counts_hits_and_misses(tmp_path):
    with ImageCache(tmp_path / "c", 10 * MiB) as cache:
        data = payload("http://h/a.jpg", 50_000)
        meta = {**META, "original": {"bytes": 123_456, "format": "PNG"}, "tags": ["x", "ü"]}
        assert cache.put("http://h/a.jpg", data, meta)
        entry = cache.get("http://h/a.jpg")
        assert entry == CacheEntry(data=data, meta=meta)
        assert cache.get("http://h/missing.jpg") is None
        assert cache.contains("http://h/a.jpg") and not cache.contains("http://h/missing.jpg")
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["puts"]) == (1, 1, 1)
        assert stats["entries"] == 1
        assert stats["bytes"] == len(encode_record(data, meta))


def test_put_replaces_an_entry_and_delete_removes_it(tmp_path):
    with ImageCache(tmp_path / "c", 10 * MiB) as cache:
        cache.put("u", b"old" * 1000, {"v": 1})
        cache.put("u", b"new", {"v": 2})
        assert cache.get("u") == CacheEntry(b"new", {"v": 2})
        assert cache.stats()["bytes"] == len(encode_record(b"new", {"v": 2}))
        assert cache.put("failed", b"", {"failed": "http_404"})  # the sharder's negative entries
        assert cache.get("failed") == CacheEntry(b"", {"failed": "http_404"})
        assert cache.delete("failed")
        assert cache.delete("u") and not cache.delete("u")
        assert cache.get("u") is None
        assert cache.stats()["bytes"] == 0 and cache.stats()["entries"] == 0


@pytest.mark.parametrize(("touch", "evicted"), [("contains", "a"), ("get", "b")])
def test_get_bumps_recency_and_contains_does_not(tmp_path, touch, evicted):
    cap = 3 * record_size("a")
    with ImageCache(tmp_path / "c", cap, low_water=1.0) as cache:
        fill(cache, ["a", "b", "c"])
        getattr(cache, touch)("a")
        fill(cache, ["d"])
        gone = {"a", "b", "c", "d"} - set(survivors(cache, "abcd"))
        assert gone == {evicted}
        assert cache.stats()["evictions"] == 1


# ------------------------------------------------------------------------------------------ LRU


def test_lru_evicts_least_recently_used_in_batches_and_stays_under_the_cap(tmp_path):
    size = record_size("u0")
    cap = 10 * size
    urls = [f"u{i}" for i in range(40)]
    with ImageCache(tmp_path / "c", cap, low_water=0.5) as cache:
        fill(cache, urls[:10])  # exactly the cap: nothing evicted yet
        assert cache.stats()["evictions"] == 0
        assert cache.get("u0") is not None  # oldest insert, now recently used
        fill(cache, ["u10"])
        # One batch: down to 50% of the cap including the new record -> 4 old ones stay (+ u10).
        assert survivors(cache, urls[:11]) == ["u0", "u7", "u8", "u9", "u10"]
        assert cache.stats()["evictions"] == 6
        for url in urls[11:]:
            fill(cache, [url])
            assert cache.stats()["bytes"] <= cap
        report = cache.verify()
        assert report["corrupt"] == report["inconsistent"] == 0
        assert report["bytes"] == report["bytes_recorded"] == cache.stats()["bytes"]


@pytest.mark.parametrize("recency_batch", [1, 100])
def test_recency_survives_close_and_reopen(tmp_path, recency_batch):
    cap = 3 * record_size("a")
    cache = ImageCache(tmp_path / "c", cap, low_water=1.0, recency_batch=recency_batch)
    fill(cache, ["a", "b", "c"])
    cache.get("b")
    cache.get("a")  # use order now: c, b, a
    cache.close()
    with ImageCache(tmp_path / "c", cap, low_water=1.0) as reopened:
        fill(reopened, ["d"])
        assert survivors(reopened, "abcd") == ["a", "b", "d"]
        fill(reopened, ["e"])
        assert survivors(reopened, "abcde") == ["a", "d", "e"]


def test_entry_larger_than_the_cap_is_refused_without_evicting(tmp_path):
    cap = 4 * record_size("a")
    with ImageCache(tmp_path / "c", cap) as cache:
        fill(cache, ["a", "b", "c"])
        assert not cache.put("huge", payload("huge", cap), META)
        assert survivors(cache, ["a", "b", "c", "huge"]) == ["a", "b", "c"]
        stats = cache.stats()
        assert (stats["too_large_for_cache"], stats["evictions"], stats["puts"]) == (1, 0, 3)


# ----------------------------------------------------------------------------------- corruption


def _lengths_crc(meta: bytes, data: bytes) -> bytes:
    lengths = struct.pack(">IQ", len(meta), len(data))
    return b"FLC1" + zlib.crc32(lengths + meta + data).to_bytes(4, "big") + lengths + meta + data


def _flip_data_byte(record: bytes) -> bytes:
    return record[:-10] + bytes([record[-10] ^ 0x01]) + record[-9:]


CORRUPTIONS = {
    "flipped data byte": _flip_data_byte,
    "truncated header": lambda record: record[:7],
    "truncated data": lambda record: record[:-1],
    "bad magic": lambda record: b"XXXX" + record[4:],
    "unparseable meta, valid checksum": lambda record: _lengths_crc(b"{not json", b"data"),
    "meta not an object, valid checksum": lambda record: _lengths_crc(b"[1,2]", b"data"),
}


@pytest.mark.parametrize("damage", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_a_miss_is_deleted_and_can_be_stored_again(tmp_path, damage):
    path = tmp_path / "c"
    with ImageCache(path, 10 * MiB) as cache:
        fill(cache, ["bad", "good"])
    env = lmdb.open(str(path), max_dbs=4, subdir=True)
    entries = env.open_db(b"entries", create=False)
    with env.begin(write=True) as txn:
        txn.put(url_hash("bad"), damage(txn.get(url_hash("bad"), db=entries)), db=entries)
    env.close()

    with ImageCache(path, 10 * MiB) as cache:
        assert cache.get("bad") is None
        stats = cache.stats()
        assert (stats["corrupt"], stats["misses"], stats["hits"]) == (1, 1, 0)
        assert not cache.contains("bad")
        assert (stats["entries"], stats["bytes"]) == (1, record_size("good"))
        assert cache.get("good") is not None
        fill(cache, ["bad"])
        assert cache.get("bad") == CacheEntry(payload("bad"), META)
        assert cache.verify()["corrupt"] == 0


# -------------------------------------------------------------------------------------- map size


def test_tiny_map_grows_instead_of_failing(tmp_path):
    urls = [f"u{i}" for i in range(120)]
    with ImageCache(tmp_path / "c", 64 * MiB, initial_map_bytes=MiB) as cache:
        fill(cache, urls, size=50_000)  # ~6 MB through a 1 MiB map
        assert cache.stats()["map_grows"] >= 3
        assert all(cache.get(url) is not None for url in urls)
        assert cache.verify()["inconsistent"] == 0


def test_map_at_its_maximum_evicts_instead_of_raising(tmp_path):
    urls = [f"u{i}" for i in range(100)]
    # The cap alone (64 MiB) would never evict; the 2 MiB map limit must.
    with ImageCache(tmp_path / "c", 64 * MiB, initial_map_bytes=MiB, max_map_bytes=2 * MiB) as cache:
        stored = [cache.put(url, payload(url, 50_000), META) for url in urls]
        stats = cache.stats()
        assert stats["puts"] + stats["map_full"] == len(urls)
        assert stats["puts"] >= 90 and stored[-1]
        assert stats["evictions"] > 0 and stats["entries"] < len(urls)
        assert cache.get(urls[-1]) is not None
        report = cache.verify()
        assert report["corrupt"] == report["inconsistent"] == 0


# ------------------------------------------------------------------------------------- processes


def _worker(path, cap, name, n_items, barrier, results):
    try:
        cache = ImageCache(path, cap, initial_map_bytes=MiB, low_water=0.8, recency_batch=4)
        barrier.wait(timeout=60)
        for i in range(n_items):
            for url in (f"{name}/{i}", f"shared/{i % 50}"):
                if not cache.contains(url):
                    assert cache.put(url, payload(url), {"url": url})
                entry = cache.get(url)  # may be gone already: the other process evicts too
                assert entry is None or entry == CacheEntry(payload(url), {"url": url}), url
        stats = cache.stats()
        cache.close()
        results.put((name, None, stats))
    except BaseException:
        results.put((name, traceback.format_exc(), None))


def test_two_processes_share_one_cache_under_eviction(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path, cap = str(tmp_path / "c"), 40 * record_size("a/0")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, cap, name, 200, barrier, results)) for name in "ab"]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [error for _, error, _ in outcomes] == [None, None], outcomes
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert sum(stats["evictions"] for _, _, stats in outcomes) > 0
    assert sum(stats["hits"] for _, _, stats in outcomes) > 0

    with ImageCache(path, cap) as cache:
        report, stats = cache.verify(), cache.stats()
        assert report["corrupt"] == report["inconsistent"] == 0
        assert report["bytes"] == report["bytes_recorded"] == stats["bytes"] <= cap
        assert report["entries"] == stats["entries"] > 0


def _reader(path, urls, ready, grown, results):
    try:
        cache = ImageCache(path, 64 * MiB, initial_map_bytes=MiB)
        assert cache.get(urls[0]) is not None  # the environment is open with a 1 MiB map
        ready.set()
        assert grown.wait(timeout=60)
        hits = sum(cache.get(url) == CacheEntry(payload(url, 50_000), META) for url in urls)
        results.put((hits, cache.stats(), None))
        cache.close()
    except BaseException:
        results.put((0, None, traceback.format_exc()))


def test_reader_adopts_a_map_grown_by_another_process(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    path, urls = str(tmp_path / "c"), [f"u{i}" for i in range(80)]
    ready, grown, results = ctx.Event(), ctx.Event(), ctx.Queue()
    with ImageCache(path, 64 * MiB, initial_map_bytes=MiB) as writer:
        fill(writer, urls[:1], size=50_000)
        proc = ctx.Process(target=_reader, args=(path, urls, ready, grown, results))
        proc.start()
        assert ready.wait(timeout=60)
        fill(writer, urls[1:], size=50_000)  # ~4 MB: the map doubles past the reader's
        assert writer.stats()["map_grows"] >= 2
        grown.set()
        hits, stats, error = results.get(timeout=60)
        proc.join(timeout=60)
    assert error is None, error
    assert hits == len(urls)
    assert stats["map_resized"] >= 1


def _forked_child(cache, parent_env, results):
    try:
        hit = cache.get("parent") == CacheEntry(payload("parent"), META)
        stored = cache.put("child", payload("child"), META)
        own_env = cache._shared.env not in (None, parent_env)  # LMDB itself would not notice sharing
        results.put((hit, stored, own_env, cache.stats(), None))
        cache.close()
    except BaseException:
        results.put((False, False, False, None, traceback.format_exc()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")
def test_forked_child_opens_its_own_environment(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    with ImageCache(tmp_path / "c", 10 * MiB) as cache:
        fill(cache, ["parent"])
        assert cache.get("parent") is not None  # the parent's environment is open across the fork
        parent_env = cache._shared.env
        proc = ctx.Process(target=_forked_child, args=(cache, parent_env, results))
        proc.start()
        hit, stored, own_env, child_stats, error = results.get(timeout=60)
        proc.join(timeout=60)
        assert error is None, error
        assert hit and stored and own_env and proc.exitcode == 0
        assert (child_stats["hits"], child_stats["puts"]) == (1, 1)  # counters start afresh in the child
        assert cache.get("child") == CacheEntry(payload("child"), META)
        assert cache.stats()["hits"] == 2
        assert cache.verify()["inconsistent"] == 0


def test_threads_share_one_instance_while_the_map_grows(tmp_path):
    errors = []
    with ImageCache(tmp_path / "c", 64 * MiB, initial_map_bytes=MiB, recency_batch=3) as cache:

        def work(name):
            try:
                for i in range(40):
                    url = f"{name}/{i}"
                    assert cache.put(url, payload(url, 20_000), META)
                    assert cache.get(url) == CacheEntry(payload(url, 20_000), META)
            except BaseException as exc:  # reported below: an assert in a thread would be lost
                errors.append(repr(exc))

        threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        stats = cache.stats()
        assert (stats["puts"], stats["hits"], stats["entries"]) == (160, 160, 160)
        assert stats["map_grows"] >= 2
        assert cache.verify()["inconsistent"] == 0


def test_pickle_sends_only_the_parameters(tmp_path):
    cache = ImageCache(tmp_path / "c", 10 * MiB, low_water=0.7, recency_batch=3)
    fill(cache, ["a"])
    payload_bytes = pickle.dumps(cache)
    assert b"lmdb" not in payload_bytes.lower()  # no environment, transaction or lock travels
    clone = pickle.loads(payload_bytes)
    assert clone.config == cache.config == CacheConfig(str(tmp_path / "c"), 10 * MiB, 0.7, recency_batch=3)
    assert clone.stats()["puts"] == 0 and clone.get("a") is not None
    cache.close()
    assert clone.get("a") is not None  # one environment per process: the clone keeps it open
    clone.close()


# ---------------------------------------------------------------------------------------- config


def test_from_config_without_path_is_no_cache(tmp_path):
    assert ImageCache.from_config(CacheConfig()) is None
    cache = ImageCache.from_config(CacheConfig(path=str(tmp_path / "c"), max_bytes=MiB, recency_batch=2))
    assert isinstance(cache, ImageCache) and (cache.max_bytes, cache.config.recency_batch) == (MiB, 2)
    cache.close()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"path": ""}, "cache.path"),
        ({"max_bytes": 0}, "cache.max_bytes"),
        ({"low_water": 0.0}, "cache.low_water"),
        ({"low_water": 1.5}, "cache.low_water"),
        ({"initial_map_bytes": 4096}, "cache.initial_map_bytes"),
        ({"max_map_bytes": MiB, "initial_map_bytes": 2 * MiB}, "cache.max_map_bytes"),
        ({"recency_batch": 0}, "cache.recency_batch"),
    ],
)
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(CacheConfig, values)


def test_constructor_rejects_bad_values_by_name(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(tmp_path, -1)
    with pytest.raises(ValueError, match="low_water"):
        ImageCache(tmp_path, MiB, low_water=2)
    with pytest.raises(TypeError, match="meta must be a dict"):
        ImageCache(tmp_path, MiB).put("u", b"x", ["not", "a", "dict"])


def test_put_many_is_one_commit_with_put_semantics(tmp_path):
    cap = 10 * record_size("u0")
    with ImageCache(tmp_path / "c", cap) as cache:
        urls = [f"u{i}" for i in range(15)]
        stored = cache.put_many([(u, payload(u), META) for u in urls] + [("big", b"x" * (cap + 1), META)])
        assert stored == 15
        stats = cache.stats()
        assert stats["bytes"] <= cap and stats["too_large_for_cache"] == 1 and stats["evictions"] > 0
        misses = cache.stats()["misses"]
        assert cache.contains_many(urls + ["nope"]) == {u for u in urls if cache.contains(u)}
        assert cache.stats()["misses"] == misses + 1 + sum(not cache.contains(u) for u in urls)
        assert cache.get("u14").data == payload("u14"), "the newest entries survive"
        assert cache.get("u0") is None, "the oldest are evicted"


def test_put_many_falling_back_counts_an_oversized_item_once(tmp_path, monkeypatch):
    """put_many's fallback (map exhausted) retries only the items that fit: the one too large for
    the cap is counted once, as put_many found it, not again by the single puts."""
    from flora.sharding.cache.lmdb_env import _MapExhausted

    with ImageCache(tmp_path / "c", 64 * 1024) as cache:
        real, calls = ImageCache._write, []

        def exhausted_once(self, fn):
            calls.append(fn)
            if len(calls) == 1:
                raise _MapExhausted("map full (simulated)")
            return real(self, fn)

        monkeypatch.setattr(ImageCache, "_write", exhausted_once)
        items = [("u/big", payload("u/big", 100_000), META), ("u/small", payload("u/small", 1_000), META)]
        assert cache.put_many(items) == 1
        stats = cache.stats()
        assert stats["too_large_for_cache"] == 1 and stats["puts"] == 1 and cache.contains("u/small")
