"""The package's shape: no import cycles, dependencies pointing one way, every package
installed, the stage list of the Makefile equal to stages.yaml's graph, and a non-editable
wheel that works on its own."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from tests.fixtures import REPO_ROOT

ROOT = REPO_ROOT
FOLDERS = {"lift3d": ROOT / "lift3d", "lift3d.pipeline": ROOT / "pipeline", "lift3d.train": ROOT / "train"}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (the folders mapped as pyproject maps them)."""
    out = {}
    for prefix, folder in FOLDERS.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (inside functions too)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_imports():
    for name in modules():
        __import__(name)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def layer(m: str) -> str:
    for prefix in (
        "lift3d.core",
        "lift3d.nets",
        "lift3d.pipeline.readers",
        "lift3d.pipeline.synthetic",
        "lift3d.pipeline",
        "lift3d.train",
    ):
        if m == prefix or m.startswith(prefix + "."):
            return prefix
    return m  # lift3d, lift3d.cli, lift3d.launch


# what each layer may import (besides itself); the command line on top may import anything
ALLOWED = {
    "lift3d.core": set(),
    "lift3d.nets": {"lift3d.core"},
    "lift3d.pipeline.readers": {"lift3d.core", "lift3d.pipeline.synthetic"},  # kind synthetic generates first
    "lift3d.pipeline.synthetic": {"lift3d.core", "lift3d.pipeline.readers"},  # written in ScanNet's format
    "lift3d.pipeline": {"lift3d.core", "lift3d.nets", "lift3d.pipeline.readers"},
    "lift3d.train": {"lift3d.core", "lift3d.nets", "lift3d.pipeline.readers"},
    "lift3d": set(),
    "lift3d.launch": {"lift3d.core", "lift3d.cli"},
}


def test_dependencies_point_one_way():
    """core <- nets <- pipeline / train <- cli: the core knows no stage, reader or command; the
    offline side never imports the trainer; the trainer reads datasets but never a 2D teacher."""
    bad = []
    for m, deps in graph().items():
        own = layer(m)
        if own == "lift3d.cli":
            continue
        for d in deps:
            if layer(d) != own and layer(d) not in ALLOWED[own]:
                bad.append(f"{m} -> {d}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_pyproject_lists_every_package_and_maps_the_folders():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert meta["package-dir"] == {"lift3d": "lift3d", "lift3d.pipeline": "pipeline", "lift3d.train": "train"}
    packages = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert set(meta["packages"]) == packages


def test_makefile_stage_list_is_the_graph():
    graph_ = yaml.safe_load((ROOT / "stages.yaml").read_text())["graph"]
    line = re.search(r"^STAGES\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert line.split() == list(graph_)
    from lift3d.core import graph as G

    assert list(G.ORDER) == list(graph_)
    from lift3d.core.registry import STAGES

    assert STAGES.names() == sorted(graph_)  # every stage has a runner registered in pyproject.toml


def test_package_ships_its_defaults():
    assert (ROOT / "lift3d" / "stages.yaml").resolve() == (ROOT / "stages.yaml").resolve()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="venv layout of Linux")
def test_non_editable_wheel_runs_status_with_its_defaults(tmp_path):
    """Build a wheel, install it into a fresh venv that sees the dependencies but not this
    checkout, and run ``lift3d status`` from elsewhere: the defaults come from the package."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = wheels.glob("lift3d-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")  # the dependencies, not their .pth files
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    installed = sorted(p.name for p in site.iterdir())
    assert "pipeline" not in installed and "train" not in installed
    assert (site / "lift3d" / "stages.yaml").is_file() and not (site / "lift3d" / "stages.yaml").is_symlink()
    assert (site / "lift3d" / "pipeline" / "readers" / "scannet.py").is_file()
    env = {**os.environ, "LIFT3D_MALLOC": "default"}
    env.pop("LIFT3D_DEFAULTS", None)
    env.pop("PYTHONPATH", None)
    res = subprocess.run(
        [str(venv / "bin" / "lift3d"), "status", "-o", f"workdir={tmp_path / 'wd'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    where = subprocess.run(
        [str(py), "-c", "import lift3d.pipeline.frames as f; print(f.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(site)), where
    for stage in yaml.safe_load((ROOT / "stages.yaml").read_text())["graph"]:
        state = "not used" if stage == "fit2d" else "missing"  # the defaults' teacher is not a fitted one
        assert re.search(rf"^{stage}\s+{state}", res.stdout, re.M), res.stdout
