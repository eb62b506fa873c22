"""One error base class and one way a command prints an error.

``FloraError`` is the base of every failure Flora anticipates (a bad config key, a missing file, an
unreachable server, a refused resume); each stage's own error class derives from it (and keeps the
builtin base callers may already catch: ``ValueError`` or ``RuntimeError``). ``fail(stage, exc)``
prints it as one line, ``flora <stage>: error: <message>``, and returns exit status 2, whether the
command was started as ``flora <stage>`` or as ``python -m <module>``.

Leaves out: unanticipated errors (bugs), which keep their traceback.
"""

from __future__ import annotations

import argparse
import sys

#: Exit status of a command refused for anticipated bad input (argparse's own status for usage errors).
EXIT_USAGE = 2


class FloraError(Exception):
    """An anticipated failure; its message says what was found and what was expected."""


def one_line(message: object) -> str:
    """``message`` as one line: its non-blank lines joined (a tool's multi-line message stays readable)."""
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(stage: str | None, exc: BaseException | str, code: int = EXIT_USAGE) -> int:
    """Prints ``flora <stage>: error: <exc>`` to stderr; returns ``code`` for the command to exit with."""
    print(f"flora{' ' + stage if stage else ''}: error: {one_line(exc)}", file=sys.stderr)
    return code


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line too: ``<prog>: error: <what> (<prog> --help)``."""

    def error(self, message: str):
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


#: errno values that mean "the filesystem is full" (no space, quota exceeded).
_FULL = {28, 122}  # ENOSPC, EDQUOT


class StorageError(FloraError, OSError):
    """Writing a file failed (full disk, I/O error): the message names the stage and the path."""


def storage_error(stage: str, path: object, exc: OSError, resume: str = "run it again") -> StorageError:
    """``exc`` (raised while ``stage`` wrote ``path``) as one line naming both, with what to do next."""
    if isinstance(exc, StorageError):
        return exc
    path = getattr(exc, "filename", None) or path
    why = exc.strerror or str(exc)
    hint = f"free space on that filesystem and {resume}" if exc.errno in _FULL else resume
    return StorageError(f"{stage}: cannot write {path}: {why} [Errno {exc.errno}]; {hint}")
