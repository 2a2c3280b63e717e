"""The import layering of framework/, models/ and scripts/: imports only point down, and nothing forms a circle.

Read with ``ast`` only (no module is imported, so no import-time side effects). Every import counts, also
those inside functions and ``importlib.import_module("...")`` with a literal name: a lazy import that runs
back up is still a back-import. A module's layer is that of the longest prefix listed in ``LAYERS``.
Imports inside one layer are allowed but must not form a circle (a package's ``__init__`` is a module).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("framework", "models", "scripts")

# The layer order, bottom first: a module may import only from its own layer or the ones before it.
LAYERS: list[tuple[str, ...]] = [
    ("framework.config",),  # schema, loading, validation: imports no framework module
    ("framework.fileio",),  # positional reads/writes, the one atomic write
    ("framework.mesh", "framework.sharding", "framework.data", "framework.hf", "framework.collectives",
     "framework.optimizer", "framework.distributed", "framework.handover", "framework.preemption", "framework.goodput",
     "framework.metrics", "framework.rundir", "framework.trackers"),
    ("models",),  # jax/flax, framework.config, framework.sharding only
    ("framework.memory", "framework.broadcast", "framework.pipeline"),
    ("framework.state",),
    ("framework.checkpoint", "framework.runs"),
    ("framework.train", "framework.generate"),
    ("framework.tryrun",),
    ("scripts",),
]
ROOT_PACKAGE_LAYER = {"framework": 0}  # the package's own __init__ (exact name only): `import framework` stays cheap


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module under the scanned directories."""
    out = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> int | None:
    if module in ROOT_PACKAGE_LAYER:
        return ROOT_PACKAGE_LAYER[module]
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    return layer


def _known_prefix(name: str, modules) -> str | None:
    """The longest prefix of ``name`` that is a scanned module (``a.b.c`` may name a function in ``a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _script_module(importer: str, name: str, modules) -> str | None:
    """A script's plain ``import _cli``: its own directory, or scripts/ (which the bench scripts put on sys.path)."""
    for base in (importer.rsplit(".", 1)[0], "scripts"):
        found = _known_prefix(f"{base}.{name}", modules)
        if found is not None and found != base:
            return found
    return None


def _resolve(importer: str, name: str, modules) -> str | None:
    if importer.startswith("scripts") and name.split(".")[0] not in SCANNED:
        return _script_module(importer, name, modules)
    return _known_prefix(name, modules)


def imports_of(module: str, path: Path, modules) -> list[tuple[str, int]]:
    """(imported scanned module, line) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rsplit(".", 1)[0]
                package = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{package}.{base}" if base else package
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            target = _resolve(module, name, modules)
            if target is not None and target != module:
                found.add((target, node.lineno))
    return sorted(found)


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    modules = module_files()
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def _where(modules, module: str, line: int) -> str:
    return f"{modules[module].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    modules = module_files()
    missing = sorted(m for m in modules if layer_of(m) is None)
    assert not missing, "modules in no layer of LAYERS (add them to the order): " + ", ".join(missing)


def test_no_back_imports():
    modules, graph = import_graph()
    bad = []
    for src, targets in sorted(graph.items()):
        for dst, line in targets:
            a, b = layer_of(src), layer_of(dst)
            if a is not None and b is not None and b > a:
                bad.append(f"{src} (layer {a}) -> {dst} (layer {b})  [{_where(modules, src, line)}]")
    assert not bad, f"{len(bad)} back-imports (an import that points up the layer order):\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    modules, graph = import_graph()
    cycles = _cycles({m: {dst for dst, _ in targets} for m, targets in graph.items()})
    lines = []
    for component in cycles:
        members = set(component)
        lines.append(f"circle of {len(component)} modules: {', '.join(component)}")
        lines += [f"  {src} -> {dst}  [{_where(modules, src, line)}]"
                  for src in component for dst, line in graph[src] if dst in members]
    assert not cycles, f"{len(cycles)} import circles:\n" + "\n".join(lines)


def test_the_scan_sees_lazy_relative_and_script_imports(tmp_path, monkeypatch):
    """The parser itself: an import inside a function, a relative import, import_module, a script's `import _cli`."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    files = {
        "framework/__init__.py": "",
        "framework/config/__init__.py": "def f():\n    from framework import state\n",
        "framework/config/schema.py": "from . import loading\nfrom .loading import x\n",
        "framework/config/loading.py": "import importlib\nimportlib.import_module('framework.state')\n",
        "framework/state.py": "import numpy\nfrom framework.config.schema import Config\n",
        "scripts/_cli.py": "",
        "scripts/bench/bench.py": "import _cli\nimport timing\n",
        "scripts/bench/timing.py": "",
        "models/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, graph = import_graph()
    edges = {(src, dst) for src, targets in graph.items() for dst, _ in targets}
    assert edges == {("framework.config", "framework.state"), ("framework.config.schema", "framework.config.loading"),
                     ("framework.config.loading", "framework.state"), ("framework.state", "framework.config.schema"),
                     ("scripts.bench.bench", "scripts._cli"), ("scripts.bench.bench", "scripts.bench.timing")}
