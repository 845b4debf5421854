"""Imports go one way, train -> models -> fmm, and the pure core carries no infrastructure.

Read from the source (``ast``), so a lazy import inside a function counts as much as one at
the top of a module.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a researcher composes must not drag in a database, a web stack or an event loop.
INFRASTRUCTURE = {"sqlite3", "fastapi", "starlette", "uvicorn", "pydantic", "asyncio", "httpx"}
RULES = {
    "fmm": {"models", "train", *INFRASTRUCTURE},
    "models": {"train", *INFRASTRUCTURE},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_only_downward(package):
    bad = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & RULES[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package} imports what it must not: {bad}"
