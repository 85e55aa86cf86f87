"""The package layout and the one-way import rule (DESIGN.md, "Packages and imports")."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"common", "client", "server", "simulation", "deploy", "tests"}
ALLOWED = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "simulation": {"common", "client", "server"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_go_one_way(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        used = _imports(path) & OURS - {package}
        if used - ALLOWED[package]:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(used - ALLOWED[package])}")
    assert not bad, bad


def test_common_never_imports_flwr():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "common").rglob("*.py") if "flwr" in _imports(p)]
    assert not offenders


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_importable(package):
    assert importlib.import_module(package).__file__


def test_required_top_level_exists():
    for name in ["pyproject.toml", "README.md", "Makefile", ".ci/run", "server", "client", "common",
                 "simulation", "deploy", "tests", "benchmarks"]:
        assert (ROOT / name).exists(), name
    assert "make test" in (ROOT / ".ci/run").read_text()
