"""The package layout: no import cycles, and a stage imports only its own stage or lower ones.

The import graph is read statically (every ``import`` and ``from ... import``, also inside
functions, relative imports resolved), so an import that only runs on one code path still counts.

Stages, lowest first::

    foundation < io < registration < features < reconstruction < evaluation < project < app

``foundation`` is the top-level modules every stage uses (errors, files, torch set-up, torchrun);
``app`` is what a user starts: the CLI and its commands, the widgets, the sample data.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "napari_smsdl"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

STAGES = ("foundation", "io", "registration", "features", "reconstruction", "evaluation", "project", "app")

#: Stage of each top-level module (subpackages are their own stage).
TOP_LEVEL = {
    "__init__": "foundation",
    "errors": "foundation",
    "_files": "foundation",
    "_outputs": "foundation",
    "_locks": "foundation",
    "torch_setup": "foundation",
    "distributed": "foundation",
    "_reader": "io",  # the napari reader: files → layer data (no napari import)
    "_writer": "io",  # the napari writers: layer data → files (no napari import)
    "sample": "app",
    "_sample_data": "app",
    "cli": "app",
    "__main__": "app",
}
SUBPACKAGE_STAGE = {"commands": "app", "widgets": "app"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts]) if parts != ["__init__"] else PACKAGE


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def stage(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return TOP_LEVEL["__init__"]
    if (ROOT / parts[0]).is_dir():
        return SUBPACKAGE_STAGE.get(parts[0], parts[0])
    return TOP_LEVEL[parts[0]]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package that ``module`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            # ``from pkg import name``: name may itself be a module
            targets = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_stage():
    for name in modules():
        assert stage(name) in STAGES, name


def test_lower_stages_never_import_higher_ones():
    rank = {s: i for i, s in enumerate(STAGES)}
    bad = [
        f"{a} ({stage(a)}) imports {b} ({stage(b)})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if rank[stage(b)] > rank[stage(a)]
    ]
    assert not bad, "imports of a higher stage:\n" + "\n".join(bad)


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["io", "features", "reconstruction", "evaluation", "project", "registration"])
def test_subpackages_name_their_public_api(package):
    import importlib

    mod = importlib.import_module(f"{PACKAGE}.{package}")
    assert mod.__all__, package
    for name in mod.__all__:
        assert hasattr(mod, name), f"{package}.{name}"
