"""Imports point downwards (DESIGN.md): the meta core depends on torch only; compress knows
nothing of the policy or the runtime."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "metacompress"


def _imports(folder: str) -> dict[str, set[str]]:
    """metacompress modules imported by each file of ``folder`` (top level and inside functions)."""
    out = {}
    for path in (PACKAGE / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[str(path.relative_to(PACKAGE))] = {n for n in names if n.startswith("metacompress")}
    return out


@pytest.mark.parametrize("folder, allowed", [
    ("meta", ("metacompress.meta",)),
    ("compress", ("metacompress.compress", "metacompress.meta", "metacompress.errors", "metacompress.io",
                  "metacompress.progress", "metacompress.data", "metacompress.zoo", "metacompress.training")),
])
def test_packages_import_only_downwards(folder, allowed):
    wrong = {f: sorted(n for n in names if not n.startswith(allowed)) for f, names in _imports(folder).items()}
    assert not {f: n for f, n in wrong.items() if n}, wrong
