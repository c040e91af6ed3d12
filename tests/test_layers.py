"""The layers of DESIGN.md ("Three parts, one direction of dependency"), read from the sources: every
import of every module under imagen/, runtime/, reference/, export/ and shapes/, deferred ones inside
functions included, relative ones resolved to module names.

1. `imagen.runtime.contract`: the standard library, NumPy and `imagen.runtime.errors` (itself
   standard library only).
2. the rest of `imagen.runtime`: the contract and its own modules, and the helpers in `imagen/`.
3. `imagen.reference`: torch, transformers, the contract, and the `shapes` data set it trains on.
4. `imagen.export`: `imagen.reference`, the contract and the runtime's public API only.
- `imagen.runtime.serve` reaches the rest of the runtime through its public API only.
- `imagen.shapes`: its data set (scenes, analysis: NumPy and Pillow) for training, and `imagen-eval`
  (cli, evaluate), which runs bundles through the runtime's public API as a user would.
- What the runtime's install ships (the runtime, imagen/ and imagen.shapes) imports nothing of
  the export extra (torch, transformers, onnx, ...).
- No module imports another that imports it back, through any chain.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"imagen": "imagen", "reference": "imagen.reference", "export": "imagen.export"}
FOLDERS |= {"runtime": "imagen.runtime", "shapes": "imagen.shapes"}
# The runtime's public API: what export and imagen-eval may import of it.
PUBLIC_RUNTIME = ("imagen.runtime", "imagen.runtime.contract", "imagen.runtime.errors", "imagen.runtime.backends")
HELPERS = ("imagen", "imagen._cli", "imagen._io")  # installed with the runtime; standard library and click
SHAPES_DATA = ("imagen.shapes", "imagen.shapes.scenes", "imagen.shapes.analyse")
EXPORT_EXTRA = ("torch", "transformers", "onnx", "onnxscript", "safetensors", "diffusers", "torchvision")


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join([FOLDERS[folder], *parts])


def sources() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


MODULES = sources()


def imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports: `from a import b` is a.b when that is a module, else a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {module: imports(module, path) for module, path in MODULES.items()}


def within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def allowed_internal(module: str, target: str) -> bool:
    """Whether `module` may import the imagen module `target` (the layers above)."""
    if within(module, "imagen.runtime.errors") or module in HELPERS:
        return False
    if within(module, "imagen.runtime.contract"):
        return within(target, "imagen.runtime.contract") or target == "imagen.runtime.errors"
    if within(module, "imagen.runtime"):
        return within(target, "imagen.runtime") or target in HELPERS
    if within(module, "imagen.reference"):
        return within(target, "imagen.reference", "imagen.runtime.contract") or target in HELPERS + SHAPES_DATA
    if within(module, "imagen.export"):
        return within(target, "imagen.export", "imagen.reference") or target in HELPERS + PUBLIC_RUNTIME
    if module in SHAPES_DATA:
        return target in SHAPES_DATA
    if within(module, "imagen.shapes"):
        return within(target, "imagen.shapes") or target in HELPERS + PUBLIC_RUNTIME
    raise AssertionError(f"{module} is in no layer: add it to the layers of DESIGN.md and of this test")


def allowed_external(module: str, top: str) -> bool:
    """Whether `module` may import the top-level package `top` (not part of imagen)."""
    if within(module, "imagen.runtime.errors"):
        return top in sys.stdlib_module_names
    if within(module, "imagen.runtime.contract"):
        return top in sys.stdlib_module_names or top == "numpy"
    if module in HELPERS:
        return top in sys.stdlib_module_names or top == "click"
    if within(module, "imagen.runtime", "imagen.shapes"):
        return top not in EXPORT_EXTRA
    return True


def violations() -> list[str]:
    found = []
    for module, targets in GRAPH.items():
        for target in sorted(targets):
            if within(target, "imagen"):
                ok = allowed_internal(module, target) or target == module
            else:
                ok = allowed_external(module, target.split(".")[0])
            if not ok:
                found.append(f"{module} imports {target}")
    return found


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a list of modules."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH.get(node, ())):
            if target not in GRAPH:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_found_and_every_relative_import_resolves():
    assert {"imagen.runtime.contract.manifest", "imagen.export.bundle", "imagen.shapes.cli"} <= set(MODULES)
    internal = {t for targets in GRAPH.values() for t in targets if within(t, "imagen")}
    unknown = sorted(t for t in internal if t not in MODULES)
    assert unknown == [], f"imports of modules that do not exist: {unknown}"


def test_each_layer_imports_only_the_layers_below_it():
    found = violations()
    assert found == [], "imports across the layers of DESIGN.md:\n" + "\n".join(found)


def test_export_uses_only_the_runtime_public_api():
    reached = {t for m, targets in GRAPH.items() if within(m, "imagen.export") for t in targets}
    runtime = sorted(t for t in reached if within(t, "imagen.runtime"))
    assert set(runtime) <= set(PUBLIC_RUNTIME), f"export reaches into the runtime's internals: {runtime}"


def test_serve_uses_only_the_runtime_public_api():
    """imagen-serve and the Ray app go through the same request flow as any embedding service."""
    reached = {t for m, targets in GRAPH.items() if within(m, "imagen.runtime.serve") for t in targets}
    runtime = sorted(t for t in reached if within(t, "imagen.runtime") and not within(t, "imagen.runtime.serve"))
    assert set(runtime) <= set(PUBLIC_RUNTIME), f"serve reaches into the runtime's internals: {runtime}"


def test_no_import_cycle():
    found = cycles()
    assert found == [], "modules that import each other (through these chains): " + "; ".join(
        " <-> ".join(component) for component in found
    )


def test_the_rules_see_what_they_forbid():
    """The checks above would catch a violation of each kind: a contract module that imports
    the rest of the runtime, export reaching into an internal module, the runtime importing
    torch, and a cycle."""
    assert not allowed_internal("imagen.runtime.contract.manifest", "imagen.runtime.samplers")
    assert not allowed_internal("imagen.export.tensorrt", "imagen.runtime.pipeline")
    assert not allowed_internal("imagen.reference.unet", "imagen.runtime.pipeline")
    assert not allowed_internal("imagen.runtime.pipeline", "imagen.export.bundle")
    assert not allowed_internal("imagen.shapes.scenes", "imagen.runtime")
    assert not allowed_external("imagen.runtime.pipeline", "torch")
    assert not allowed_external("imagen.runtime.contract.settings", "onnxruntime")
    assert allowed_internal("imagen.export.bundle", "imagen.runtime.contract")
    package = imports("imagen.runtime.contract", ROOT / "runtime" / "contract" / "__init__.py")
    assert "imagen.runtime.contract.manifest" in package  # `from .manifest import ...` resolved
    saved = dict(GRAPH)
    try:
        GRAPH.update({"imagen.a": {"imagen.b"}, "imagen.b": {"imagen.c"}, "imagen.c": {"imagen.a"}})
        assert ["imagen.a", "imagen.b", "imagen.c"] in cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
