"""The package's layers: every import inside resbm_ds runs downward, and nothing imports in a circle.

A unit is a top-level module (`config`, `engine`, ...) or a subpackage (`model`, `wire`, ...). A
unit may import only units of a lower layer; inside a subpackage the modules may import each
other, without cycles. Every import counts, also one inside a function. A new module must be given
a layer here, so the layout stays a decision rather than an accident.

And the compatibility room: every patch of DeepSpeed or torch internals lives in resbm_ds/compat.py
(tests/test_compat.py checks each still fits the installed packages). No other module assigns to an
attribute of DeepSpeed or torch (`test_no_patches_outside_compat`).
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "resbm_ds"

LAYERS = [
    {"system"},                                   # system: path kinds, file hashes, free ports, CPU env
    {"cli", "compat", "wire_bytes"},              # cli: one-line user errors, checked argument types;
                                                  # compat: every patch of DeepSpeed / torch internals;
                                                  # wire_bytes: the dtype table, the wire-bytes formulas
    {"config"},                                   # config: schema and validation, the dtype table
    {"model", "wire", "data", "metrics", "checkpoints"},   # parts: the network, the wire chain, data,
                                                  # metrics.jsonl, the checkpoint store
    {"optim", "hf", "slurm_layout", "run_dir", "watch", "sync"},   # optimizers, transformers interop,
                                                  # layout report, run directories, launcher /
                                                  # progress / peer watches, the outer loop across sites
    {"launch"},                                   # launch: every check before launch, the frozen LaunchPlan
    {"engine"},                                   # engine: process group, pipeline engine, wire chain
    {"trainer", "export"},                        # loop: the training run; consolidated models
    {"train"},                                    # the command line of training (trainer loads on use)
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


# ---- the compatibility room ----------------------------------------------------------------------
COMPAT = PACKAGE / "compat.py"
PATCHED_ROOTS = ("deepspeed", "torch")
OBJECT_NAMES = {"engine", "optimizer", "checkpoint_engine"}   # DeepSpeed's engine and its parts


def compat_names(variable: str) -> frozenset[str]:
    """A frozenset({...}) literal of compat.py, read without importing DeepSpeed."""
    for node in ast.parse(COMPAT.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            return frozenset(ast.literal_eval(node.value.args[0]))
    raise AssertionError(f"compat.py defines no {variable}")


def deepspeed_or_torch_names(tree: ast.AST) -> set[str]:
    """Names a module binds to deepspeed or torch modules and objects (`import torch.distributed as
    dist`, `from deepspeed.runtime.pipe import p2p`, `from torch import nn`, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PATCHED_ROOTS:
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PATCHED_ROOTS:
            names |= {a.asname or a.name for a in node.names}
    return names


def flat_targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    elif isinstance(node, ast.Delete):
        targets = node.targets
    else:
        return []
    out = []
    while targets:
        t = targets.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            targets.extend(t.elts)
        elif isinstance(t, ast.Starred):
            targets.append(t.value)
        else:
            out.append(t)
    return out


def chain_names(node: ast.AST) -> list[str]:
    """The names an attribute target's object is reached through: `rt.engine.optimizer` -> [rt, engine, optimizer]."""
    names = []
    while True:
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Name):
            return [node.id, *reversed(names)]
        else:
            return list(reversed(names))


def patches_in(source: str, filename: str, patched: frozenset[str], private: frozenset[str],
               environment: frozenset[str]) -> list[str]:
    """Where `source` patches DeepSpeed or torch: `setattr`/`delattr` calls; assignments to an
    attribute of a deepspeed/torch import (`p2p.send = ...`, `torch.x = ...`), of DeepSpeed's engine
    or its optimizer or checkpoint engine, or of a name compat patches (`p.use_muon = ...`); any use
    of the private internals compat patches or reads (`p2p._grid`, an override of
    `_partition_layers`); the environment variables compat manages."""
    tree = ast.parse(source, filename)
    imported = deepspeed_or_torch_names(tree)
    found = []

    def hit(node, what):
        found.append(f"{filename}:{node.lineno}: {what}: {ast.unparse(node)[:100]}")

    for node in ast.walk(tree):
        for t in flat_targets(node):
            if not isinstance(t, ast.Attribute):
                continue
            through = chain_names(t.value)
            if through and through[0] in imported:
                hit(t, f"assigns to an attribute of {through[0]} (deepspeed/torch)")
            elif t.attr in patched:
                hit(t, f"assigns to .{t.attr}, which compat patches")
            elif OBJECT_NAMES & set(through[1:] if through and through[0] == "self" else through):
                hit(t, "assigns to an attribute of DeepSpeed's engine")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            hit(node, f"calls {node.func.id}")
        if isinstance(node, ast.Attribute) and node.attr in private:
            hit(node, f"uses DeepSpeed/torch's private .{node.attr}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in private:
            found.append(f"{filename}:{node.lineno}: overrides DeepSpeed/torch's private {node.name}")
        if isinstance(node, ast.Constant) and node.value in environment:
            hit(node, f"handles the environment variable {node.value}, which compat manages")
    return found


@pytest.fixture(scope="module")
def compat_rules():
    patched = compat_names("PATCHED_ATTRIBUTES")
    return dict(patched=patched, private=frozenset(n for n in patched if n.startswith("_")),
                environment=compat_names("PATCHED_ENVIRONMENT"))


def test_no_patches_outside_compat(compat_rules):
    found = [f for name, path in modules().items() if path != COMPAT
             for f in patches_in(path.read_text(), str(path.relative_to(PACKAGE.parent)), **compat_rules)]
    assert not found, ("DeepSpeed/torch patched outside resbm_ds/compat.py (move it there, as a named "
                       "function with a PatchPoint):\n" + "\n".join(f"  {f}" for f in found))


@pytest.mark.parametrize("plant", [
    "from deepspeed.runtime.pipe import p2p\np2p.send = print",
    "import torch.distributed as dist\ndist.all_reduce, x = print, 1",
    "import torch\ntorch.backends.cudnn.allow_tf32 = True",
    "def f(p):\n    p.model_parallel = True",
    "def f(opt):\n    setattr(opt, 'overflow', True)",
    "def f(rt):\n    rt.engine.set_dataiterator = print",
    "def f(self):\n    self.engine.anything = 1",
    "def f(opt):\n    del opt.check_overflow",
    "def f(sched):\n    sched._last_lr += [1]",
    "def f(grid):\n    return grid._topo",
    "class P:\n    def _partition_layers(self, method):\n        pass",
    "import os\nos.environ.pop('LOCAL_SIZE')",
])
def test_the_patch_check_sees_a_planted_patch(compat_rules, plant):
    assert patches_in(plant, "planted.py", **compat_rules)


def test_the_patch_check_passes_our_own_objects(compat_rules):
    ok = ("import torch\nclass A:\n    def __init__(self, engine):\n        self.engine, self.norm = engine, None\n"
          "        self._what = 1\nx = torch.zeros(1)\ndef f(ids, attn, cfg):\n    ids.current = 1\n"
          "    attn.decoding = None\n    cfg._checked_world_size = 2\n    object.__setattr__(cfg, 'a', 1)")
    assert patches_in(ok, "ok.py", **compat_rules) == []


def test_no_test_module_imports_another():
    """Shared test helpers live in tests/conftest.py; a test module imports none of its siblings."""
    found = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert not found, found

