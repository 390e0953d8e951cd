"""The package's import graph: no circle, and every dependency between its modules stated at the
top of the importing module (no import of a pkd module hidden inside a function).

Run as a script to print the graph: ``python tests/test_imports.py``.
"""
import ast
import os
import sys
from typing import Dict, List, Optional, Set

import pkd

PACKAGE_DIR = os.path.dirname(os.path.abspath(pkd.__file__))


def _module_name(root: str, path: str) -> str:
    """``<root>/losses/fgd.py`` -> ``pkd.losses.fgd``; a package's ``__init__.py`` -> its name."""
    parts = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: str) -> Dict[str, str]:
    """{module name: path} of every .py file under the package directory ``root``."""
    found = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                found[_module_name(root, path)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool, modules: Set[str]) -> List[str]:
    """The package's modules that one import statement of ``module`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in modules:
        return []
    # ``from .modeling import swin`` names the submodule, ``from .losses import X`` the package.
    targets = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
    return targets or [source]


def import_graph(root: str = PACKAGE_DIR, local: bool = False) -> Dict[str, Set[str]]:
    """{module: the package's modules it imports}, from the source alone (ast).

    Args:
        local: False: the imports a module runs when it is imported (module level, including
            inside ``if``/``try``); True: the imports inside functions and classes instead.
    """
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        nested = set()
        for scope in ast.walk(tree):
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                nested.update(id(n) for n in ast.walk(scope) if n is not scope)
        graph[name] = {
            target
            for node in ast.walk(tree)
            if (id(node) in nested) == local
            for target in _imported(node, name, is_package, set(modules))
            if target != name
        }
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle ``[a, b, ..., a]`` of ``graph``, or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert {"pkd.checkpoint", "pkd.meta_arch", "pkd.teacher", "pkd.engine"} <= set(graph)
    assert "pkd.checkpoint" in graph["pkd.teacher"] and "pkd.teacher" in graph["pkd.meta_arch"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_package_import_inside_a_function():
    local = {module: targets for module, targets in import_graph(local=True).items() if targets}
    assert local == {}, f"imports of pkd modules inside functions (move them to the top): {local}"


def test_the_checks_catch_a_circle_and_a_local_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub.b import f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (package / "sub" / "c.py").write_text("from .. import a\nfrom . import b\n")
    assert find_cycle(import_graph(str(package))) is None
    assert import_graph(str(package), local=True)["pkg.sub.b"] == {"pkg.a"}
    assert import_graph(str(package))["pkg.sub.c"] == {"pkg.a", "pkg.sub.b"}
    (package / "sub" / "b.py").write_text("from ..a import g\n")
    assert find_cycle(import_graph(str(package))) == ["pkg.a", "pkg.sub.b", "pkg.a"]


if __name__ == "__main__":
    graph = import_graph()
    for module in sorted(graph):
        print(f"{module} -> {', '.join(sorted(graph[module])) or '-'}")
    cycle = find_cycle(graph)
    print("cycle: " + (" -> ".join(cycle) if cycle else "none"))
    sys.exit(1 if cycle else 0)
