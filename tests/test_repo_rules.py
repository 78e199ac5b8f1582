"""Rules of the house read from the code: the one-way layering of shared/ARCHITECTURE.md (nothing
below imports anything above), and tests that wait for their children, not for a deadline."""
from __future__ import annotations

import ast
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(os.path.dirname(TESTS), "cbp_kernels")
# package -> the packages / modules of cbp_kernels it must never import
FORBIDDEN = {
    "ops": {"nn", "models", "quant", "data", "cli", "pipeline", "export"},
    "nn": {"models", "quant", "cli", "pipeline", "export"},
    "models": {"quant", "cli", "pipeline"},
    "quant": {"cli", "pipeline"},
    "data": {"cli", "pipeline", "quant", "models", "nn"},
    "pipeline": {"cli"},
}


def _imports(path: str, package: str) -> set[str]:
    """The top-level cbp_kernels modules a file of ``package`` imports (absolute or relative)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("cbp_kernels."):
                found.add(node.module.split(".")[1])
            elif node.level >= 2:  # from ..x import y: x is a sibling package of ours
                depth = os.path.relpath(path, PACKAGE).count(os.sep)
                if node.level > depth:  # reaches cbp_kernels itself
                    found.add(node.module.split(".")[0] if node.module else "")
                    if not node.module:
                        found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cbp_kernels."))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_import(package):
    bad = []
    for root, _, files in os.walk(os.path.join(PACKAGE, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                bad += [f"{os.path.relpath(path, PACKAGE)} imports {m}" for m in _imports(path, package)
                        & FORBIDDEN[package]]
    assert not bad, bad


def test_no_test_waits_on_a_fixed_deadline():
    """Subprocess waits use conftest.HANG_GUARD_S (a hang guard, not an expected time) or
    wait on the child: no numeric ``timeout=`` / ``timedelta(seconds=N)`` in the tests."""
    found = []
    for name in sorted(os.listdir(TESTS)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(TESTS, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("timeout", "seconds") \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, (int, float)):
                found.append(f"{name}:{node.value.lineno}")
    assert not found, f"fixed deadlines in the tests: {found}"
