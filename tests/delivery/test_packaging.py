"""What each shipped distribution contains, and which way the imports point.

The operator image installs finetune-api + finetune-operator, the worker image
finetune-api + finetune-worker (Dockerfile.operator, Dockerfile.worker). The dev tools
(finetune_dev) and the benchmarks (finetune_bench) live in the development workspace only.
These tests build the real wheels and read the real imports, so a file moved into the wrong
package, or an import that points back up, fails here rather than in an image.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# distribution directory -> the one top-level package its wheel may hold
SHIPPED = {"api": "finetune_api", "operator": "finetune_operator", "worker": "finetune_worker"}
# package -> packages of this repository it may import (the layering; nothing points back up)
MAY_IMPORT = {
    "finetune_api": set(),
    "finetune_operator": {"finetune_api"},
    "finetune_worker": {"finetune_api"},
    "finetune_dev": {"finetune_api", "finetune_operator", "finetune_worker"},
    # the scale benchmark starts the dev control plane: both are development-only
    "finetune_bench": {"finetune_api", "finetune_operator", "finetune_worker", "finetune_dev"},
}
SOURCE_ROOTS = {
    "finetune_api": "api",
    "finetune_operator": "operator",
    "finetune_worker": "worker",
    "finetune_dev": "dev",
    "finetune_bench": "bench",
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("wheels")
    built = {}
    for directory in SHIPPED:
        target = out / directory
        # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
        source = shutil.copytree(
            ROOT / directory,
            out / f"{directory}-src",
            ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
        )
        # --no-build-isolation: the dev environment's setuptools, no download
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--quiet",
                "-w",
                str(target),
                str(source),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (wheel,) = target.glob("*.whl")
        built[directory] = zipfile.ZipFile(wheel).namelist()
    return built


@pytest.mark.parametrize("directory", sorted(SHIPPED))
def test_a_shipped_wheel_holds_its_own_package_and_nothing_else(wheels, directory):
    names = wheels[directory]
    packages = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert packages == {SHIPPED[directory]}, packages
    # every module of the source tree is in the wheel (a missed subpackage would only show
    # in the image)
    source = ROOT / directory / SHIPPED[directory]
    modules = {
        p.relative_to(source.parent).as_posix()
        for p in source.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= set(names), sorted(modules - set(names))


def test_no_dev_demo_or_benchmark_code_ships(wheels):
    for directory, names in wheels.items():
        offending = [
            n
            for n in names
            if any(
                part in ("finetune_dev", "finetune_bench", "demo", "devcluster", "bench")
                for part in n.split("/")
            )
        ]
        assert offending == [], (directory, offending)


def _imports(path: Path) -> set[str]:
    """Top-level finetune_* packages a module imports (absolute imports; relative imports
    stay inside their package by construction)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {name for name in found if name.startswith("finetune_")}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_point_only_down_the_layers(package):
    source = ROOT / SOURCE_ROOTS[package] / package
    wrong = {}
    for path in sorted(source.rglob("*.py")):
        bad = _imports(path) - MAY_IMPORT[package] - {package}
        if bad:
            wrong[path.relative_to(ROOT).as_posix()] = sorted(bad)
    assert wrong == {}, wrong


@pytest.mark.parametrize(
    ("dockerfile", "shipped"),
    [("Dockerfile.operator", {"api", "operator"}), ("Dockerfile.worker", {"api", "worker"})],
)
def test_each_image_copies_in_only_its_distributions(dockerfile, shipped):
    copied = set()
    for line in (ROOT / dockerfile).read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied.add(words[1].rstrip("/"))
    assert copied == shipped, copied
