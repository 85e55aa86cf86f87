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


# --- common/ by concern: which layer may import which (README "Layout") -----------------------------------

# the foundation: top-level modules every layer may use; they import only each other
FOUNDATION = {"keys", "errors", "files", "device", "config", "transport"}
LAYERS = {
    "learning": set(),
    "cohort": {"learning"},
    "preprocessing": {"learning", "cohort"},
    "runs": {"learning", "cohort"},
    "report": {"learning", "runs"},
    "inference": {"learning", "cohort", "runs", "preprocessing"},
}
TOP_OF_COMMON = {"cli"}  # the command line: may use every layer (and never simulation: entry points)


def _common_parts(path: Path) -> set[str]:
    """The second component of every ``common.<x>`` this file imports (``from common import keys`` -> keys)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            parts |= {a.name.split(".")[1] for a in node.names if a.name.startswith("common.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "common":
                parts |= {a.name for a in node.names}
            elif node.module.startswith("common."):
                parts.add(node.module.split(".")[1])
    return parts


def test_common_holds_the_foundation_the_layers_and_the_cli_only():
    top = {p.stem for p in (ROOT / "common").glob("*.py")} - {"__init__"}
    subpackages = {p.name for p in (ROOT / "common").iterdir() if (p / "__init__.py").is_file()}
    assert top == FOUNDATION | TOP_OF_COMMON
    assert subpackages == set(LAYERS)
    stray = [p for p in (ROOT / "common").iterdir() if p.is_dir() and p.name != "__pycache__" and p.name not in LAYERS]
    assert not stray


@pytest.mark.parametrize("layer", sorted(LAYERS) + ["foundation"])
def test_layers_of_common_import_one_way(layer):
    if layer == "foundation":
        files, allowed = [ROOT / "common" / f"{m}.py" for m in sorted(FOUNDATION)], FOUNDATION
    else:
        files, allowed = sorted((ROOT / "common" / layer).rglob("*.py")), FOUNDATION | LAYERS[layer] | {layer}
    bad = [f"{p.relative_to(ROOT)} imports common.{sorted(_common_parts(p) - allowed)}"
           for p in files if _common_parts(p) - allowed]
    assert not bad, bad


def test_fab_carries_the_apps_and_nothing_else():
    """The FAB `flwr run` ships to the SuperLink and SuperNodes (Flower's own `build_fab_from_disk`, the function
    `flwr run` calls): every module of common/, client/ and server/, pyproject.toml, README.md; never simulation/
    (the apps do not import it), tests/, deploy/ or data. `flwr build` itself is not called: it also insists that
    the checkout's folder be named like an app (letters, digits, hyphens), which a clone into `mktemp -d` is not,
    while `flwr run` does not."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist())
    assert {n.split("/")[0] for n in names} == {".info", "README.md", "pyproject.toml", "common", "client", "server"}
    wanted = {str(p.relative_to(ROOT)) for pkg in ("common", "client", "server") for p in (ROOT / pkg).rglob("*.py")
              if "__pycache__" not in p.parts}
    assert wanted <= names, sorted(wanted - names)


def test_run_config_defaults_are_found_from_an_installed_wheel(tmp_path):
    """A non-editable install (wheel into its own folder, used from elsewhere) reads the same defaults as the
    checkout: pyproject.toml travels in the wheel as common/app-pyproject.toml."""
    import json
    import os
    import subprocess
    import sys
    import tomllib

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("fedpd-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True)
    code = ("import json, common; from common.config import PYPROJECT, RunConfig, load_defaults; "
            "cfg = RunConfig.from_mapping({}); "
            "print(json.dumps({'file': common.__file__, 'pyproject': str(PYPROJECT), 'defaults': load_defaults(), "
            "'shape': list(cfg.input_shape)}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp_path / "site")}
    out = json.loads(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                                    capture_output=True, text=True).stdout)
    assert out["file"].startswith(str(tmp_path / "site"))  # the installed copy, not this checkout
    assert out["pyproject"] == str(tmp_path / "site" / "common" / "app-pyproject.toml")
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert out["defaults"] == expected
    assert out["shape"] == [int(x) for x in expected["input-shape"].split(",")]
