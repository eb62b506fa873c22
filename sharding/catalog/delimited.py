"""Delimited text as archive publishers write it, read line by line in bounded memory: the lines of a
file (any terminator, decoded with undecodable bytes kept as surrogates, a line over
``MAX_LINE_BYTES`` reported rather than held), and rows of fields, quoted or not.

Owns ``text_lines`` and ``split_rows``. With quoting, a field may span lines; a quote left open would
make one row of every line up to the next quote, so a row that spans lines with the wrong number of
fields (or that csv cannot read) is reported as its first line's problem, and the lines after it are
read again as rows of their own: no line is swallowed by another's typo.

Leaves out: which columns mean what (dwca.py), the meta.xml that names the separators.
"""

from __future__ import annotations

import codecs
import csv
from collections import deque
from collections.abc import Iterator
from typing import IO

#: The longest line kept; a longer one is a problem row, and its bytes are skipped.
MAX_LINE_BYTES = 1 << 20
CHUNK = 1 << 18  # bytes read at a time: a few hundred rows


def text_lines(raw: IO[bytes], terminator: bytes, encoding: str) -> Iterator[tuple[int, str | None]]:
    """The file's lines by number, decoded (undecodable bytes as surrogates), read ``CHUNK`` bytes at a
    time; None for a line over ``MAX_LINE_BYTES``."""
    # "\n" and "\r\n" are read alike: files often end lines otherwise than their meta.xml says
    strip_cr = terminator in (b"\n", b"\r\n")
    terminator = b"\n" if strip_cr else terminator

    def decode(line: bytes) -> str:
        return (line[:-1] if strip_cr and line.endswith(b"\r") else line).decode(encoding, "surrogateescape")

    buf, lineno, skipping = b"", 0, False
    chunk = raw.read(CHUNK).removeprefix(codecs.BOM_UTF8)
    while chunk:
        *parts, buf = (buf + chunk).split(terminator)
        for part in parts:
            lineno += 1
            yield lineno, None if skipping else decode(part)
            skipping = False
        if len(buf) > MAX_LINE_BYTES:
            buf, skipping = b"", True
        chunk = raw.read(CHUNK)
    if buf or skipping:
        yield lineno + 1, None if skipping else decode(buf)


def split_rows(
    lines: Iterator[tuple[int, str | None]], sep: str, quote: str
) -> Iterator[tuple[int, list[str] | None, str, str | None]]:
    """Lines -> ``(line number, fields, text, problem)``; with ``quote``, a quoted field may span lines."""
    too_long = f"a line over {MAX_LINE_BYTES:,} bytes"
    if not quote:
        for lineno, text in lines:
            if text is None:
                yield lineno, None, "", too_long
            else:
                yield lineno, text.split(sep), text, None
        return
    # An unterminated quote would make one "row" of every line up to the next quote: a row that spans
    # lines with the wrong number of fields (or that csv cannot read) is its first line's bad_row, and
    # the lines after it are read again as rows of their own.
    taken: list[tuple[int, str | None]] = []
    again: deque[tuple[int, str | None]] = deque()
    width: int | None = None

    def feed() -> Iterator[str]:
        while True:
            if again:
                lineno, text = again.popleft()
            else:
                try:
                    lineno, text = next(lines)
                except StopIteration:
                    return
            taken.append((lineno, text))
            yield (text if text is not None else "\x00") + "\n"

    reader = csv.reader(feed(), delimiter=sep, quotechar=quote, strict=True)
    while True:
        taken.clear()
        try:
            fields, problem = next(reader), None
        except StopIteration:
            return
        except csv.Error as exc:
            fields, problem = None, f"unreadable quoted row: {exc}"
        first = taken[0][0] if taken else 0
        if len(taken) > 1 and (fields is None or (width is not None and len(fields) != width)):
            found = f"{len(fields)} fields, expected {width}" if fields is not None else problem
            again.extendleft(reversed(taken[1:]))
            reader = csv.reader(feed(), delimiter=sep, quotechar=quote, strict=True)
            yield (
                first,
                None,
                (taken[0][1] or "")[:200],
                f"a quote left open ({found}); the next lines read again",
            )
            continue
        if fields is None:
            yield first, None, "", problem
            continue
        width = len(fields) if width is None else width
        text = sep.join(fields)
        yield first, fields, text, (too_long if "\x00" in text else None)
