"""The package's layers: every import inside flowvae/ points down, never up or sideways into a circle, and no
module imports another's private name. The layers are the folders (and the few base modules), from the bottom:

    base      errors, files, stopping, cores, identity, progress (no flowvae import but each other)
    parts     data/, flows/, metrics/          (events, maps, math; each stands alone)
    models    models/                          (the VAE family and drawing from it)
    training  training/, config                (the loop; the schema, checked against the registries)
    services  results/, search/                (the table, tracking, plots; Optuna without Hydra)
    run       run/                             (one run start to finish)
    front     sweeps/, commands/               (Hydra's plugins; the commands)
    entry     app, cli                         (the command line)

A new module goes in the folder whose job it does; a test here fails if it imports from a layer above its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "flowvae"
LAYERS = [
    {"flowvae.errors", "flowvae.files", "flowvae.stopping", "flowvae.cores", "flowvae.identity", "flowvae.progress",
     "flowvae"},
    {"flowvae.data", "flowvae.flows", "flowvae.metrics"},
    {"flowvae.models"},
    {"flowvae.training", "flowvae.config"},
    {"flowvae.results", "flowvae.search"},
    {"flowvae.run"},
    {"flowvae.sweeps", "flowvae.commands"},
    {"flowvae.app", "flowvae.cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _unit(module: str) -> str:
    """The layer unit of a module: its folder under flowvae/ (flowvae.metrics.jets -> flowvae.metrics), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(module: str) -> int:
    unit = _unit(module)
    for number, layer in enumerate(LAYERS):
        if unit in layer:
            return number
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS in {Path(__file__).name}")


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every flowvae import in ``path``, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("flowvae"):
            names = [alias.name for alias in node.names]
            sub = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES], node.lineno))
            found += [(module, [], node.lineno) for module in sub]
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("flowvae")]
    return found


def _graph() -> dict[str, set[str]]:
    graph = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(path):
            while target not in MODULES:
                target = target.rpartition(".")[0]
            if target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    """A module imports only from its own layer unit or a lower layer."""
    upward = [f"{target} (line {line})" for target, _, line in _imports(MODULES[module])
              if _unit(target) != _unit(module) and _layer(target) > _layer(module)]
    assert not upward, f"{module} (layer {_layer(module)}) imports upward: {', '.join(upward)}"


def test_no_import_circle():
    graph, index, low, stack, on, circles = _graph(), {}, {}, [], set(), []

    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                circles.append(" <-> ".join(sorted(component)))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_no_private_name_crosses_modules():
    crossing = [f"{module}: {name} from {target}" for module, path in MODULES.items()
                for target, names, _ in _imports(path) for name in names
                if name.startswith("_") and not name.startswith("__") and target != module]
    assert not crossing, f"private names imported across modules: {crossing}"


def test_a_layer_violation_is_found(tmp_path, monkeypatch):
    """The check itself: a base module importing from run/ is reported."""
    fake = tmp_path / "errors.py"
    fake.write_text("from flowvae.run.job import run\n")
    monkeypatch.setitem(MODULES, "flowvae.errors", fake)
    with pytest.raises(AssertionError, match="imports upward"):
        test_imports_point_down("flowvae.errors")
