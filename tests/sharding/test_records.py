"""Record validation and the two normalisations identity depends on (URL and Latin name)."""

import pytest

from flora.sharding.catalog.records import (
    RecordError,
    normalize_latin_name,
    normalize_url,
    put_meta,
    url_key,
    validate,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://Example.ORG/a/B.jpg", "http://example.org/a/B.jpg"),
        ("HTTP://example.org:80/a.jpg", "http://example.org/a.jpg"),
        ("https://example.org:443/a.jpg#frag", "https://example.org/a.jpg"),
        ("https://example.org:8443/a.jpg", "https://example.org:8443/a.jpg"),
        ("http://example.org/a.jpg?w=5&v=2", "http://example.org/a.jpg?v=2&w=5"),
        ("http://example.org", "http://example.org/"),
        ("  http://example.org/x  ", "http://example.org/x"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ],
)
def test_normalize_url(raw, expected):
    assert normalize_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("ftp://example.org/a.jpg", "bad_scheme"),
        ("javascript:alert(1)", "bad_scheme"),
        ("example.org/a.jpg", "bad_scheme"),
        ("", "bad_url"),
        ("http:///a.jpg", "bad_url"),
        ("http://exa mple.org/a.jpg", "bad_url"),
        ("http://example.org:99999/a.jpg", "bad_url"),
        ("http://user:secret@example.org/a.jpg", "bad_url"),
        ("http://example.org/\x00", "bad_url"),
    ],
)
def test_bad_urls_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(RecordError) as info:
        normalize_url(raw)
    assert info.value.reason == reason
    assert "secret" not in str(info.value)


def test_latin_name_normalisation():
    assert normalize_latin_name("  quercus   ILEX ") == "Quercus ilex"
    assert normalize_latin_name("Cistus albidus subsp. Albus") == "Cistus albidus subsp. albus"
    for bad, reason in [
        ("   ", "empty_latin_name"),
        ("1234", "bad_latin_name"),
        ("Q\x07x", "bad_latin_name"),
    ]:
        with pytest.raises(RecordError) as info:
            normalize_latin_name(bad)
        assert info.value.reason == reason


GOOD = {"plant_id": 7, "latin_name": "Olea europaea", "image_url": "http://h/x.jpg", "license": "cc0"}


def test_validate_keeps_extras_in_meta():
    fields, meta = validate({**GOOD, "observer": "ana", "meta": {"quality": "research"}, "country": " ES "})
    assert fields["country"] == "ES" and fields["source"] == "unknown"
    assert meta == {"observer": "ana", "quality": "research"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"latin_name": None}, "missing_field"),
        ({"plant_id": None}, "missing_field"),
        ({"image_url": 5}, "bad_type"),
        ({"latin_name": ["Olea"]}, "bad_type"),
        ({"plant_id": True}, "bad_plant_id"),
        ({"plant_id": 1.5}, "bad_plant_id"),
        ({"plant_id": "  "}, "bad_plant_id"),
        ({"source": 3}, "bad_type"),
        ({"latin_name": " "}, "empty_latin_name"),
    ],
)
def test_validate_rejects(change, reason):
    with pytest.raises(RecordError) as info:
        validate({**GOOD, **change})
    assert info.value.reason == reason


def test_validate_rejects_non_objects():
    with pytest.raises(RecordError) as info:
        validate([1, 2])
    assert info.value.reason == "not_an_object"


def test_whole_float_plant_ids_from_javascript_clients_are_integers():
    fields, _ = validate({**GOOD, "plant_id": 2.0})
    assert fields["plant_id"] == 2 and isinstance(fields["plant_id"], int)


def test_meta_never_loses_a_value_on_a_name_clash():
    _, meta = validate({**GOOD, "meta": {"a": 1, "b": 2}, "a": 3, "b": 2})
    assert meta == {"a": 1, "b": 2, "a#2": 3}
    put_meta(meta, "a", 4)
    assert meta["a#3"] == 4


def test_url_key_is_scheme_free_and_percent_normalised():
    assert url_key("http://h/a%7eb%2f") == url_key("https://h/a~b%2F") == "h/a~b%2F"
