"""License normalisation: raw export spellings -> canonical id -> permissive | restrictive.

Owns the reading of ``config/licenses.yaml`` and the matching rule (see that file's header): a raw
string such as ``"CC BY-NC-SA 3.0"``, ``"cc-by-nc"`` or a creativecommons.org URL becomes a canonical
id (``cc-by-nc-sa``) and a class. Unknown or missing licenses become ``unknown``, classed
restrictive, and the raw spellings are counted so the report can show them.

Each canonical id may carry a ``url`` (its deed); ``LicenseTable.url`` gives a record's licence URL
for attribution: the raw value when it is a URL, else the deed of the raw value's version
(``CC BY-SA 3.0`` -> ``https://creativecommons.org/licenses/by-sa/3.0/``), else the table's ``url``.

Leaves out: per-version distinctions in the class (CC-BY 2.0 and 4.0 are both ``cc-by``; the raw
string is kept in the record's ``meta.license_raw``) and legal advice: the table is the policy, edit it there.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from flora.config import ConfigError, read_yaml
from flora.sharding.format.schema import LICENSE_CLASSES, PERMISSIVE, RESTRICTIVE

UNKNOWN = "unknown"
__all__ = ["LICENSE_CLASSES", "PERMISSIVE", "RESTRICTIVE", "UNKNOWN", "LicenseTable", "license_key"]

#: Words that carry no license meaning in real exports ("CC0 1.0 Universal", "4.0 International").
_NOISE_WORDS = {
    "international",
    "universal",
    "generic",
    "unported",
    "license",
    "licence",
    "deed",
    "legalcode",
}
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CC_URL = re.compile(r"creativecommons\.org/(licenses|publicdomain)/([a-z-]+)", re.IGNORECASE)
_CC_PREFIXES = ("creative-commons-", "creativecommons-")
#: The versions Creative Commons published (a jurisdiction's port keeps its version's deed here).
_VERSION = re.compile(r"(?<![\d.])(1\.0|2\.0|2\.1|2\.5|3\.0|4\.0)(?![\d.])")
#: Deeds by canonical id, where a versioned URL is built (``{version}``): Creative Commons' own paths.
_CC_DEEDS = {"cc0": "publicdomain/zero/{version}/", "pdm": "publicdomain/mark/{version}/"}


def license_key(raw: str) -> str:
    """The normalised matching key of a raw license string (lower case, dashes, no versions)."""
    text = raw.strip().lower().replace("©", " c ")
    tokens = [t for t in _NON_ALNUM.split(text) if t and not t.isdigit() and t not in _NOISE_WORDS]
    key = "-".join(tokens)
    for prefix in _CC_PREFIXES:
        if key.startswith(prefix) and key != prefix.rstrip("-"):
            key = key[len(prefix) :]
    return key


@dataclass
class LicenseTable:
    """Canonical licenses, their classes and aliases, as loaded from ``licenses.yaml``."""

    classes: dict[str, str]
    aliases: dict[str, str]
    #: The deed URL of each canonical id that has one in the table.
    urls: dict[str, str] = field(default_factory=dict)
    _cache: dict[object, tuple[str, str]] = field(default_factory=dict, repr=False)
    #: Raw spellings that matched nothing, with their counts (reported in export_stats.json).
    unknown_raw: Counter = field(default_factory=Counter, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> LicenseTable:
        data = read_yaml(path)
        entries = data.get("licenses")
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{path}: expected a non-empty 'licenses' mapping")
        classes: dict[str, str] = {}
        aliases: dict[str, str] = {}
        urls: dict[str, str] = {}
        for canonical, entry in entries.items():
            if not isinstance(entry, dict) or entry.get("class") not in LICENSE_CLASSES:
                raise ConfigError(
                    f"{path}: licenses.{canonical}.class must be one of {list(LICENSE_CLASSES)}, "
                    f"got {entry.get('class') if isinstance(entry, dict) else entry!r}"
                )
            classes[canonical] = entry["class"]
            if entry.get("url") is not None:
                if not isinstance(entry["url"], str) or not entry["url"].startswith(("http://", "https://")):
                    raise ConfigError(
                        f"{path}: licenses.{canonical}.url must be an http(s) URL, got {entry['url']!r}"
                    )
                urls[canonical] = entry["url"]
            for alias in [canonical, *entry.get("aliases", [])]:
                key = license_key(str(alias))
                if aliases.get(key, canonical) != canonical:
                    raise ConfigError(f"{path}: alias {alias!r} names both {aliases[key]} and {canonical}")
                aliases[key] = canonical
        return cls(classes=classes, aliases=aliases, urls=urls)

    def classify(self, raw: object) -> tuple[str, str]:
        """Returns ``(canonical_id, license_class)`` for a raw license value (any JSON value)."""
        hit = self._cache.get(raw) if isinstance(raw, str | type(None)) else None
        if hit is None:
            hit = self._classify(raw)
            if isinstance(raw, str | type(None)):
                self._cache[raw] = hit
        if hit[0] == UNKNOWN:
            self.unknown_raw["<missing>" if raw is None or raw == "" else str(raw)] += 1
        return hit

    def _classify(self, raw: object) -> tuple[str, str]:
        if not isinstance(raw, str) or not raw.strip():
            return UNKNOWN, RESTRICTIVE
        match = _CC_URL.search(raw)
        if match:
            kind, code = match.group(1).lower(), match.group(2).lower()
            canonical = {"zero": "cc0", "mark": "pdm"}.get(code) if kind == "publicdomain" else f"cc-{code}"
            if canonical in self.classes:
                return canonical, self.classes[canonical]
        canonical = self.aliases.get(license_key(raw))
        if canonical is None:
            return UNKNOWN, RESTRICTIVE
        return canonical, self.classes[canonical]

    def url(self, raw: object, canonical: str) -> str | None:
        """The licence URL of a record whose raw licence is ``raw`` and canonical id ``canonical``
        (see module docstring); None when neither the value nor the table gives one."""
        if isinstance(raw, str):
            text = raw.strip()
            if text.lower().startswith(("http://", "https://")):
                return text
            version = _VERSION.search(text)
            if version and (canonical in _CC_DEEDS or canonical.startswith("cc-")):
                path = _CC_DEEDS.get(canonical, f"licenses/{canonical.removeprefix('cc-')}/{{version}}/")
                return "https://creativecommons.org/" + path.format(version=version.group(1))
        return self.urls.get(canonical)
