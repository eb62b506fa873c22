"""Image URLs as people write them -> the one spelling the catalog keeps, and its identity key.

Owns ``normalize_url``, ``url_key`` and ``UrlError`` (records.py serves both functions to the rest of
Flora, a ``UrlError`` as its ``RecordError``; the sharder reads ``url_key`` there).

``normalize_url`` parses an http(s) URL as a browser does (the WHATWG URL standard,
https://url.spec.whatwg.org/) and serialises it, so that every spelling of one URL is one string:

* the scheme and an ASCII host are lower-cased; a host with non-ASCII letters goes through UTS #46
  mapping and IDNA to punycode (``bücher.example`` and ``BÜCHER.example`` -> ``xn--bcher-kva.example``),
  a percent-escaped host is decoded first, and a host that ends in a number is an IPv4 address
  (``0x7f.1`` -> ``127.0.0.1``); IPv6 literals are written compressed, in lower case;
* the default port (80, 443) and the fragment are dropped;
* in the path, ``\\`` is ``/``, ``.`` and ``..`` segments are resolved, and characters of the WHATWG
  path percent-encode set (space, ``"#<>?^`{}``, anything beyond ASCII, as UTF-8) are percent-encoded;
  in the query, those of the special-query percent-encode set (space, ``"#<>'``, beyond ASCII);
* existing percent-escapes are kept as written (``%7e`` stays ``%7e``; ``url_key`` equates it
  with ``~``), and so is a ``%`` not followed by two hex digits, as a browser keeps it;
* Flora's own rules on top: query parameters are sorted (``?w=5&v=2`` and ``?v=2&w=5`` are one
  download) and an empty query is dropped.

An already normal URL (ASCII, none of the characters above, no dot segments, a plain host) comes
back unchanged, so catalogs written before this normalisation keep their URLs, keys and splits.

Still refused (``UrlError``; reason ``bad_scheme`` for a scheme other than http/https, ``bad_url`` for
the rest): an empty or over-long URL, control characters anywhere (a browser would drop a tab or a
newline silently; in an export they mean a corrupt field), a missing ``//host`` (``http:///a.jpg``,
``http:host``), credentials, a bad port, a host that is not a valid IDNA host name (bad punycode, a
disallowed code point or joiner, a hyphen at the start or end of an internationalised label), a
host with a forbidden character (space, ``<>^|%``...), and an invalid IPv4 or IPv6 address.
Internationalised labels are checked by IDNA 2008 (the ``idna`` package), which is stricter than
browsers on symbols: ``http://☃.net/`` is refused.

Leaves out: fetching (the sharder's download package, whose SSRF guard resolves the host), other
schemes, and the WHATWG parser's leniency about slashes after the scheme (``http:/host``).
"""

from __future__ import annotations

import ipaddress
import re
import string
from urllib.parse import unquote_to_bytes, urlsplit

import idna


class UrlError(ValueError):
    """A URL that cannot be kept; ``reason`` is ``bad_url`` or ``bad_scheme``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


ALLOWED_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Longest accepted URL; a longer value is a corrupt export, not an image address.
MAX_URL_CHARS = 4096
#: Characters refused anywhere in a URL: C0 controls, DEL and C1 controls (Unicode category Cc).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: What a path segment / a query percent-encodes: everything outside printable ASCII plus the
#: WHATWG path percent-encode set (``"#<>?^`{}``) / special-query percent-encode set (``"#<>'``).
_PATH_ENCODE = re.compile(r"""[^\x21-\x7e]|["#<>?^`{}]""")
_QUERY_ENCODE = re.compile(r"""[^\x21-\x7e]|["#<>']""")
#: A ``.`` or ``..`` path segment, also spelled with ``%2e`` (WHATWG "single-dot"/"double-dot" segment).
_DOT_SEGMENT = re.compile(r"/(?:\.|%2e){1,2}(?=/|$)", re.IGNORECASE)
_SINGLE_DOTS = frozenset((".", "%2e"))
_DOUBLE_DOTS = frozenset(("..", ".%2e", "%2e.", "%2e%2e"))
#: WHATWG forbidden domain code points (after IDNA): these never belong to a host name.
_FORBIDDEN_HOST = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f]")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_IPV4_PARTS = 4
#: An IPv4 address already in the form the WHATWG serialiser writes (most numeric hosts).
_DOTTED_DECIMAL = re.compile(
    r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\Z"
)


def _bad(message: str, text: str) -> UrlError:
    return UrlError("bad_url", f"image_url {message}: {text[:80]!r}")


def normalize_url(url: str) -> str:
    """The one spelling of an http(s) URL (see module docstring); raises UrlError if invalid."""
    text = url.strip()
    if not text:
        raise UrlError("bad_url", "image_url is empty")
    if len(text) > MAX_URL_CHARS:
        raise UrlError("bad_url", f"image_url is {len(text)} characters long (max {MAX_URL_CHARS})")
    if _CONTROL.search(text):
        raise _bad("contains control characters", text)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate from a JSON escape
            raise _bad("is not valid Unicode", text) from exc
    text = _forward_slashes(text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _bad(f"cannot be parsed ({exc})", text) from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"{scheme!r}" if scheme else "none"
        raise UrlError("bad_scheme", f"image_url scheme must be http or https, got {shown}: {text[:80]!r}")
    hostname = parts.hostname
    if not hostname:
        raise _bad("has no host", text)
    if "@" in parts.netloc:
        raise UrlError("bad_url", "image_url embeds credentials (user:password@host); refusing to keep it")
    host = _host(hostname, text)
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    query = "&".join(sorted(p for p in _encode(_QUERY_ENCODE, parts.query).split("&") if p))
    return f"{scheme}://{netloc}{_path(parts.path)}{'?' + query if query else ''}"


def url_key(image_url: str) -> str:
    """The identity of a normalised URL for dedup and leakage checks: without its scheme (the
    http and https forms of one URL are one image), percent-escapes upper-cased and unreserved
    characters decoded (RFC 3986, 6.2.2: ``%7e`` and ``~`` are the same URL)."""
    rest = image_url.split("://", 1)[-1]
    return _PERCENT.sub(_fix_escape, rest) if "%" in rest else rest


def _fix_escape(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _forward_slashes(text: str) -> str:
    """``\\`` before the query is ``/`` in an http(s) URL, as a browser reads it (``http:\\\\h\\a``)."""
    if "\\" not in text:
        return text
    end = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))
    return text[:end].replace("\\", "/") + text[end:]


def _encode(pattern: re.Pattern, text: str) -> str:
    """``text`` with each character ``pattern`` matches percent-encoded as UTF-8."""
    if not pattern.search(text):
        return text
    return pattern.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), text)


def _path(path: str) -> str:
    """The path with dot segments resolved and percent-encoded (WHATWG path state, special scheme)."""
    if not path:
        return "/"
    if _DOT_SEGMENT.search(path):
        out: list[str] = []
        segments = path[1:].split("/")
        for n, segment in enumerate(segments):
            last = n == len(segments) - 1
            lowered = segment.lower()
            if lowered in _DOUBLE_DOTS:
                if out:
                    out.pop()
                if last:
                    out.append("")
            elif lowered in _SINGLE_DOTS:
                if last:
                    out.append("")
            else:
                out.append(segment)
        path = "/" + "/".join(out)
    return _encode(_PATH_ENCODE, path)


def _host(hostname: str, text: str) -> str:
    """The host as a browser serialises it: IPv6 compressed, IDNA to punycode, IPv4 dotted decimal."""
    if ":" in hostname:
        return f"[{_ipv6(hostname, text)}]"
    host = hostname
    if "%" in host:
        try:
            host = unquote_to_bytes(host).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad("has a percent-escaped host that is not UTF-8", text) from exc
    host = host.lower() if host.isascii() else _idna(host, text)
    if not host or _FORBIDDEN_HOST.search(host):
        raise _bad("has a host name with a forbidden character", text)
    for label in host.split(".") if "xn--" in host else ():
        if label.startswith("xn--"):
            try:
                idna.ulabel(label)
            except idna.IDNAError as exc:
                raise _bad(f"has an invalid punycode label {label!r} ({exc})", text) from exc
    if _DOTTED_DECIMAL.match(host):
        return host
    return _ipv4(host, text) if _ends_in_number(host) else host


def _idna(host: str, text: str) -> str:
    """An internationalised host -> ASCII: UTS #46 mapping (case, width, ``。``), then each
    non-ASCII label to punycode under IDNA 2008; ASCII labels are kept as they are (``my_cdn``)."""
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii") for label in mapped.split(".")
        )
    except idna.IDNAError as exc:
        raise _bad(f"has an invalid internationalised host name ({exc})", text) from exc


def _ipv6(hostname: str, text: str) -> str:
    """An IPv6 literal written as the WHATWG serialiser does (lower-case hex, the first longest run
    of two or more zero pieces as ``::``); zone identifiers are refused, as browsers do."""
    try:
        if "%" in hostname:
            raise ValueError("zone identifiers are not allowed in URLs")
        packed = ipaddress.IPv6Address(hostname).packed
    except ValueError as exc:
        raise _bad(f"has an invalid IPv6 address ({exc})", text) from exc
    pieces = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, 16, 2)]
    start, length = -1, 1
    i = 0
    while i < len(pieces):
        j = i
        while j < len(pieces) and pieces[j] == 0:
            j += 1
        if j - i > length:
            start, length = i, j - i
        i = max(j, i + 1)
    hexes = [f"{p:x}" for p in pieces]
    if start < 0:
        return ":".join(hexes)
    return ":".join(hexes[:start]) + "::" + ":".join(hexes[start + length :])


def _ipv4_number(part: str) -> int | None:
    """One part of an IPv4 host (decimal, ``0x`` hex or ``0`` octal), or None if it is not one."""
    radix = 10
    if part[:2].lower() == "0x":
        part, radix = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    try:
        return int(part, radix) if part.isascii() and part.isalnum() else None
    except ValueError:
        return None


def _ends_in_number(host: str) -> bool:
    labels = host.split(".")
    if labels[-1] == "" and len(labels) > 1:
        labels.pop()
    last = labels[-1]
    return bool(last) and (last.isdigit() or _ipv4_number(last) is not None)


def _ipv4(host: str, text: str) -> str:
    """A host that ends in a number, parsed as the WHATWG IPv4 parser does, in dotted decimal."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    numbers = [_ipv4_number(p) if p else None for p in parts]
    if len(parts) > _IPV4_PARTS or None in numbers:
        raise _bad("has a host that ends in a number but is not an IPv4 address", text)
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (_IPV4_PARTS + 1 - len(numbers)):
        raise _bad("has an IPv4 address with a part out of range", text)
    value = last + sum(n << (8 * (3 - i)) for i, n in enumerate(head))
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))
