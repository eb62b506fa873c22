"""What a finished build's figures mean for the person who ran it: its failure reasons ranked, and whether
it sharded enough to count as a success.

Owns ``top_reasons`` (the end-of-run summary's ``failures:`` line: the most frequent reasons first) and
``too_few_sharded``: a build that sharded no record (or, with ``min_sharded_share`` above 0, fewer than
that share of the records it could shard: records in less content duplicates, which are dropped on
purpose) is a failed build. Its outputs are written all the same (manifest, ``failures.jsonl``,
``duplicates.jsonl``), so that the user can read what went wrong; the CLI then exits non-zero with one
line naming the dominant failure reason and its remedy (``REMEDIES``).

Leaves out: counting (finalize.py writes the manifest's ``accounting`` and ``failures_by_reason``) and
printing (``flora build``, sharding/__main__.py).
"""

from __future__ import annotations

#: How many failure reasons the summary names; the rest are counted as "N more".
SHOWN_REASONS = 5

_UNREACHABLE = "check that the image host is up and reachable from this machine, then run the build again"
_REFUSED_IMAGES = "the downloads were refused as images: check the records' URLs and the images.* settings"
#: failure reason (failures.jsonl) -> what to do about it, for the line of a build that sharded too little.
REMEDIES: dict[str, str] = {
    "blocked_address": "the image host's address is private or loopback, which builds refuse by default: "
    "allow its network with --allow-network CIDR (e.g. --allow-network 127.0.0.1/32; config key "
    "download.allow_networks)",
    "connection_error": f"the image host refused or dropped the connections: {_UNREACHABLE}",
    "timeout": f"the image host did not answer in time: {_UNREACHABLE}, or raise download.read_timeout_s",
    "too_slow": "the image host sent too slowly: check the network, or lower download.min_bytes_per_s",
    "dns_error": "the image host's name did not resolve: check the URLs' host names and this machine's DNS",
    "dns_timeout": "DNS gave no answer in time: check this machine's DNS, or raise download.dns_timeout_s",
    "tls_error": "the TLS handshake failed: check the image host's certificate and this machine's clock",
    "http_404": "the image host answered 404 Not Found: check the records' image_url values",
    "http_410": "the image host answered 410 Gone: check the records' image_url values",
    "http_403": "the image host answered 403 Forbidden: check that the images may be fetched from here",
    "http_4xx": "the image host refused the requests (4xx): check the records' image_url values",
    "http_429": "the image host is rate limiting: lower download.threads, then run with --retry-failed",
    "http_5xx": "the image host is failing (5xx): run again later with --retry-failed",
    "bad_scheme": "the records' image_url values are not http(s) URLs: check the catalog's source",
    "invalid_url": "the records' image_url values are not valid URLs: check the catalog's source",
    "bad_record": "the splits file's lines are damaged: run `flora catalog` again",
    "too_large": "the images are larger than download.max_bytes: raise it if they are wanted",
    "not_an_image": _REFUSED_IMAGES,
    "corrupt": _REFUSED_IMAGES,
    "too_small": "the images are smaller than images.min_side: lower it if they are wanted",
    "too_large_dimensions": "the images are larger than images.max_side: raise it if they are wanted",
    "format_not_allowed": "the images' format is not in images.formats: add it if wanted",
}
_DEFAULT_REMEDY = "see failures.jsonl for each record's reason and detail"


def top_reasons(by_reason: dict[str, int], shown: int = SHOWN_REASONS) -> str:
    """``"blocked_address 440, http_404 4"``: the most frequent reasons first (ties by name), the rest
    counted as ``"+ N more reasons (R records)"``."""
    ranked = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{reason} {count}" for reason, count in ranked[:shown])
    rest = ranked[shown:]
    if rest:
        text += f", + {len(rest)} more reasons ({sum(count for _, count in rest)} records)"
    return text


def too_few_sharded(manifest: dict, min_share: float, out: str) -> str | None:
    """None when the build sharded enough; else the one line that says how little, the dominant failure
    reason with its remedy, and that the outputs in ``out`` are written for inspection.

    Enough: at least one record when ``min_share`` is 0 (the default), else at least ``min_share`` of
    the records in less the content duplicates. A build with no record to shard is not judged here.
    """
    a = manifest["accounting"]
    could = a["records_in"] - a["content_duplicates"]
    if could <= 0:
        return None
    if a["sharded"] > 0 and a["sharded"] >= min_share * could:
        return None
    wanted = "none" if min_share == 0 else f"fewer than min_sharded_share {min_share:g} of the {could}"
    line = f"build sharded {a['sharded']} of {a['records_in']} records ({wanted}): "
    by_reason = manifest.get("failures_by_reason") or {}
    if by_reason:
        reason, count = min(by_reason.items(), key=lambda item: (-item[1], item[0]))
        remedy = REMEDIES.get(reason, _DEFAULT_REMEDY)
        line += f"{count} of its {a['failed']} failures are {reason}: {remedy}"
    else:
        line += "no failure was recorded; see the manifest's accounting"
    return f"{line}; the manifest, failures.jsonl and duplicates.jsonl are written in {out} for inspection"
