"""The layering ARCHITECTURE.md draws, held by the code: which package may import which.

Every `import` and `from ... import` of every module is read from its syntax tree,
those inside functions included (a deferred import is still a dependency), and each
package's imports must lie within what its layer allows. A new upward import fails
here with the module and the import named, so the map cannot drift from the code.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEAVES = {"efficient_train.errors", "efficient_train.lazy", "efficient_train.tree_paths"}
# What config.py may import: modules that load no jax, so flags and configs are checked before jax starts.
PLAIN_CHOICES = {"efficient_train.data", "efficient_train.models.choices", "efficient_train.models.llama.config",
                 "efficient_train.optim.choices", "efficient_train.parallel.axes", "efficient_train.parallel.heads"}
# unit -> the units it may import (a unit is a package below efficient_train, or a top-level module).
ALLOWED: dict[str, set[str]] = {
    "pallas_kernels": set(),
    "efficient_train.errors": set(),
    "efficient_train.lazy": set(),
    "efficient_train.tree_paths": set(),
    "efficient_train.parallel": LEAVES | {"pallas_kernels"},
    "efficient_train.models": LEAVES | {"pallas_kernels", "efficient_train.parallel"},
    "efficient_train.optim": LEAVES | {"pallas_kernels", "efficient_train.parallel"},
    "efficient_train.data": LEAVES | {"efficient_train.parallel"},
    "efficient_train.checkpoint": LEAVES | {"efficient_train.parallel"},
    "efficient_train.config": LEAVES | PLAIN_CHOICES,
    # Decoding with a KV cache: the model, the tokenizers, the mesh rules; below train (its sample hook).
    "efficient_train.generate": LEAVES | {"pallas_kernels", "efficient_train.parallel", "efficient_train.models",
                                          "efficient_train.data"},
    "efficient_train.train": LEAVES | {"pallas_kernels", "efficient_train.parallel", "efficient_train.models",
                                       "efficient_train.optim", "efficient_train.data", "efficient_train.checkpoint",
                                       "efficient_train.config", "efficient_train.generate"},
    "efficient_train.tools": LEAVES | {"efficient_train.parallel", "efficient_train.models", "efficient_train.optim",
                                       "efficient_train.checkpoint", "efficient_train.config", "efficient_train.train"},
    "efficient_train.hf": {"efficient_train.tools"},  # the deprecated name of tools.hf
    "efficient_train.cli": None,  # the command line may import anything
    "efficient_train": LEAVES | {"efficient_train.config", "efficient_train.train"},  # __init__.py
}

def _unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pallas_kernels":
        return "pallas_kernels"
    if len(parts) == 1:
        return "efficient_train"
    return ".".join(parts[:2])


def _modules() -> list[tuple[str, str]]:
    found = []
    for top in ("efficient_train", "pallas_kernels"):
        for directory, _, names in os.walk(os.path.join(ROOT, top)):
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                    found.append((module, path))
    return found


def _imports(module: str, path: str) -> set[str]:
    """Every efficient_train / pallas_kernels module `path` imports, relative imports resolved."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    return {t for t in targets if t.split(".")[0] in ("efficient_train", "pallas_kernels")}


def _known(target: str, modules: set[str]) -> str | None:
    """The longest prefix of `target` that is a module of ours (a name imported from one is not)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def test_every_package_imports_only_what_its_layer_allows():
    modules = dict(_modules())
    breaks = []
    for module, path in modules.items():
        unit = _unit(module)
        assert unit in ALLOWED, f"{module}: unit {unit} has no row in ALLOWED; add one (and to ARCHITECTURE.md)"
        allowed = ALLOWED[unit]
        if allowed is None:
            continue
        for target in sorted(_imports(module, path)):
            imported = _known(target, set(modules))
            if imported is None or _unit(imported) == unit:
                continue
            if unit == "efficient_train.config":  # named modules only, not their whole packages
                ok = _unit(imported) in LEAVES | {"efficient_train.data"} or imported in PLAIN_CHOICES
            else:
                ok = _unit(imported) in allowed
            if not ok:
                breaks.append(f"{module} imports {imported}")
    assert not breaks, "imports against the layering (ARCHITECTURE.md, Import direction):\n" + "\n".join(breaks)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above reads function-level and relative imports: a checkpoint module reaching into train is caught."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ..train import training_setup\n    from efficient_train.models import Llama\n")
    found = _imports("efficient_train.checkpoint.probe", str(path))
    assert {"efficient_train.train", "efficient_train.train.training_setup", "efficient_train.models.Llama"} <= found
    assert _unit(_known("efficient_train.models.Llama", {"efficient_train.models"})) not in ALLOWED[
        "efficient_train.checkpoint"]


@pytest.mark.parametrize("package", ["efficient_train", "efficient_train.parallel", "efficient_train.models",
                                     "efficient_train.models.llama", "efficient_train.optim", "efficient_train.data",
                                     "efficient_train.checkpoint", "efficient_train.train", "efficient_train.generate"])
def test_no_lazy_name_is_shadowed_by_a_submodule(package):
    """A lazily exported name equal to a submodule's name would turn into that module once the
    submodule is imported (Python sets the package attribute), so none may be."""
    init = os.path.join(ROOT, *package.split("."), "__init__.py")
    source = open(init).read()
    tree = ast.parse(source)
    exported = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            exported = {ast.literal_eval(element) for element in node.value.elts}
    directory = os.path.dirname(init)
    submodules = {name[:-3] for name in os.listdir(directory) if name.endswith(".py")} | {
        name for name in os.listdir(directory) if os.path.isfile(os.path.join(directory, name, "__init__.py"))}
    assert exported, f"{package} names no public surface (__all__)"
    assert not exported & submodules, f"{package}: {sorted(exported & submodules)} are both exported names and modules"


def test_config_and_cli_load_without_jax():
    """Flags and configs are checked before jax starts (the simulated device count is set from them)."""
    code = ("import sys, efficient_train.config, efficient_train.cli, efficient_train.parallel, efficient_train.models, "
            "efficient_train.optim, efficient_train.checkpoint, efficient_train.models.llama.config; "
            "print(sorted(m for m in ('jax', 'flax', 'orbax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            check=True)
    assert result.stdout.strip() == "[]"
