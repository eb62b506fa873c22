"""Typed configuration: YAML -> dataclasses, validated on load, with dotted overrides.

Owns the one mechanism every Flora stage uses to read its config: ``load_config(cls, path,
overrides)`` builds a (nested) dataclass from a YAML mapping, rejects unknown keys and values of the
wrong type with a message that names the dotted key, and applies ``key.sub=value`` overrides from the
command line (values parsed as YAML scalars). Each stage keeps its own config classes
(``sharding.config``, ``loaders.config``, ``training.config``). Every YAML text a user hands
Flora (a config file, its ``_base_`` files, the tables they name, a command-line override value) is
parsed here, bounded in size, nesting depth and node count (aliases counted as the copies they stand
for), so a hostile file is refused in one line before it is expanded.

Leaves out: per-stage semantics beyond type checks (each config's ``__post_init__`` validates its own
ranges), and any environment-variable magic (secrets are read where they are used, see sources.py).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import FloraError

T = TypeVar("T")
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

#: Bounds on any YAML text Flora parses. Flora's own configs are under 2 KiB, 5 levels deep and 500
#: nodes (a regions table the largest); a thousand times that still parses in well under a second, and
#: anything beyond is a mistake or an attack: a 5,000-level nesting that overflows Python's stack, or an
#: alias bomb ("billion laughs": nine levels of ten aliases each) that expands to 10^9 values.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB
MAX_CONFIG_DEPTH = 64  # nested mappings and lists; far below the recursion limit of the parser
MAX_CONFIG_NODES = 100_000  # scalars, lists and mappings, each alias counted as the nodes it repeats


class ConfigError(FloraError, ValueError):
    """A config file or override is invalid; the message names the key and the bad value."""


class ConfigLimitError(ConfigError):
    """A YAML text is over one of the bounds above; the message names what was found and the limit."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts while it composes: the nesting depth, and the nodes the document
    stands for, each alias adding the size of the node it names. It stops at the first node over a
    limit, so neither a deep nesting nor an alias bomb is ever built."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._anchored: dict[str, int] = {}  # anchor -> nodes its node stands for, once composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._anchored:
                raise ConfigLimitError(
                    f"alias *{event.anchor} refers to a node that contains it (line {line})"
                )
            self._count(self._anchored.get(event.anchor, 0), line)
            return super().compose_node(parent, index)
        nests = isinstance(event, yaml.CollectionStartEvent)  # a mapping or a list: one level deeper
        self._depth += nests
        if self._depth > MAX_CONFIG_DEPTH:
            raise ConfigLimitError(f"nested deeper than the limit of {MAX_CONFIG_DEPTH} levels (line {line})")
        start = self._nodes
        self._count(1, line)
        node = super().compose_node(parent, index)
        self._depth -= nests
        if event.anchor is not None:
            self._anchored[event.anchor] = self._nodes - start
        return node

    def _count(self, nodes: int, line: int) -> None:
        self._nodes += nodes
        if self._nodes > MAX_CONFIG_NODES:
            raise ConfigLimitError(
                f"expands to more than the limit of {MAX_CONFIG_NODES:,} values, counting each alias as the "
                f"values it repeats (line {line})"
            )


def parse_yaml(text: str, source: object) -> Any:
    """The YAML document in ``text`` as plain data, within the ``MAX_CONFIG_*`` bounds; a text over a
    bound or invalid YAML is a ConfigError whose message starts with ``source`` (a path, an override)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigLimitError(f"{source}: {len(text):,} characters, over the limit of {MAX_CONFIG_BYTES:,}")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except ConfigLimitError as exc:
        raise ConfigLimitError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and builds nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(k, ktp, f"{key}.<key>"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} (known keys{' of ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Applies ``a.b.c=value`` overrides (value parsed as a YAML scalar) to a nested mapping copy."""
    data = _deep_copy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override must look like key.sub=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override has an empty key: {item!r}")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(raw, f"override {dotted}") if raw.strip() else None
    return data


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def bundled_config_dir() -> Path:
    """Flora's own configs: ``flora/configs/`` in an installed wheel, ``config/`` in a checkout."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "config"


def find_config(name: str | Path, beside: Path | None = None) -> Path | None:
    """A config or table file by name: the path as given (relative to the working directory), then
    the user's ``./config/``, then ``beside`` (the folder of the config that names it), then Flora's
    bundled configs. None when none has it."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_absolute():
        return None
    for base in (Path.cwd() / "config", beside, bundled_config_dir()):
        if base is not None and (base / path).is_file():
            return base / path
        if base is not None and path.parts[0] == "config" and (base / Path(*path.parts[1:])).is_file():
            return base / Path(*path.parts[1:])  # "config/x.yaml" names a bundled file too
    return None


#: The key naming the file(s) a config overlays: ``_base_: teacher_global.yaml`` (or a list, applied in
#: order). The overlay states only what differs; mappings merge key by key, anything else is replaced.
BASE_KEY = "_base_"


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on ``base``: nested mappings merge key by key; lists and scalars are replaced."""
    out = _deep_copy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = _deep_copy(value) if isinstance(value, dict) else value
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Reads a YAML mapping (looked up as ``find_config`` does) with its ``_base_`` files merged
    under it; a missing file, bad YAML, a non-mapping top level or a cycle of bases is a ConfigError."""
    found, data = _read_one(path)
    if found in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, found))
        raise ConfigError(f"{found}: {BASE_KEY} files form a cycle ({cycle})")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{found}: {BASE_KEY} must be a file name or a list of them, got {bases!r}")
    merged: dict = {}
    for base in bases:
        beside = found.parent / base  # a base beside its overlay first, then the usual lookup
        located = beside if beside.is_file() else find_config(base, found.parent)
        if located is None:
            raise ConfigError(f"{found}: {BASE_KEY} file not found: {base}")
        merged = merge(merged, read_yaml(located, (*_chain, found)))
    return merge(merged, data)


def _read_one(path: str | Path) -> tuple[Path, dict]:
    found = find_config(path)
    if found is None:
        raise ConfigError(f"config file not found: {path}")
    with found.open("rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)  # never more than the limit, however large the file
    if len(raw) > MAX_CONFIG_BYTES:
        size = found.stat().st_size
        raise ConfigLimitError(
            f"{path}: {size:,} bytes, over the limit of {MAX_CONFIG_BYTES:,} bytes for a config"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    data = parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return found.resolve(), data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Builds ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Builds the dataclass ``cls`` from a plain mapping, validating keys and types.

    ``prefix`` names the section in error messages (``data`` gives ``data.image_size: ...``).
    """
    return _build(cls, data, prefix)


def to_dict(cfg: Any) -> dict:
    """The plain-data form of a config dataclass (for reports and checkpoints)."""
    return dataclasses.asdict(cfg)
