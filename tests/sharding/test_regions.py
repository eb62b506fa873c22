"""Country -> region resolution, the seed's EU_SW, and what happens when it does not resolve."""

import pytest

from flora.config import ConfigError
from flora.sharding.catalog.regions import UNKNOWN_REGION, RegionTable
from flora.sharding.catalog.run import BUNDLED_CONFIG_DIR


@pytest.fixture
def table():
    return RegionTable.load(BUNDLED_CONFIG_DIR / "regions.yaml")


def test_eu_sw_is_the_seeds_four_countries(table):
    assert sorted(c for c, r in table.country_region.items() if r == "EU_SW") == ["ES", "FR", "IT", "PT"]


@pytest.mark.parametrize(
    ("country", "expected"),
    [
        ("ES", ("ES", "EU_SW")),
        ("es", ("ES", "EU_SW")),
        ("España", ("ES", "EU_SW")),
        (" spain ", ("ES", "EU_SW")),
        ("NO", ("NO", "EU_NORTH")),
        ("United States", ("US", "AMERICAS_NORTH")),
        ("U.S.A.", ("US", "AMERICAS_NORTH")),
    ],
)
def test_countries(table, country, expected):
    assert table.resolve(country, None) == expected


def test_region_only_conflicts_and_unknowns(table):
    assert table.resolve(None, "eu-sw") == (None, "EU_SW")
    assert table.resolve("DE", "EU_SW") == ("DE", "EU_CENTRAL")
    assert table.conflicts == 1
    assert table.resolve("Atlantis", None) == (None, UNKNOWN_REGION)
    assert table.resolve(None, "MIDDLE_EARTH") == (None, UNKNOWN_REGION)
    assert table.unknown_countries == {"Atlantis": 1}


def test_user_region_names_are_checked(table):
    assert table.check_names(["eu_sw"]) == ["EU_SW"]
    with pytest.raises(ConfigError, match="unknown region 'EU_XX'"):
        table.check_names(["EU_XX"])


def test_country_in_two_regions_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("regions:\n  A_B: [ES]\n  C_D: [ES]\n")
    with pytest.raises(ConfigError, match="ES is in both"):
        RegionTable.load(path)
    path.write_text("regions:\n  A_B: [NO]\n")  # YAML's Norway problem: unquoted NO is false
    with pytest.raises(ConfigError, match="not an ISO alpha-2 code"):
        RegionTable.load(path)
