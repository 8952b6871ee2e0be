"""The packages' imports point down and never go round in a circle: tbn_runtime (the base)
imports neither tbn_train nor tbn_export, tbn_train not tbn_export, and inside tbn_runtime each
layer of the stream stack imports only the layers below it (docs/design.md). Every import is
counted, those inside functions too (a lazy import is still an arrow)."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tbn_runtime", "tbn_train", "tbn_export")   # bottom up
#: tbn_runtime's stream stack, bottom up; a module not named here sits on layer 1 (the
#: vocabulary, files, sources, outputs, decoder, writers, ...); a name covers its subpackage
RUNTIME_LAYERS = (("tbn_runtime.errors",), (), ("tbn_runtime.backends",),
                  ("tbn_runtime.segmenter",), ("tbn_runtime.driver", "tbn_runtime.report"),
                  ("tbn_runtime.stream", "tbn_runtime.cluster"),
                  ("tbn_runtime.cli", "tbn_runtime.__main__", "tbn_runtime"))


def modules() -> Dict[str, str]:
    """module name -> file, for every module of the three packages."""
    found = {}
    for pkg in PACKAGES:
        for d, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = [x for x in dirs if not x.startswith((".", "__"))]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                    found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                        os.path.join(d, f)
    return found


def imports(name: str, path: str, known: Set[str]) -> Set[str]:
    """The project's modules that module `name` imports (anywhere in it)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    got = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[:len(parts) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                got.add(t)
    return got


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def _layer(name: str) -> int:
    for i, names in enumerate(RUNTIME_LAYERS):
        if any(name == n or name.startswith(n + ".") for n in names if n != "tbn_runtime"):
            return i
    return len(RUNTIME_LAYERS) - 1 if name == "tbn_runtime" else 1


def test_the_walk_sees_the_imports(graph):
    assert "tbn_runtime.sources" in graph["tbn_runtime.decoder"]
    assert "tbn_runtime.driver" in graph["tbn_runtime.cluster.chunks"]
    assert "tbn_runtime.console" in graph["tbn_train.evaluate"]   # `from pkg import module`
    assert len(graph) > 60


def test_packages_import_only_those_below(graph):
    up = [(a, b) for a, bs in graph.items() for b in bs
          if PACKAGES.index(b.split(".")[0]) > PACKAGES.index(a.split(".")[0])]
    assert not up, f"imports that point up (base <- train <- export): {up}"


def test_the_runtime_stack_points_down(graph):
    up = [(a, b) for a, bs in graph.items() if a.startswith("tbn_runtime")
          for b in bs if b.startswith("tbn_runtime") and _layer(b) > _layer(a)]
    assert not up, f"tbn_runtime imports that point up its stack: {up}"
    assert _layer("tbn_runtime.cuda") < _layer("tbn_runtime.backends.trt")


def test_no_circles(graph):
    """Depth-first search for a back edge; the circle found is named."""
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError(" -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
