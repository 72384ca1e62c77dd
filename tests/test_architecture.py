"""The import rule of docs/architecture.md, checked on the source so that the page stays true.

The page's layer table is the rule: a module may import modules of its own layer or of a lower one, never of a higher
one; no two packages import each other (directly or around a loop), no module imports one that imports it back, and
``ops/`` reaches no Lightning import. The table is read from the page itself, so the page and this test cannot drift
apart: a new package fails here until the page gives it a layer.

Imports are read with ``ast``, nothing is imported: every ``import`` statement counts, also those inside functions
(a lazy import hides a cycle from Python, not from a reader) and under ``TYPE_CHECKING``. ``from a import b`` is an
import of the module ``a.b`` when that module exists, else of ``a``. The parent packages that Python initialises on the
way to a module (``lightning_robustft/__init__.py`` first of all) are not counted as imports of the importing module:
the rule is about what a module's own code depends on.

Two conventions the mkdocs site depends on are checked here too: every public module declares ``__all__``, and
docstrings are Markdown (mkdocstrings renders Sphinx roles such as ``:class:`X``` literally).

Every test is parametrised by one module or one import, so a failure names the module, the line and the import.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lightning_robustft"
PAGE = ROOT / "docs" / "architecture.md"
LIGHTNING = frozenset({"lightning", "pytorch_lightning", "lightning_fabric"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    """One import statement's dependency: ``module`` imports ``target`` at ``line``."""

    module: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def _resolve(name: str) -> str:
    """The package module an import of ``name`` loads last: ``name`` itself, or its longest existing parent."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> list[Import]:
    """Every import of ``module``, package-internal targets resolved to modules, external ones as written."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..y import z`
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            for alias in node.names:
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node.lineno))
    return [
        Import(module, line, _resolve(target) if _internal(target) else target) for target, line in sorted(set(found))
    ]


def _internal(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


IMPORTS: dict[str, list[Import]] = {module: _imports(module) for module in MODULES}
INTERNAL: dict[str, list[Import]] = {
    module: [imp for imp in imports if _internal(imp.target) and imp.target != module]
    for module, imports in IMPORTS.items()
}


def unit(module: str) -> str:
    """The package (``callbacks/``) or top-level module (``cli.py``, ``__init__.py``) of a module, as on the page."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    return f"{parts[1]}/" if (ROOT / PACKAGE / parts[1]).is_dir() else f"{parts[1]}.py"


def read_layers(text: str) -> dict[str, int]:
    """The page's layer table: rows ``| <layer> | `name/`, `name.py`, ... | ... |`` -> ``{name: layer}``."""
    layers = {}
    for line in text.splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            layers.update(dict.fromkeys(re.findall(r"`(\w+(?:/|\.py))`", row.group(2)), int(row.group(1))))
    return layers


LAYERS = read_layers(PAGE.read_text(encoding="utf-8"))
UNITS = sorted({unit(module) for module in MODULES})
CROSS = [imp for imports in INTERNAL.values() for imp in imports if unit(imp.module) != unit(imp.target)]


def _path(start: str, goal: str, edges: Callable[[str], Iterable[Import]], key: Callable[[str], str]) -> list[Import]:
    """The shortest chain of imports from ``key(start)`` to ``key(goal)`` (breadth first), or ``[]`` if none."""
    goal_key = key(goal)
    came_from: dict[str, Import | None] = {key(start): None}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for imp in edges(here):
            there = key(imp.target)
            if there in came_from:
                continue
            came_from[there] = imp
            if there == goal_key:
                chain = [imp]
                while (previous := came_from[key(chain[-1].module)]) is not None:
                    chain.append(previous)
                return chain[::-1]
            queue.append(imp.target)
    return []


def _unit_edges(module: str) -> list[Import]:
    """The cross-package imports of every module of ``module``'s package (the package graph's edges)."""
    return [imp for imp in CROSS if unit(imp.module) == unit(module)]


def _chain(imports: list[Import]) -> str:
    return "; ".join(map(str, imports))


# Imports that break the page's rule in files another branch owns, `(module, target): reason`, each an xfail(strict)
# until that branch fixes it. None today.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

# Public modules without `__all__`, owned by branches being edited while this test was written.
WITHOUT_ALL: set[str] = set()


# Modules whose docstrings still use Sphinx roles, owned by branches being edited while this test was written.
WITH_SPHINX_ROLES: set[str] = set()
SPHINX_ROLE = re.compile(r":(?:meth|func|class|attr|mod|data|exc|obj|const):`[^`]*`")


def _params(imports: list[Import]) -> list:
    return [
        pytest.param(
            imp,
            id=f"{imp.module}:{imp.line}->{imp.target}",
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[imp.module, imp.target])]
            if (imp.module, imp.target) in KNOWN_VIOLATIONS
            else [],
        )
        for imp in imports
    ]


def test_the_page_has_a_layer_table() -> None:
    assert {"__init__.py", "ops/", "callbacks/"} <= set(LAYERS), (
        f"docs/architecture.md: no layer table found (rows `| <layer> | `name/`, `name.py` | ... |`), read {LAYERS}."
    )


@pytest.mark.parametrize("name", UNITS)
def test_every_package_has_a_layer(name: str) -> None:
    assert name in LAYERS, (
        f"`{name}` has no layer in the table of docs/architecture.md: add it to the row of the layer it belongs to "
        "(the layers of what it imports and of what imports it)."
    )


@pytest.mark.parametrize("imp", _params(CROSS))
def test_no_import_from_a_higher_layer(imp: Import) -> None:
    here, there = LAYERS.get(unit(imp.module)), LAYERS.get(unit(imp.target))
    if here is None or there is None:
        pytest.fail(f"{imp}: {unit(imp.module)} or {unit(imp.target)} has no layer in docs/architecture.md.")
    assert there <= here, (
        f"{imp}, but {unit(imp.target)} (layer {there}) is above {unit(imp.module)} (layer {here}) in "
        "docs/architecture.md: dependencies point down. Move the shared code down, or pass it in from above."
    )


@pytest.mark.parametrize("imp", _params(CROSS))
def test_no_import_cycle_between_packages(imp: Import) -> None:
    back = _path(imp.target, imp.module, _unit_edges, unit)
    assert not back, (
        f"{imp}, and {unit(imp.target)} imports {unit(imp.module)} back: {_chain(back)}. Packages form no cycle."
    )


@pytest.mark.parametrize("imp", _params([imp for imports in INTERNAL.values() for imp in imports]))
def test_no_module_imports_one_that_imports_it_back(imp: Import) -> None:
    back = _path(imp.target, imp.module, lambda module: INTERNAL[module], str)
    assert not back, f"{imp}, which imports it back: {_chain(back)}."


@pytest.mark.parametrize("module", [m for m in MODULES if unit(m) == "ops/"])
def test_ops_imports_no_lightning(module: str) -> None:
    """``ops/`` is pure tensor code: no module it reaches, through the package's own imports, imports Lightning."""
    seen, queue = {module: [Import(module, 0, module)]}, deque([module])
    while queue:
        here = queue.popleft()
        for imp in IMPORTS[here]:
            if imp.target.partition(".")[0] in LIGHTNING:
                pytest.fail(f"{module} reaches Lightning: {_chain([*seen[here][1:], imp])}.")
            if _internal(imp.target) and imp.target not in seen:
                seen[imp.target] = [*seen[here], imp]
                queue.append(imp.target)


def _top_level(tree: ast.Module) -> Iterable[ast.stmt]:
    """The module-level statements, including those under a module-level ``if`` / ``try``."""
    for node in tree.body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            yield from node.body
            yield from node.orelse
            if isinstance(node, ast.Try):
                yield from (stmt for handler in node.handlers for stmt in handler.body)


def _bound_and_defined(tree: ast.Module) -> tuple[set[str], set[str], ast.expr | None]:
    """Names bound at module level, the subset the module defines itself (not imports), and the ``__all__`` value."""
    bound, defined, declared = set(), set(), None
    for node in _top_level(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and target.id == "__all__":
                    declared = node.value
                elif isinstance(target, ast.Name):
                    defined.add(target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).partition(".")[0] for alias in node.names}
    return bound | defined, defined, declared


PUBLIC = [m for m in MODULES if not any(part.startswith("_") for part in m.split("."))]


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(
            m,
            marks=[pytest.mark.xfail(strict=True, reason="owned by a branch being edited: add `__all__` at merge")]
            if m in WITHOUT_ALL
            else [],
        )
        for m in PUBLIC
    ],
)
def test_public_module_declares_all(module: str) -> None:
    """``__all__`` lists exactly the public names: all it lists exist, and every public definition is listed."""
    bound, defined, declared = _bound_and_defined(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    assert declared is not None, f"{module} has no `__all__`: list its public names."
    names = ast.literal_eval(declared)
    assert isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names), (
        f"{module}: `__all__` must be a literal list of strings."
    )
    assert len(set(names)) == len(names), f"{module}: `__all__` lists a name twice: {sorted(names)}."
    assert not set(names) - bound, f"{module}: `__all__` lists names the module does not bind: {set(names) - bound}."
    public = {name for name in defined if not name.startswith("_")}
    assert public <= set(names), f"{module}: public names missing from `__all__`: {sorted(public - set(names))}."


def _docstrings(tree: ast.Module) -> Iterable[ast.Constant]:
    """Every string statement: the docstrings of the module, classes and functions, and attribute docstrings."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.value


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(
            m,
            marks=[pytest.mark.xfail(strict=True, reason="owned by a branch being edited: replace its roles at merge")]
            if m in WITH_SPHINX_ROLES
            else [],
        )
        for m in MODULES
    ],
)
def test_docstrings_use_no_sphinx_roles(module: str) -> None:
    """mkdocstrings reads docstrings as Markdown: write `name` or [`name`][dotted.path], never :func:`name`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = [
        f"line {doc.lineno + doc.value.count(chr(10), 0, role.start())}: {role.group()}"
        for doc in _docstrings(tree)
        for role in SPHINX_ROLE.finditer(doc.value)
    ]
    assert not found, (
        f"{module} uses Sphinx roles, which the docs site shows literally: {found}. Write `name` in backticks, or "
        "[`name`][lightning_robustft.module.name] where the target is rendered in the API pages."
    )
