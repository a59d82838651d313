"""The package's layout: its import graph has no cycle, private modules stay inside their
package, the top level holds the library only, and ``import clipforge`` stays light.

The graph counts the imports that run when a module is imported: module-level statements
(including those under ``if``/``try``/``with`` and in class bodies), not those under
``if TYPE_CHECKING:`` nor inside functions.  ``from clipforge.x import y`` is an edge to
``clipforge.x.y`` where ``y`` is a submodule, to ``clipforge.x`` otherwise.  Importing a
submodule also runs its parents' ``__init__``; those implicit edges are not counted, or every
package whose ``__init__`` re-exports a submodule would be a cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import clipforge

ROOT = Path(clipforge.__file__).parent  # src/clipforge
PACKAGE = "clipforge"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def package_of(name: str) -> str:
    """The package a module belongs to: itself for a package's ``__init__``, else its parent."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def run_time_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when a module with this ``body`` is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue  # runs when called, not when imported
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from run_time_imports(node.body)
            yield from run_time_imports(node.orelse)
        else:  # a class body, try/except, with, for, while, match: their blocks run at import
            for field in ("body", "orelse", "finalbody"):
                yield from run_time_imports(getattr(node, field, []))
            for block in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
                yield from run_time_imports(block.body)


def targets(importer: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The clipforge modules an import statement in ``importer`` runs."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        if node.level:  # relative: resolved against the importer's package
            base = package_of(importer).split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = set()
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            names.add(submodule if submodule in MODULES else source)
    return {n for n in names if n in MODULES}


def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported clipforge module: line of the import}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges = graph.setdefault(name, {})
        for node in run_time_imports(ast.parse(path.read_text(), filename=str(path)).body):
            for target in targets(name, node) - {name}:
                edges.setdefault(target, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as a chain [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def chain(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    ) + f" -> {cycle[-1]}"


# --------------------------------------------------------------------------------------
# The graph's reading of an import, on known snippets
# --------------------------------------------------------------------------------------


def test_only_imports_that_run_at_import_time_are_counted():
    source = """
from typing import TYPE_CHECKING
import typing
from clipforge.model import clip
from clipforge.checkpoints import load
from . import loss
if TYPE_CHECKING:
    from clipforge.search import index
else:
    from clipforge.data import shapes
if typing.TYPE_CHECKING:
    import clipforge.train
try:
    import clipforge.tokenizer
except ImportError:
    from clipforge import transforms
def f():
    import clipforge.cli
class C:
    from clipforge import zeroshot
    def m(self):
        import clipforge.generate
"""
    found = set()
    for node in run_time_imports(ast.parse(source).body):
        found |= targets("clipforge.score", node)
    assert found == {"clipforge.model.clip", "clipforge.checkpoints", "clipforge.loss", "clipforge.data.shapes",
                     "clipforge.tokenizer", "clipforge.transforms", "clipforge.zeroshot"}
    assert targets("clipforge.model.clip", ast.parse("from . import vision").body[0]) == {"clipforge.model.vision"}
    assert targets("clipforge.model", ast.parse("from .clip import CLIP").body[0]) == {"clipforge.model.clip"}
    assert targets("clipforge.model.clip", ast.parse("from .. import loss").body[0]) == {"clipforge.loss"}


def test_a_cycle_is_found_and_reported_as_a_chain():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    cycle = find_cycle(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert chain(graph, cycle) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"b": 2}}) is None


# --------------------------------------------------------------------------------------
# The package itself
# --------------------------------------------------------------------------------------


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) == len(MODULES) > 20
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {chain(graph, cycle)}"


def test_private_modules_are_imported_only_inside_their_package():
    """``pkg._name`` (or anything below it) is imported only by modules of ``pkg`` itself:
    clipforge.model._inference only from clipforge.model.*, clipforge._tiled only from
    top-level modules such as clipforge.loss."""
    bad = []
    for importer, edges in import_graph().items():
        for target, line in edges.items():
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if package_of(importer) != owner:
                        bad.append(f"{importer} (line {line}) imports {target}, private to {owner}")
                    break
    assert not bad, "\n".join(bad)


def test_private_names_stay_in_their_module():
    """``from clipforge.x import _name`` (a private function, class or constant, not a module),
    anywhere in a module, functions included, only from a private module of the importer's own
    package (clipforge.loss takes the tiled functions from clipforge._tiled): one module does not
    lean on another's private helpers, as the CLI modules once did."""
    bad = []
    for importer, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            for alias in node.names:
                source = next(iter(targets(importer, ast.ImportFrom(node.module, [ast.alias("*")], node.level))),
                              None)
                if (source is None or not alias.name.startswith("_") or alias.name.startswith("__")
                        or f"{source}.{alias.name}" in MODULES):
                    continue
                if not (source.rpartition(".")[2].startswith("_") and package_of(source) == package_of(importer)):
                    bad.append(f"{importer} (line {node.lineno}) imports {alias.name} from {source}")
    assert not bad, "\n".join(bad)


def test_the_top_level_holds_the_library_only():
    entries = sorted(p.name for p in ROOT.iterdir() if p.name != "__pycache__")
    application = [e for e in entries
                   if e.removesuffix(".py").lstrip("_").split("_")[0] in {"cli", "train", "demo", "report", "run"}
                   and not (ROOT / e).is_dir()]
    assert not application, f"application modules at the top level of {ROOT}: {application}"
    assert len(entries) <= 22, f"{len(entries)} entries at the top level: {entries}"


def test_importing_clipforge_and_its_loss_stays_light():
    """The loss is usable without the model, the application or torch.distributed's users."""
    code = ("import json, sys; import clipforge, clipforge.loss; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('clipforge', 'matplotlib', 'faiss', 'fastapi', 'uvicorn', 'tensorboard'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    heavy = ("clipforge.distributed", "clipforge.cli", "clipforge.train", "clipforge.search", "clipforge.checkpoints",
             "clipforge.model", "clipforge.data", "matplotlib", "faiss", "fastapi", "uvicorn", "tensorboard")
    assert not [m for m in loaded if m in heavy or m.startswith(tuple(f"{h}." for h in heavy))], loaded
    assert {"clipforge", "clipforge.loss"} <= set(loaded)
