"""License spellings seen in real exports -> canonical id and class; unknown is restrictive."""

import pytest

from flora.config import ConfigError
from flora.sharding.catalog.licenses import LicenseTable, license_key
from flora.sharding.catalog.run import BUNDLED_CONFIG_DIR


@pytest.fixture
def table():
    return LicenseTable.load(BUNDLED_CONFIG_DIR / "licenses.yaml")


@pytest.mark.parametrize(
    ("raw", "canonical", "cls"),
    [
        ("CC-BY 4.0", "cc-by", "permissive"),
        ("cc-by", "cc-by", "permissive"),
        ("Creative Commons Attribution 4.0 International", "cc-by", "permissive"),
        ("CC BY-SA 3.0", "cc-by-sa", "permissive"),
        ("cc0", "cc0", "permissive"),
        ("CC0 1.0 Universal", "cc0", "permissive"),
        ("http://creativecommons.org/publicdomain/zero/1.0/", "cc0", "permissive"),
        ("https://creativecommons.org/publicdomain/mark/1.0/", "pdm", "permissive"),
        ("public domain", "pdm", "permissive"),
        ("cc-by-nc", "cc-by-nc", "restrictive"),
        ("CC BY-NC-SA 3.0", "cc-by-nc-sa", "restrictive"),
        ("https://creativecommons.org/licenses/by-nc/4.0/", "cc-by-nc", "restrictive"),
        ("https://creativecommons.org/licenses/by-nc-nd/4.0/deed.en", "cc-by-nc-nd", "restrictive"),
        ("Attribution-NonCommercial", "cc-by-nc", "restrictive"),
        ("CC_BY_ND", "cc-by-nd", "restrictive"),
        ("(c) all rights reserved", "all-rights-reserved", "restrictive"),
        ("All Rights Reserved", "all-rights-reserved", "restrictive"),
        ("© Copyright", "all-rights-reserved", "restrictive"),
    ],
)
def test_spellings(table, raw, canonical, cls):
    assert table.classify(raw) == (canonical, cls)


def test_unknown_and_missing_are_restrictive_and_counted(table):
    for raw in ["see website", "see website", None, "", 42]:
        assert table.classify(raw) == ("unknown", "restrictive")
    assert table.unknown_raw == {"see website": 2, "<missing>": 2, "42": 1}


def test_key_drops_versions_and_noise():
    assert license_key(" CC BY-NC-SA 3.0 Unported ") == "cc-by-nc-sa"


def test_table_rejects_bad_class_and_ambiguous_alias(tmp_path):
    bad = tmp_path / "l.yaml"
    bad.write_text("licenses:\n  x: {class: maybe}\n")
    with pytest.raises(ConfigError, match="class must be one of"):
        LicenseTable.load(bad)
    bad.write_text(
        "licenses:\n  a: {class: permissive, aliases: [z]}\n  b: {class: restrictive, aliases: [Z]}\n"
    )
    with pytest.raises(ConfigError, match="names both"):
        LicenseTable.load(bad)


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("CC BY-SA 3.0", "https://creativecommons.org/licenses/by-sa/3.0/"),
        ("Attribution 2.5 Generic", "https://creativecommons.org/licenses/by/2.5/"),
        ("cc-by-nc", "https://creativecommons.org/licenses/by-nc/4.0/"),
        ("CC0 1.0 Universal", "https://creativecommons.org/publicdomain/zero/1.0/"),
        (
            "http://creativecommons.org/licenses/by/4.0/legalcode",
            "http://creativecommons.org/licenses/by/4.0/legalcode",
        ),
        ("CC BY 3.5", "https://creativecommons.org/licenses/by/4.0/"),  # no such version: the table's deed
        ("All rights reserved", None),
        (None, None),
    ],
)
def test_the_licence_url_is_the_value_the_version_s_deed_or_the_table_s(raw, url):
    table = LicenseTable.load(BUNDLED_CONFIG_DIR / "licenses.yaml")
    canonical, _ = table.classify(raw)
    assert table.url(raw, canonical) == url
