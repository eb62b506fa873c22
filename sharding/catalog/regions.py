"""Regions: a record's country (code or name) -> ISO alpha-2 code -> region, from ``regions.yaml``.

Owns the country/region table and the resolution rule:

* ``country`` is matched case-insensitively as an ISO 3166-1 alpha-2 code or one of the table's
  names ("Spain", "españa", "es" -> ``ES``); the region is the one that lists the code.
* Without a usable country, a ``region`` field naming a known region (any case, ``-`` or ``_``) is
  taken as given.
* When both are present and disagree, the country wins (it is the finer fact) and the disagreement
  is counted (``region_conflicts`` in export_stats.json).
* Otherwise the region is ``UNKNOWN``; unknown countries are counted by spelling.

Leaves out: geocoding coordinates and sub-national regions (a country sits in one region).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from flora.config import ConfigError, read_yaml

UNKNOWN_REGION = "UNKNOWN"
_CODE = re.compile(r"^[A-Z]{2}$")


def _name_key(text: str) -> str:
    return " ".join(text.strip().lower().replace(".", "").split())


def region_key(text: str) -> str:
    """Normalised region name: ``eu-sw`` / ``Eu_Sw`` -> ``EU_SW``."""
    return text.strip().upper().replace("-", "_").replace(" ", "_")


@dataclass
class RegionTable:
    """Country code -> region, with country names; plus counters of what did not resolve."""

    country_region: dict[str, str]
    names: dict[str, str]
    regions: list[str]
    unknown_countries: Counter = field(default_factory=Counter, repr=False)
    conflicts: int = 0

    @classmethod
    def load(cls, path: str | Path) -> RegionTable:
        data = read_yaml(path)
        regions = data.get("regions")
        if not isinstance(regions, dict) or not regions:
            raise ConfigError(f"{path}: expected a non-empty 'regions' mapping")
        country_region: dict[str, str] = {}
        for region, codes in regions.items():
            if region_key(region) != region or region == UNKNOWN_REGION:
                raise ConfigError(
                    f"{path}: region names are upper-case like EU_SW and not UNKNOWN, got {region!r}"
                )
            for code in codes or []:
                code = str(code)
                if not _CODE.match(code):
                    raise ConfigError(f"{path}: regions.{region}: {code!r} is not an ISO alpha-2 code")
                if code in country_region:
                    raise ConfigError(
                        f"{path}: country {code} is in both {country_region[code]} and {region}"
                    )
                country_region[code] = region
        names: dict[str, str] = {}
        for code, spellings in (data.get("country_names") or {}).items():
            if code not in country_region:
                raise ConfigError(f"{path}: country_names.{code} names a country that is in no region")
            for spelling in spellings:
                names[_name_key(str(spelling))] = code
        return cls(country_region=country_region, names=names, regions=sorted(regions))

    def country_code(self, country: object) -> str | None:
        """The ISO alpha-2 code for a country code or name, or None when unknown."""
        if not isinstance(country, str) or not country.strip():
            return None
        text = country.strip()
        if len(text) == 2 and text.upper() in self.country_region:
            return text.upper()
        return self.names.get(_name_key(text))

    def is_region(self, name: str) -> bool:
        return region_key(name) in self.regions

    def resolve(self, country: object, region: object) -> tuple[str | None, str]:
        """Returns ``(country_code_or_None, region)`` by the rule in the module docstring."""
        code = self.country_code(country)
        given = region_key(region) if isinstance(region, str) and region.strip() else None
        if given is not None and given not in self.regions:
            given = None
        if code is not None:
            derived = self.country_region[code]
            if given is not None and given != derived:
                self.conflicts += 1
            return code, derived
        if isinstance(country, str) and country.strip():
            self.unknown_countries[country.strip()] += 1
        return None, given or UNKNOWN_REGION

    def check_names(self, names: list[str]) -> list[str]:
        """Normalises region names given by a user; an unknown name is a ConfigError."""
        out = []
        for name in names:
            key = region_key(name)
            if key not in self.regions:
                raise ConfigError(f"unknown region {name!r}; known regions: {', '.join(self.regions)}")
            out.append(key)
        return out
