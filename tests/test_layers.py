"""One direction through the package: every import of lilt_ds (function-level ones included) goes to
its own layer or one below, and no module reaches itself through its imports. The core holds no
benchmark runner and no mock.

Layers, lowest first (docs/architecture.md): the base every layer may use, runtime, models, losses/ops, data,
the experiment config's loader (it checks every section with the owning layer's own checks),
engine, train/evaluate, tools, and the commands (cli: they may import all of the package, and nothing
in it imports them). Optional parts looked up by name when asked for (the fused loss's
entry in the loss registry, the Triton kernels) are not imports and are not edges here.
"""

import ast
import os

import pytest

import lilt_ds

PACKAGE_DIR = os.path.dirname(lilt_ds.__file__)
LAYERS = [
    ("errors", "fileio", "schema", "presets", "ds_configs"),
    ("runtime", "world", "preemption", "distributed", "allocator", "hostfile", "ds_compat"),
    ("models",),
    ("losses", "ops"),
    ("data",),
    ("config", "original_flags", "tracking"),
    ("engine", "optim", "checkpoint", "export", "export_formats", "memory", "run_logging"),
    ("train", "evaluate"),
    ("tools",),
    ("cli",),
]
RANK = {component: rank for rank, components in enumerate(LAYERS) for component in components}


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def imports_of(module: str, path: str, known: dict) -> set[str]:
    """The lilt_ds modules ``module`` imports anywhere in its file (a package counts for its __init__)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name.startswith("lilt_ds"):
                targets.add(name)
                parent = name.rsplit(".", 1)[0]
                while parent.count(".") >= 1 and not module.startswith(parent + ".") and parent != module:
                    targets.add(parent)  # importing a submodule from outside runs its package's __init__
                    parent = parent.rsplit(".", 1)[0]
    targets.discard(module)
    return targets


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_layer(graph):
    assert {component(m) for m in graph} - {""} <= set(RANK), "a new top-level module needs a layer in LAYERS"


def test_nothing_imports_upward(graph):
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if component(module)
        for target in targets
        if component(target) and RANK[component(target)] > RANK[component(module)]
    )
    assert upward == []


def test_the_commands_import_the_package_and_nothing_in_it_imports_them(graph):
    assert {"lilt_ds.train", "lilt_ds.config", "lilt_ds.cli"} <= graph["lilt_ds.cli.pretrain"]  # edges are seen
    assert (
        sorted(
            f"{module} -> {target}"
            for module, targets in graph.items()
            if component(module) != "cli"
            for target in targets
            if component(target) == "cli"
        )
        == []
    )


def test_no_module_reaches_itself_through_its_imports(graph):
    cycles = []
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_core_holds_no_benchmark_runner_and_no_mock():
    for module, path in modules().items():
        source = open(path).read()
        assert "unittest.mock" not in source and "from unittest import mock" not in source, module
        assert "time_steps" not in source and "StepRunner" not in source, module
