"""Opting out by response header: ``X-Robots-Tag: noai`` / ``noimageai`` say "not for AI training".

Owns reading ``X-Robots-Tag`` values as img2dataset's ``disallowed_header_directives`` does, and a
little more exactly: each header value is a comma-separated list of directives, optionally led by a
user-agent token and a colon (``otherbot: noai, noimageai``), which then holds for the directives
after it (until another token). A directive addresses us when it has no token, the token ``*``, or
our own: the product name of ``download.user_agent`` (``flora-sharder`` in ``flora-sharder/0.1
(...)``), compared case-insensitively; ``otherbot: noai`` is someone else's business. Directives
that carry a value after a colon (``unavailable_after: 25 Jun 2010``, ``max-image-preview: none``)
are not mistaken for tokens.

``opted_out`` names the configured directives (``download.opt_out_directives``, default ``noai``,
``noimageai``; an empty list ignores the header) that a response's header values address to us.
The fetcher (fetch.py) fails such a response as ``opted_out`` before reading its body; the header's
values are kept with every cached image too (job.py), so that a cache filled by a build that ignored
the header never lets a build that honours it shard the image, and the reverse fetches it anew.

Leaves out: robots.txt and HTML ``<meta name="robots">`` (an image has no HTML; robots.txt is a
per-site crawl policy, not a per-image licence statement).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flora.config import ConfigError

HEADER = "X-Robots-Tag"
#: img2dataset's default ``disallowed_header_directives`` for AI use (DeviantArt's noai / noimageai).
DEFAULT_DIRECTIVES = ("noai", "noimageai")
#: Robots directives written ``name: value``: their name is not a user-agent token.
VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_TOKEN = re.compile(r"\s*([A-Za-z0-9_.*-]+)\s*:\s*(.*)", re.DOTALL)
_DIRECTIVE = re.compile(r"[a-z0-9_-]+")


def agent_token(user_agent: str) -> str:
    """The product name a site would address us by: ``flora-sharder`` of ``flora-sharder/0.1 (+url)``."""
    return user_agent.strip().split(None, 1)[0].split("/", 1)[0].lower() if user_agent.strip() else ""


def check_directives(directives: Iterable[str]) -> list[str]:
    """The configured directives, lower-cased; ``ConfigError`` for anything that is not a bare token."""
    if isinstance(directives, str):
        raise ConfigError(f"download.opt_out_directives must be a list, got the string {directives!r}")
    checked = []
    for d in directives:
        if not isinstance(d, str) or not _DIRECTIVE.fullmatch(d.strip().lower()):
            raise ConfigError(f"download.opt_out_directives: expected directive names like 'noai', got {d!r}")
        checked.append(d.strip().lower())
    return checked


def addressed(values: Iterable[str], agent: str) -> set[str]:
    """The directives of ``X-Robots-Tag`` header ``values`` that address all agents or ``agent``."""
    found = set()
    for value in values:
        target = None  # no token yet: every agent
        for item in value.split(","):
            match = _TOKEN.fullmatch(item)
            if match and match.group(1).lower() not in VALUED_DIRECTIVES:
                target, item = match.group(1).lower(), match.group(2)
            name = item.split(":", 1)[0].strip().lower()
            if name and target in (None, "*", agent):
                found.add(name)
    return found


def opted_out(values: Iterable[str] | None, directives: Iterable[str], agent: str) -> list[str]:
    """The ``directives`` (configured) that header ``values`` address to ``agent``, sorted; [] if none."""
    wanted = set(directives)
    if not wanted or not values:
        return []
    return sorted(addressed(values, agent) & wanted)
