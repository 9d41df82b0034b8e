"""The package's layers: every import inside resbm_ds runs downward, and nothing imports in a circle.

A unit is a top-level module (`config`, `engine`, ...) or a subpackage (`model`, `wire`, ...). A
unit may import only units of a lower layer; inside a subpackage the modules may import each
other, without cycles. Every import counts, also one inside a function. A new module must be given
a layer here, so the layout stays a decision rather than an accident.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "resbm_ds"

LAYERS = [
    {"cli"},                                      # cli: one-line user errors, checked argument types
    {"config"},                                   # config: schema and validation, the dtype table
    {"model", "wire", "data", "metrics", "manifest"},   # parts: the network, the wire chain, data,
                                                  # metrics.jsonl, checkpoint manifests
    {"optim", "hf", "slurm_layout", "checkpoints", "run_dir", "watch", "sync"},   # optimizers, transformers
                                                  # interop, layout report, checkpoint files, run
                                                  # directories, launcher / progress / peer watches,
                                                  # the outer loop across sites
    {"engine"},                                   # engine: process group, pipeline engine, wire chain
    {"train", "export"},                          # loop: the training loop; consolidated models
    {"netem"},                                    # a real network: namespaces, shaped links, launches
    {"generate", "spectrum", "corpus", "bench"},  # tools (docs/development.md "How it is built" has this table)
    {"harness"},                                  # lm-eval on exports (uses generate's loaders)
]
LAYER_OF = {unit: k for k, units in enumerate(LAYERS) for unit in units}
# The package root sits above everything: importing resbm_ds registers ResBM with transformers'
# Auto classes (hf/modeling.py), and no module may import the root.
LAYER_OF["__init__"] = len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The resbm_ds modules `name` imports, anywhere in the file, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("resbm_ds")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("resbm_ds"):
                continue
            for alias in node.names:   # `from .wire import chain` imports the module wire.chain
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m != name}


def unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_every_unit_has_a_layer(graph):
    units = {unit(m) for m in graph} - {"__init__"}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"
    assert set(LAYER_OF) - {"__init__"} <= units, f"LAYERS names units that do not exist: {sorted(set(LAYER_OF) - units)}"


def test_imports_run_downward(graph):
    upward = [(m, t) for m, targets in graph.items() for t in targets
              if unit(m) != unit(t) and not LAYER_OF.get(unit(t), -1) < LAYER_OF.get(unit(m), -1)]
    assert not upward, "imports that do not run to a lower layer:\n" + "\n".join(f"  {m} -> {t}" for m, t in upward)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}     # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_what_it_checks(graph):
    """The rules above would pass on an empty graph: make sure the walk finds real imports,
    relative, nested and `from package import module` ones."""
    assert "resbm_ds.config" in graph["resbm_ds.model.layers"]          # from ..config import
    assert "resbm_ds.wire.chain" in graph["resbm_ds.engine"]           # from .wire import chain
    assert "resbm_ds.model.pipeline" in graph["resbm_ds.model.causal_lm"]
    assert sum(len(t) for t in graph.values()) > 40
