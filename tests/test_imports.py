"""Imports only point down: no import circle and no import of a higher layer, in mfkernels and in meanflow.

Every `import` / `from ... import` of every module (module level and inside functions alike: a lazy import is still a
dependency) is read with ast, resolved to the package's own modules, and checked against the layer orders below
(docs/kernels.md, 'Layer order'; meanflow's is docs/README.md's Layout: cli > training > evaluation > objectives > models >
data > runtime). A module may import its own layer or lower ones; a circle is refused even within one layer.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest layer first. A module's layer is that of the longest prefix listed here.
MFKERNELS_LAYERS = [
    ["mfkernels._runtime", "mfkernels._ext"],                                      # host runtime, native loader
    ["mfkernels._checks", "mfkernels._library", "mfkernels._rows", "mfkernels._triton"],  # checks, registration
    ["mfkernels.reference"],                                                       # pure-torch references
    ["mfkernels.attention._common", "mfkernels.attention._pieces", "mfkernels.attention._levers",
     "mfkernels.attention._configs"],                                              # attention kernel parts
    ["mfkernels.activations", "mfkernels.norm", "mfkernels.residual", "mfkernels.rmsnorm", "mfkernels.rope",
     "mfkernels.target", "mfkernels.mlp", "mfkernels.swiglu", "mfkernels.qk_norm_rope",
     "mfkernels.attention.forward", "mfkernels.attention.backward", "mfkernels.attention.tangent_backward"],  # ops
    ["mfkernels.attention.registration"],
    ["mfkernels.attention.api"],
    ["mfkernels.attention"],                                                       # the package: its public names
    ["mfkernels.ops", "mfkernels.nn"],                                             # op tables, modules
    ["mfkernels"],                                                                 # the lazy top-level exports
]
MEANFLOW_LAYERS = [
    ["meanflow.runtime"],
    ["meanflow.data"],
    ["meanflow.models"],
    ["meanflow.objectives"],
    ["meanflow.evaluation"],
    ["meanflow.training"],
    ["meanflow.cli"],
    ["meanflow", "meanflow.__main__"],
]


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of a package (a package's __init__ is the package itself)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module `name` imports (resolving relative imports; `from pkg import sub` counts
    pkg.sub when it is a module)."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[:len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` depends on the module pkg.sub; `from pkg import name` on pkg itself
            candidates = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                          for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known and "." in candidate:  # `import a.b.c` of a non-module c
                candidate = candidate.rsplit(".", 1)[0]
            if candidate in known and candidate != name:
                found.add(candidate)
    return found


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(module: str, layers: list[list[str]]) -> int:
    best, rank = -1, None
    for i, group in enumerate(layers):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to the layer order (tests/test_imports.py)")
    return rank


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


PACKAGES = {"mfkernels": MFKERNELS_LAYERS, "meanflow": MEANFLOW_LAYERS}


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_import_circle(package):
    circle = find_circle(graph(package))
    assert circle is None, "import circle: " + " -> ".join(circle)


@pytest.mark.parametrize("package", list(PACKAGES))
def test_imports_point_down(package):
    layers = PACKAGES[package]
    upward = [f"{a} (layer {layer_of(a, layers)}) imports {b} (layer {layer_of(b, layers)})"
              for a, targets in graph(package).items() for b in sorted(targets)
              if layer_of(b, layers) > layer_of(a, layers)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_mfkernels_never_imports_meanflow():
    offenders = [name for name, path in modules("mfkernels").items()
                 if any(t == "meanflow" or t.startswith("meanflow.") for t in _absolute_imports(path))]
    assert not offenders, f"mfkernels modules importing meanflow: {offenders}"


def _absolute_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The checks can fail: a planted circle and a planted upward import are reported; relative and lazy imports are
    resolved."""
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    layers = [["p.low"], ["p.high"]]
    assert layer_of("p.low.x", layers) == 0 and layer_of("p.high", layers) == 1
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("p.other", layers)
    known = {"mfkernels", "mfkernels.reference", "mfkernels._checks", "mfkernels.ops"}
    probe = tmp_path / "probe.py"
    probe.write_text("from . import reference\nfrom ._checks import check_float\nfrom mfkernels import ops_table\n"
                     "def f():\n    from .ops import JVPOps\n")
    found = imports("mfkernels.probe", probe, known)
    assert found == {"mfkernels.reference", "mfkernels._checks", "mfkernels", "mfkernels.ops"}
    assert layer_of("mfkernels.ops", MFKERNELS_LAYERS) > layer_of("mfkernels.reference", MFKERNELS_LAYERS)


@pytest.mark.parametrize("package", list(PACKAGES))
def test_every_module_imports(package):
    """Every module of the package imports on a CPU machine with the README's setup (a module no other test reaches
    still fails here if it rots)."""
    import importlib

    failed = []
    for name in modules(package):
        if name.endswith("__main__"):
            continue  # runs the command line on import
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - every failure is listed
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    assert not failed, "modules that do not import:\n" + "\n".join(failed)
