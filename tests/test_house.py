"""The shape of the house, checked statically on the import graph of the package (STYLE.md, "The shape of the
house"): ``cli`` -> ``commands.<stage>`` -> library modules -> ``kernels``.

Every module under ``llamactl/`` and ``kernels/`` (installed as ``llamactl.kernels``) is parsed with ``ast``; its
imports are those at module level and those inside functions (``llamactl.cli`` and the commands import lazily, and a
function-level import still makes one module depend on another), ``from . import x`` forms resolved against the
module's package. Imports under ``if TYPE_CHECKING:`` are annotations only: they count for the layering rules but
are not run, so they make no cycle. Nothing is imported: the check needs neither torch nor a GPU.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"llamactl": ROOT / "llamactl", "llamactl.kernels": ROOT / "kernels"}
CLI = "llamactl.cli"
COMMANDS = "llamactl.commands"
KERNELS = "llamactl.kernels"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported llamactl module
    line: int
    function_level: bool
    type_checking: bool

    def __str__(self) -> str:
        where = "in a function" if self.function_level else "at module level"
        return f"{self.source}:{self.line} imports {self.target} ({where})"


def package_modules(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages (a package is its ``__init__``)."""
    modules = {}
    for prefix, root in packages.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_imports(name: str, source: str, known: set[str], is_package: bool = False) -> list[Import]:
    """The imports of llamactl modules (names in ``known``) that module ``name``'s source makes, anywhere in it."""
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(dotted: str) -> str | None:
        """The deepest known module of ``dotted`` (``a.b.func`` -> ``a.b``)."""
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def add(target: str | None, node: ast.stmt, function_level: bool, type_checking: bool) -> None:
        imp = Import(name, target, node.lineno, function_level, type_checking) if target not in (None, name) else None
        if imp is not None and imp not in found:  # ``from m import a, b``: one import of m
            found.append(imp)

    def visit(node: ast.AST, function_level: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(resolve(alias.name), node, function_level, type_checking)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                head = ".".join(base + ([node.module] if node.module else []))
            else:
                head = node.module or ""
            for alias in node.names:
                # ``from pkg import mod`` imports the module pkg.mod; ``from mod import func`` the module mod
                full = f"{head}.{alias.name}"
                add(full if full in known else resolve(head), node, function_level, type_checking)
        for child in ast.iter_child_nodes(node):
            inner = function_level or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = type_checking or (
                isinstance(node, ast.If) and _is_type_checking(node.test) and any(child is b for b in node.body)
            )
            visit(child, inner, guarded)

    visit(ast.parse(source, filename=name), False, False)
    return found


def import_graph(modules: dict[str, Path] | None = None) -> list[Import]:
    modules = package_modules() if modules is None else modules
    known = set(modules)
    return [
        imp
        for name, path in modules.items()
        for imp in module_imports(name, path.read_text(encoding="utf-8"), known, path.name == "__init__.py")
    ]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of a graph (module -> the modules it imports): for each strongly connected component of more
    than one module (or a module importing itself), a shortest cycle through each of its members, each cycle given
    once, starting at its smallest name."""
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm; the package's graph is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in nodes:
        if v not in index:
            strongconnect(v)

    found: list[list[str]] = []
    for component in components:
        members = set(component)
        if len(component) == 1 and component[0] not in graph.get(component[0], ()):
            continue
        for start in component:
            # breadth-first from start back to start, inside the component: a shortest cycle through start
            parent: dict[str, str | None] = {start: None}
            queue = deque([start])
            last = None  # the member that imports start again
            while queue and last is None:
                v = queue.popleft()
                for w in sorted(graph.get(v, ())):
                    if w == start:
                        last = v
                        break
                    if w in members and w not in parent:
                        parent[w] = v
                        queue.append(w)
            assert last is not None, (start, component)
            path: list[str] = []
            v = last
            while v is not None:
                path.append(v)
                v = parent[v]
            path.reverse()
            k = path.index(min(path))
            cycle = path[k:] + path[:k]
            if cycle not in found:
                found.append(cycle)
    return found


def _message(title: str, imports: list[Import]) -> str:
    return title + ":\n  " + "\n  ".join(str(i) for i in imports)


# ------------------------------------------------------------------------------------------- the cycle finder


def test_cycle_finder_on_a_hand_made_graph():
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},  # a -> b -> c -> a
        "d": {"b", "e"},  # b -> d -> b, in the same component
        "e": set(),
        "f": {"f"},  # a module importing itself
        "g": {"a"},  # reaches a cycle, is on none
    }
    found = cycles(graph)
    assert sorted(found) == [["a", "b", "c"], ["b", "d"], ["f"]], found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_imports_are_found_at_every_level_and_resolved():
    known = {"llamactl", "llamactl.commands", "llamactl.commands.chat", "llamactl.reward", "llamactl.kernels",
             "llamactl.kernels._triton", "llamactl.kernels.attention"}  # fmt: skip
    source = (
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "from . import _triton\n"
        "from .attention import sdpa_gqa\n"
        "if TYPE_CHECKING:\n"
        "    from llamactl.reward import Judge\n"
        "def f():\n"
        "    from llamactl.commands.chat import Chatter\n"
        "    class C:\n"
        "        def g(self):\n"
        "            import llamactl.commands\n"
    )
    found = module_imports("llamactl.kernels.rmsnorm", source, known)
    got = [(i.target, i.line, i.function_level, i.type_checking) for i in found]
    assert got == [
        ("llamactl.kernels._triton", 3, False, False),
        ("llamactl.kernels.attention", 4, False, False),
        ("llamactl.reward", 6, False, True),
        ("llamactl.commands.chat", 8, True, False),
        ("llamactl.commands", 11, True, False),
    ], got
    from_package = module_imports("llamactl.kernels", "from .attention import sdpa_gqa\n", known, is_package=True)
    assert [i.target for i in from_package] == ["llamactl.kernels.attention"]


# ----------------------------------------------------------------------------------------------- the package


def test_the_package_is_all_found():
    modules = package_modules()
    assert {CLI, "llamactl.commands.chat", "llamactl.model", "llamactl.kernels.rmsnorm"} <= set(modules)
    assert import_graph(modules), "no imports found: the parser sees nothing"


def test_no_library_module_imports_a_command():
    library = [i for i in import_graph() if not (i.source == CLI or _within(i.source, COMMANDS))]
    bad = [i for i in library if _within(i.target, COMMANDS)]
    assert not bad, _message("library modules import llamactl.commands (move what they need into the library)", bad)


def test_no_command_imports_another_command():
    bad = [
        i
        for i in import_graph()
        if i.source.startswith(COMMANDS + ".") and i.target.startswith(COMMANDS + ".") and i.target != i.source
    ]
    assert not bad, _message("command modules import each other (what they share belongs in the library)", bad)


def test_no_import_cycle():
    imports = [i for i in import_graph() if not i.type_checking]
    graph: dict[str, set[str]] = {}
    for i in imports:
        graph.setdefault(i.source, set()).add(i.target)
    found = cycles(graph)
    lines = []
    for cycle in found:
        lines.append(" -> ".join([*cycle, cycle[0]]))
        for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            lines += [f"    {i}" for i in imports if i.source == a and i.target == b]
    assert not found, f"{len(found)} import cycle(s) among llamactl modules:\n  " + "\n  ".join(lines)


def test_kernels_import_nothing_of_llamactl_outside_kernels():
    bad = [i for i in import_graph() if _within(i.source, KERNELS) and not _within(i.target, KERNELS)]
    assert not bad, _message("llamactl.kernels imports the rest of llamactl (kernels stand alone)", bad)


def test_nothing_imports_the_cli():
    bad = [i for i in import_graph() if i.target == CLI]
    assert not bad, _message("modules import llamactl.cli (only the entry point, llamactl.cli:main, runs it)", bad)
    assert 'llamactl = "llamactl.cli:main"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
