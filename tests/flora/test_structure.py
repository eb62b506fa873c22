"""The codebase's shape, checked: no import circles (function-level imports included), no product
module over 500 lines, every module says what it owns, the sample world
stays out of the product, and the product is imported only as ``flora.*``."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The repository's product folders -> the installed names they map to (setup.cfg's package_dir).
PRODUCT = {"flora": "flora", "sharding": "flora.sharding", "loaders": "flora.loaders",
           "training": "flora.training", "export": "flora.export"}  # fmt: skip
#: The house style: one module per concept, ~150-500 lines.
MAX_LINES = 500


def product_modules() -> dict[str, Path]:
    mods = {}
    for folder, installed in PRODUCT.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            mods[".".join((installed, *parts)).removesuffix(".__init__")] = path
    return mods


def imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [root] + [f"{root}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    mods = product_modules()
    graph = {name: imports(name, path, mods) for name, path in mods.items()}
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the check works


def test_modules_are_small_and_say_what_they_own():
    for name, path in product_modules().items():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{name}: {lines} lines"
        if path.name != "__init__.py" or lines > 10:
            assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"


def test_the_sample_world_is_not_part_of_the_product():
    for name, path in product_modules().items():
        if name == "flora.cli":
            continue  # routes `flora world` to a checkout's world/, by name only
        text = path.read_text()
        assert "import world" not in text and "from world" not in text, name


def test_the_product_is_imported_only_under_flora():
    """``import sharding...`` would find a user's own package of that name; every import says flora."""
    bare = tuple(f for f in PRODUCT if f != "flora")
    for path in [*REPO.glob("*/**/*.py")]:
        if path.parts[len(REPO.parts)] in (".venv", ".venv-tfjs", ".venv-img2dataset", "node_modules"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in bare, f"{path.relative_to(REPO)}: import {name}"
