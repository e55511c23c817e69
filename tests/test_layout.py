"""Meta-tests of the layout DESIGN.md fixes: no import cycles (deferred imports included),
no top-level module named like a stdlib or dependency module, env knobs read only in
ckpt/config.py, and hookspecs that all follow the documented conventions.

They read the source with ``ast``, so they see every import, not only those a test run
happens to execute.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ckpt.hooks import hookspecs

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ckpt"


# -- the import graph --------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    target: str
    where: str  # file:line of the import statement


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package rooted at ``package_dir``."""
    base = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth (function bodies included), but not
    the body of an ``if TYPE_CHECKING:`` block, which only the type checker reads."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _runtime_imports(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module that executing ``import name`` runs last: the longest known prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(package_dir: Path) -> dict[str, list[Edge]]:
    """Module -> the package's modules it imports.

    ``from pkg import x`` points at ``pkg.x`` when that is a module and at ``pkg`` (its
    ``__init__``) otherwise. Importing ``pkg.mod`` also runs ``pkg/__init__``, but that implicit
    edge is left out: counting it would make every package whose ``__init__`` re-exports its
    own submodules a cycle. Such an ``__init__`` is fine as long as no submodule imports the
    package itself back, which the explicit edges do catch.
    """
    modules = module_names(package_dir)
    top = package_dir.name
    graph: dict[str, list[Edge]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        edges = []
        for node in _runtime_imports(tree):
            where = f"{path.relative_to(package_dir.parent)}:{node.lineno}"
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base != top and not base.startswith(top + "."):
                    continue
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _resolve(base, modules)
                    for alias in node.names
                ]
            edges += [Edge(t, where) for t in targets if t is not None and t != mod]
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[tuple[str, Edge]]]:
    """One cycle per strongly connected component of more than one module, as its path of
    ``(importer, edge)`` steps."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small, so recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:
        start = min(comp)
        # breadth-first inside the component: the shortest way from ``start`` back to it
        came_from: dict[str, tuple[str, Edge]] = {}
        frontier = [start]
        while frontier and start not in came_from:
            nxt = []
            for v in frontier:
                for e in graph[v]:
                    if e.target in comp and e.target not in came_from:
                        came_from[e.target] = (v, e)
                        nxt.append(e.target)
            frontier = nxt
        path = []
        node = start
        while True:
            v, e = came_from[node]
            path.append((v, e))
            node = v
            if node == start:
                break
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[tuple[str, Edge]]) -> str:
    chain = " -> ".join([cycle[0][0]] + [e.target for _, e in cycle])
    steps = "\n".join(f"    {v} imports {e.target} at {e.where}" for v, e in cycle)
    return f"{chain}\n{steps}"


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40, "the graph builder found too few modules: is ckpt/ where it used to be?"
    assert any(e.target == "ckpt.api" for e in graph["ckpt"]), "ckpt/__init__ re-exports the API"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among ckpt's modules (deferred imports included):\n" + "\n".join(
        describe(c) for c in cycles
    )


FAKE = {
    "__init__.py": "from pkg.sub import thing\n",
    "sub/__init__.py": "from pkg.sub.a import thing\n",
    "sub/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import x\nthing = 1\n",
    "b.py": "def late():\n    from pkg.c import y\n",
    "c.py": "from . import b\ny = 1\n",
}


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_cycle_finder_sees_deferred_and_relative_imports_but_not_type_checking_ones(tmp_path):
    graph = import_graph(_fake_package(tmp_path, FAKE))
    assert [e.target for e in graph["pkg"]] == ["pkg.sub"]
    assert [e.target for e in graph["pkg.sub"]] == ["pkg.sub.a"], "from pkg.sub import a-module: the module"
    assert graph["pkg.sub.a"] == [], "an import under TYPE_CHECKING never runs"
    (cycle,) = find_cycles(graph)
    assert describe(cycle).splitlines()[0] == "pkg.b -> pkg.c -> pkg.b"
    assert "pkg/b.py:2" in describe(cycle), "the deferred import is reported where it is"


def test_a_submodule_importing_its_package_back_is_a_cycle(tmp_path):
    files = dict(FAKE, **{"c.py": "y = 1\n", "sub/a.py": "import pkg.sub\nthing = 1\n"})
    (cycle,) = find_cycles(import_graph(_fake_package(tmp_path, files)))
    assert describe(cycle).splitlines()[0] == "pkg.sub -> pkg.sub.a -> pkg.sub"


# -- names at ckpt's top level -----------------------------------------------------------

# Names that DESIGN.md's layout itself gives to top-level modules of ckpt although the
# stdlib has them too. In Python 3 every import is absolute, so ``import io`` inside ckpt
# (or anywhere) still finds the stdlib module, never ``ckpt.io``; a collision matters only
# to a reader, and to a script that puts ckpt/ itself on sys.path. Anything beyond this list
# (a ckpt/gc.py, ckpt/builtins.py, ckpt/torch.py) must be a deliberate decision recorded here.
SANCTIONED = {
    "codecs": "the codecs/ stage of the layout",
    "io": "the io/ stage of the layout",
    "types": "types.py, the layout's module of records",
}


def _dependency_top_level_names() -> set[str]:
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    wanted = {norm(m.group(0)) for r in importlib.metadata.requires("ckpt") or [] if (m := re.match(r"[\w.-]+", r))}
    return {
        top
        for top, dists in importlib.metadata.packages_distributions().items()
        if any(norm(d) in wanted for d in dists)
    }


def test_no_top_level_module_shadows_a_stdlib_or_dependency_module():
    ours = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    ours |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    dependencies = _dependency_top_level_names()
    assert {"torch", "numpy", "fsspec"} <= dependencies, "dependency names not found: is ckpt installed?"
    clashes = {name: "stdlib" for name in ours & set(sys.stdlib_module_names)}
    clashes |= {name: "a dependency" for name in ours & dependencies}
    unsanctioned = {name: kind for name, kind in clashes.items() if name not in SANCTIONED}
    assert not unsanctioned, f"ckpt modules named like {unsanctioned} (see DESIGN.md, Layout)"
    assert set(SANCTIONED) <= ours, "a sanctioned name is no longer used: drop it from SANCTIONED"


# -- environment knobs -------------------------------------------------------------------

KNOB = re.compile(r"\bCKPT_[A-Z0-9_]*[A-Z0-9]\b")
ENV_ACCESS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def _env_accesses(path: Path) -> list[str]:
    """file:line of every use of the process environment through ``os``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    os_names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname for a in node.names if a.name == "os" and a.asname}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENV_ACCESS:
            if isinstance(node.value, ast.Name) and node.value.id in os_names:
                found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name in ENV_ACCESS for a in node.names):
            found.append(node.lineno)
    return [f"{path.relative_to(ROOT)}:{line}" for line in found]


def test_the_environment_is_read_only_in_config():
    config = PACKAGE / "config.py"
    assert _env_accesses(config), "the scan finds config.py's own reads"
    elsewhere = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != config for hit in _env_accesses(path)]
    assert not elsewhere, f"environment read outside ckpt/config.py: {elsewhere}"


def test_every_knob_named_in_ckpt_is_read_and_documented_in_config():
    config = PACKAGE / "config.py"
    named = {
        (name, f"{path.relative_to(ROOT)}")
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != config
        for name in KNOB.findall(path.read_text(encoding="utf-8"))
    }
    tree = ast.parse(config.read_text(encoding="utf-8"))
    documented: set[str] = set()
    read: dict[str, str] = {}  # knob -> the function whose body names it as a literal
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef):
            documented |= set(KNOB.findall(ast.get_docstring(fn) or ""))
            for node in ast.walk(fn):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and KNOB.fullmatch(node.value):
                    read[node.value] = fn.name
    assert read, "no knob read found in ckpt/config.py"
    unknown = sorted((name, where) for name, where in named if name not in read)
    assert not unknown, f"env knobs named outside ckpt/config.py but not read there: {unknown}"
    undocumented = sorted(f"{name} (read in {fn}())" for name, fn in read.items() if name not in documented)
    assert not undocumented, f"knobs config.py reads without a docstring naming them: {undocumented}"


# -- hookspecs ---------------------------------------------------------------------------
# tests/hooks/test_hookspecs.py checks each ``ckpt_*`` spec's summary and :param: lines
# and that each is called; these make sure it sees every spec there is.


def _marked_specs() -> dict[str, object]:
    marker = hookspecs.hookspec.project_name + "_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)}


def test_every_hookspec_is_named_ckpt_and_defined_in_hookspecs():
    specs = _marked_specs()
    assert specs, "no hookspec found"
    assert not [n for n in specs if not n.startswith("ckpt_")], "hook names start with ckpt_ (STYLE.md)"
    elsewhere = [
        f"{path.relative_to(ROOT)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "hookspecs.py" and "HookspecMarker" in path.read_text(encoding="utf-8")
    ]
    assert not elsewhere, f"hookspecs are declared only in ckpt/hooks/hookspecs.py, not in {elsewhere}"


def test_firstresult_hookspecs_say_so():
    marker = hookspecs.hookspec.project_name + "_spec"
    for name, fn in _marked_specs().items():
        if getattr(fn, marker).get("firstresult"):
            assert "Stops at first non-None result" in (inspect.getdoc(fn) or ""), (
                f"{name} is firstresult: its docstring says 'Stops at first non-None result' (STYLE.md)"
            )
