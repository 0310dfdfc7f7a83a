"""The worker's preflight and the pod it runs in: what the image must carry at run time.

Triton compiles a C launcher at the first fused-kernel launch, so an image without a C compiler
crashed every GPU job at its first step. These tests pin down the preflight that now fails such
a pod at once with exit code 16 and a message saying what is missing, the Dockerfile lines that
install the compiler, and a CPU training run in an emulated pod (uid 65532 with no passwd entry,
read-only root, no network, no HOME) that finds anything writing under `~` or downloading.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile import final_stage, instructions
from podsandbox import POD_UID, image_env, run_as_pod, unavailable_reason
from tinymodel import DATA_DIR
from worker_configs import worker_config_dict

from finetune_api import WorkerExitCode
from finetune_api.constants import Reason

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def preflight(tmp_path: Path, *args: str, env: dict | None = None):
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    environment = {
        **(env if env is not None else os.environ),
        "FINETUNE_WORKER_TERMINATION_LOG": str(log),
    }
    result = subprocess.run(
        [str(VENV_BIN / "finetune-worker"), "preflight", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    summary = json.loads(log.read_text()) if log.exists() and log.read_text() else None
    return result, summary


def test_no_c_compiler_fails_at_once_with_exit_16_saying_what_to_fix(tmp_path):
    # PATH as in the old image: the Python environment's bin directory and nothing else.
    assert not (VENV_BIN / "gcc").exists() and not (VENV_BIN / "clang").exists()
    env = {k: v for k, v in os.environ.items() if k != "CC"} | {"PATH": str(VENV_BIN)}
    result, summary = preflight(tmp_path, "--device", "cuda", "--no-launch", env=env)
    assert result.returncode == WorkerExitCode.ENVIRONMENT_ERROR == 16, result.stderr
    assert summary["exitCode"] == 16 and summary["result"] == "Failed"
    assert summary["reason"] == Reason.WORKER_ENVIRONMENT_ERROR == "WorkerEnvironmentError"
    message = summary["message"]
    assert "no C compiler" in message and "gcc" in message and str(VENV_BIN) in message
    assert "Dockerfile.worker" in message  # says how to fix the image


def test_with_a_compiler_the_same_checks_pass(tmp_path):
    if shutil.which("gcc") is None and shutil.which("clang") is None:
        pytest.fail("this machine has no C compiler; the positive case cannot be checked")
    result, summary = preflight(tmp_path, "--device", "cuda", "--no-launch")
    assert result.returncode == 0, result.stderr
    assert "preflight passed for cuda" in result.stdout and summary is None


def test_a_cc_that_does_not_exist_and_an_unwritable_triton_cache_are_both_named(tmp_path):
    cache = tmp_path / "read-only-cache"
    cache.mkdir()
    cache.chmod(0o500)
    env = {**os.environ, "CC": "/nonexistent/cc", "TRITON_CACHE_DIR": str(cache / "triton")}
    if os.geteuid() == 0:  # root writes through mode bits; a file where the directory goes
        (cache / "triton").write_text("not a directory")
    result, summary = preflight(tmp_path, "--device", "cuda", "--no-launch", env=env)
    assert result.returncode == 16
    assert "no C compiler" in summary["message"]
    assert f"{cache / 'triton'} is not writable" in summary["message"]


def test_a_plan_made_without_fused_kernels_needs_no_compiler(tmp_path, tiny_model_root):
    config = worker_config_dict(tmp_path, tiny_model_root)
    config["plan"]["fusedKernels"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "CC"} | {"PATH": str(VENV_BIN)}
    result, _ = preflight(
        tmp_path, "--config", str(path), "--device", "cuda", "--no-launch", env=env
    )
    assert result.returncode == 0, result.stderr
    config["plan"]["fusedKernels"] = True  # the same config, planned for fused kernels
    path.write_text(yaml.safe_dump(config))
    result, summary = preflight(
        tmp_path, "--config", str(path), "--device", "cuda", "--no-launch", env=env
    )
    assert result.returncode == 16 and "no C compiler" in summary["message"]


def test_compiled_layers_need_a_writable_inductor_cache_named_in_the_exit_message(
    tmp_path, tiny_model_root
):
    config = worker_config_dict(tmp_path, tiny_model_root)
    config["plan"] |= {"fusedKernels": False, "compiledLayers": True}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory goes")  # unwritable even for root
    args = ("--config", str(path), "--device", "cuda", "--no-launch")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocked / "inductor")}
    result, summary = preflight(tmp_path, *args, env=env)
    assert result.returncode == 16, result.stderr
    assert "plan.compiledLayers" in summary["message"]
    assert f"{blocked / 'inductor'} is not writable" in summary["message"]
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    result, _ = preflight(tmp_path, *args, env=env)
    assert result.returncode == 0, result.stderr
    config["plan"]["compiledLayers"] = False  # an eager plan does not look at it
    path.write_text(yaml.safe_dump(config))
    env["TORCHINDUCTOR_CACHE_DIR"] = str(blocked / "inductor")
    assert preflight(tmp_path, *args, env=env)[0].returncode == 0


def test_qlora_plans_need_bitsandbytes_and_gpu_launches_need_a_gpu():
    from finetune_worker import preflight as pf

    plan = {"method": "qlora", "fusedKernels": False}
    assert pf.problems(plan, "cpu") == []  # nothing is compiled for the CPU
    assert pf.problems(plan, "cuda", launch=False) == []  # bitsandbytes imports here
    launched = pf.problems(plan, "cuda", launch=True)
    import torch

    if not torch.cuda.is_available():
        assert launched == [
            ("no CUDA device is visible, so bitsandbytes' NF4 quantisation cannot run")
        ]


def test_the_planner_records_that_its_prediction_assumes_fused_kernels():
    from finetune_api import FineTuneJobSpec
    from finetune_operator.planner import preset
    from finetune_operator.planner.api_adapter import plan_for_spec

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "meta-llama/Meta-Llama-3-8B"},
            "dataset": {"uri": "pvc://data/a.jsonl", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "resources": {"gpu": {"memory": "24Gi"}},
            "output": {"uri": "pvc://out/a"},
        }
    )
    plan = plan_for_spec(spec, preset("meta-llama/Meta-Llama-3-8B"))
    assert plan.fused_kernels is True
    assert plan.model_dump(by_alias=True)["fusedKernels"] is True


# --- the image ---------------------------------------------------------------------------


def test_the_final_stage_installs_a_c_compiler_and_checks_it_at_build_time():
    steps = final_stage(instructions(ROOT / "Dockerfile.worker"))
    runs = [args for op, args in steps if op == "RUN"]
    install = next((r for r in runs if "apt-get install" in r), None)
    assert install is not None, "the final stage installs no packages"
    assert {"gcc", "libc6-dev"} <= set(install.split()), install
    assert "rm -rf /var/lib/apt/lists/*" in install
    ops = [op for op, _ in steps]
    user_at = ops.index("USER")
    install_at = next(i for i, (op, a) in enumerate(steps) if op == "RUN" and "apt-get" in a)
    check_at = next(
        i
        for i, (op, a) in enumerate(steps)
        if op == "RUN" and "finetune-worker preflight --device cuda --no-launch" in a
    )
    assert install_at < check_at < user_at  # installed as root, checked before shipping


# --- the pod, emulated ---------------------------------------------------------------------


def pod_environment(scratch: str, termination_log: str) -> dict[str, str]:
    """The image's ENV (this venv standing in for /opt/worker), then the pod's env as the
    operator builds it, then HOME removed: nothing may depend on a home directory."""
    from finetune_operator.builders.training import worker_container

    env = image_env(
        ROOT / "Dockerfile.worker", prefix_replacements={"/opt/worker/bin": str(VENV_BIN)}
    )
    container = worker_container("image", ["finetune-worker", "train"], [], {}, scratch_dir=scratch)
    env.update({e["name"]: e["value"] for e in container["env"]})
    env["FINETUNE_WORKER_TERMINATION_LOG"] = termination_log
    env.pop("HOME", None)
    return env


@pytest.fixture
def pod_volumes(tmp_path, tiny_model_root):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    volumes = {name: tmp_path / name for name in ("config", "models", "data", "out")}
    for path in volumes.values():
        path.mkdir()
    shutil.copytree(tiny_model_root / "tiny", volumes["models"] / "tiny")
    shutil.copy(DATA_DIR / "chat.jsonl", volumes["data"] / "chat.jsonl")
    for path in volumes.values():
        path.chmod(0o755)
        for child in path.rglob("*"):
            child.chmod(0o755 if child.is_dir() else 0o644)
    os.chown(volumes["out"], POD_UID, POD_UID)  # what the pod's fsGroup gives it
    return volumes


def test_the_sandbox_is_as_strict_as_the_pod(pod_volumes):
    probe = """
import os, pwd, socket, errno
assert os.getuid() == 65532 and os.getgid() == 65532, (os.getuid(), os.getgid())
try:
    pwd.getpwuid(65532); raise SystemExit("uid 65532 has a passwd entry")
except KeyError:
    pass
assert "HOME" not in os.environ
for path in ("/tmp/probe", "/usr/probe", "/mnt/config/probe"):
    try:
        open(path, "w"); raise SystemExit(f"{path} is writable")
    except OSError as exc:
        assert exc.errno in (errno.EROFS, errno.EACCES), (path, exc)
open("/mnt/out/probe", "w").write("ok"); open("/mnt/scratch/probe", "w").write("ok")
try:
    socket.create_connection(("10.255.255.1", 443), timeout=2); raise SystemExit("network")
except OSError:
    pass
print("STRICT")
"""
    env = pod_environment("/mnt/scratch", "/mnt/out/termination-log")
    result = run_as_pod(
        [str(VENV_BIN / "python"), "-c", probe],
        env,
        binds={f"/mnt/{k}": v for k, v in pod_volumes.items()},
        writable=["/mnt/out", "/mnt/scratch"],
        timeout=120,
    )
    assert result.returncode == 0 and "STRICT" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_the_worker_trains_as_uid_65532_on_a_read_only_root_without_home_or_network(pod_volumes):
    config = worker_config_dict(
        Path("/mnt/scratch"), Path("/mnt/models"), data_dir=Path("/mnt/data"), max_steps=3
    )
    config["paths"] |= {"outputDir": "/mnt/out/adapter", "checkpointDir": "/mnt/out/checkpoints"}
    config["paths"]["claimMounts"]["out"] = "/mnt/out"
    (pod_volumes["config"] / "worker-config.yaml").write_text(yaml.safe_dump(config))
    (pod_volumes["config"] / "worker-config.yaml").chmod(0o644)
    env = pod_environment("/mnt/scratch", "/mnt/out/termination-log")
    result = run_as_pod(
        ["finetune-worker", "train", "--config", "/mnt/config/worker-config.yaml"],
        env,
        binds={f"/mnt/{k}": v for k, v in pod_volumes.items()},
        writable=["/mnt/out", "/mnt/scratch"],
    )
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    summary = json.loads((pod_volumes["out"] / "termination-log").read_text())
    assert summary["result"] == "Succeeded" and summary["progress"]["step"] == 3
    assert (pod_volumes["out"] / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (pod_volumes["out"] / "adapter").stat().st_uid == POD_UID


def test_the_operator_package_imports_as_the_operator_image_runs_it(pod_volumes):
    # Exactly the image's ENV: the container runtime adds no HOME for a uid without a passwd
    # entry that the image does not set itself.
    env = image_env(
        ROOT / "Dockerfile.operator", prefix_replacements={"/opt/operator/bin": str(VENV_BIN)}
    )
    result = run_as_pod(
        [str(VENV_BIN / "python"), "-c", "import finetune_operator.main, kopf; print('IMPORTED')"],
        env,
        binds={},
        timeout=120,
    )
    assert result.returncode == 0 and "IMPORTED" in result.stdout, result.stderr[-4000:]
