"""The package's layering: imports only go down (groups and representations <- nn <- transforms <-
models <- training), at module level or inside functions alike; side packages (physics, data) import
nothing of the model stack."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gflows"
# lowest first; a module may import from its own layer and the ones below
LAYERS = [
    ("gflows._checks", "gflows.groups", "gflows.representations", "gflows.physics", "gflows.data"),
    ("gflows.nn",),
    ("gflows.flow", "gflows.transforms"),
    ("gflows.models", "gflows.export", "gflows.interop", "gflows.equivariance"),
    ("gflows.training",),
    ("gflows",),  # the package's __init__: the public names
]
SIDE = ("gflows.physics", "gflows.data")


def layer(module: str) -> int:
    best = max((p for ps in LAYERS for p in ps if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, ps in enumerate(LAYERS) if best in ps)


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def imports(path: Path) -> list[tuple[str, int]]:
    """Every ``gflows`` module ``path`` imports, with the line (function-level imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gflows"):
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("gflows")]
    return found


@pytest.mark.parametrize(("name", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_only_go_down(name, path):
    mine = layer(name)
    for target, line in imports(path):
        if target == "gflows" and name == "gflows":
            continue
        assert layer(target) <= mine, f"{path.name}:{line}: {name} (layer {mine}) imports {target} " \
                                      f"(layer {layer(target)})"
        side = next((s for s in SIDE if name.startswith(s)), None)
        if side:
            assert target.startswith(side) or layer(target) == 0 and not target.startswith(SIDE), \
                f"{path.name}:{line}: {name} imports {target}"


def test_the_check_can_fail():
    """An upward import is caught (the layering test is not vacuous)."""
    assert layer("gflows.nn.equivariant") < layer("gflows.transforms.reshape")
    assert layer("gflows.models.config") < layer("gflows.training.engine")
    assert any(t.startswith("gflows.transforms") for t, _ in imports(PACKAGE / "models" / "image.py"))


def test_functions_are_short():
    """No function of the package is longer than about 60 lines (65 with its docstring)."""
    long = []
    for _, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if function and node.end_lineno - node.lineno >= 65:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long


def test_tests_mirror_the_package():
    """``gflows/<package>/<module>.py`` has ``tests/test_<package>_<module>.py`` (top level:
    ``tests/test_<module>.py``); private helpers (``_checks``) are tested through their users."""
    tests = {p.stem for p in (PACKAGE.parent / "tests").glob("test_*.py")}
    missing = []
    for name, path in modules():
        if path.name == "__init__.py" or path.stem.startswith("_"):
            continue
        expected = "test_" + "_".join(name.split(".")[1:])
        if expected not in tests:
            missing.append(f"{path.relative_to(PACKAGE)} -> tests/{expected}.py")
    assert not missing, missing
