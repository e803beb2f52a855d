"""The test suite's own shape: shared code lives in tests/fixtures/ (and conftest.py), never in a
test module that another one imports; the fixtures hold no tests."""

import ast

from tests.fixtures import FIXTURES_DIR

TESTS = FIXTURES_DIR.parent


def imported_modules(path):
    """Every module name ``path`` imports (inside functions too), with the names it takes from them."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            yield base
            yield from (f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names)


def test_no_test_module_imports_another():
    top = {p.stem for p in TESTS.iterdir() if p.suffix == ".py" or p.is_dir()}
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for name in imported_modules(path):
            parts = [p for p in name.split(".") if p]
            if (
                name.startswith(".")  # relative: the suite imports tests.fixtures by its full name
                or any(p.startswith("test_") or p == "conftest" for p in parts)
                or (parts and parts[0] in top)  # a tests/ module found through sys.path, not as tests.<...>
            ):
                bad.append(f"{path.relative_to(TESTS)}: {name}")
    assert not bad, "imports of test modules (shared code belongs in tests/fixtures/): " + ", ".join(bad)


def test_fixtures_hold_no_tests():
    found = []
    for path in sorted(FIXTURES_DIR.rglob("*.py")):
        if path.name.startswith("test_"):
            found.append(path.name)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lower().startswith("test"):
                found.append(f"{path.name}: {node.name}")
    assert not found, found
