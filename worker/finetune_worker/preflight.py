"""Preflight: can this environment run what the plan assumes? Checked before the model loads.

A plan is a memory and speed prediction for one set of kernels. On a GPU it assumes liger's
Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), and Triton compiles a small
C launcher with the system C compiler the first time a kernel runs; QLoRA also needs
bitsandbytes' CUDA library, and packing the flash varlen kernel. An image without one of these
used to crash at the first training step, minutes after the pod started, as a `WorkerCrashed`
that the Job retried. The preflight finds out in seconds and fails once, with
`WorkerEnvironmentError` (exit code 16), naming everything that is missing and how to fix the
image. It never falls back silently: the worker runs without fused kernels only when the plan
says so (`plan.fusedKernels: false`), because the planner predicted memory for that.

`problems()` does the checks that need no GPU (imports, compiler, headers, a writable cache)
and, with `launch=True` and a visible GPU, runs each kernel once on a tiny tensor, which
exercises the whole compile-and-load path. `finetune-worker preflight` runs the same checks on
their own, so an image can be checked with `docker run --gpus all IMAGE preflight`.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import WorkerEnvironmentError

log = logging.getLogger(__name__)

IMAGE_FIX = (
    "Build the worker image from Dockerfile.worker, whose final stage installs gcc "
    "and libc6-dev for Triton, or set CC to a C compiler in the image."
)


def run_preflight(plan: Any, device: str, *, packing: bool = False, launch: bool = True) -> None:
    """Raise WorkerEnvironmentError listing every missing piece; return quietly otherwise."""
    found = problems(plan, device, packing=packing, launch=launch)
    if found:
        raise WorkerEnvironmentError(
            "this worker environment cannot run the plan: " + "; ".join(found) + f". {IMAGE_FIX}"
        )
    log.info("preflight: the environment can run the plan (%s)", describe(plan, device, packing))


def describe(plan: Any, device: str, packing: bool) -> str:
    parts = [f"device {device}", f"method {_plan_field(plan, 'method', 'lora')}"]
    if device == "cuda":
        parts.append("fused kernels" if fused_kernels_planned(plan) else "no fused kernels")
        if packing:
            parts.append("varlen attention")
    return ", ".join(parts)


def fused_kernels_planned(plan: Any) -> bool:
    return bool(_plan_field(plan, "fused_kernels", True))


def problems(plan: Any, device: str, *, packing: bool = False, launch: bool = True) -> list[str]:
    """What this environment lacks for `plan` on `device`; empty when it can run it."""
    if device != "cuda":
        if str(_plan_field(plan, "strategy", "single")) == "fsdp":
            # accelerate shards only on accelerators: on the CPU it would train whole
            # replicas (plain DDP) while reporting success, with the wrong memory per rank.
            return [
                (
                    "plan.strategy is 'fsdp', but FSDP through accelerate needs a GPU per "
                    "process and this worker has none (on the CPU accelerate would silently "
                    "train unsharded replicas)"
                )
            ]
        return []  # on the CPU nothing is compiled at run time and no fused kernel is used
    found: list[str] = []
    if fused_kernels_planned(plan):
        static = fused_kernel_problems()
        found += static
        if launch and not static:
            found += _launch("liger's fused RMSNorm kernel", _run_fused_kernel)
    found += compiled_layers_problems(plan)
    if str(_plan_field(plan, "method", "lora")).lower() == "qlora":
        missing = _import_problem("bitsandbytes", "QLoRA's NF4 weights")
        found += [missing] if missing else []
        if launch and not missing:
            found += _launch("bitsandbytes' NF4 quantisation", _run_nf4_roundtrip)
    if str(_plan_field(plan, "method", "lora")).lower() == "fp8":
        from . import fp8

        ok, why = fp8.supported("cuda")
        found += [] if ok else [f"plan.method is 'fp8' but {why}"]
        if launch and ok:
            found += _launch("an FP8 GEMM with row-wise scales", _run_fp8_gemm)
    if packing and launch:
        found += _launch("the flash varlen attention kernel", _run_varlen_attention)
    return found


def _run_fp8_gemm() -> None:
    """Forward and input gradient of a small FP8 layer (builds the Triton quantiser)."""
    import torch

    from . import fp8

    layer = fp8.float8_linear_class().from_linear(torch.nn.Linear(64, 32, bias=False), "cuda")
    x = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    torch.cuda.synchronize()


def fused_kernel_problems() -> list[str]:
    """Liger's kernels are Triton kernels: Triton, liger, a C compiler, Python's headers and a
    writable cache directory must all be there before the first launch."""
    found = [
        p
        for p in (
            _import_problem("triton", "the fused kernels"),
            _import_problem("liger_kernel.transformers", "the fused kernels"),
        )
        if p
    ]
    compiler = c_compiler()
    if compiler is None:
        found.append(
            "no C compiler: Triton compiles its CUDA launcher with $CC, gcc or clang "
            f"at the first kernel launch, and none is on PATH ({os.environ.get('PATH', '')})"
        )
    headers = python_headers()
    if not (headers / "Python.h").is_file():
        found.append(f"no Python C headers at {headers} (Triton's launcher includes Python.h)")
    cache = triton_cache_dir()
    if not _writable(cache):
        found.append(
            f"Triton's cache directory {cache} is not writable (set TRITON_CACHE_DIR "
            "to a writable path such as /tmp/triton)"
        )
    return found


def c_compiler() -> str | None:
    """The compiler Triton would use: $CC if set, else gcc, else clang (triton/runtime/build.py)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("gcc") or shutil.which("clang")


def python_headers() -> Path:
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":  # Debian's system Python; Triton makes the same correction
        scheme = "posix_prefix"
    return Path(sysconfig.get_paths(scheme=scheme)["include"])


def triton_cache_dir() -> Path:
    """Where Triton writes compiled kernels: $TRITON_CACHE_DIR, else $TRITON_HOME/.triton/cache
    (TRITON_HOME defaults to the home directory, which a pod without a passwd entry lacks)."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return Path(home) / ".triton" / "cache"


def inductor_cache_dir() -> Path:
    """Where Inductor writes the compiled layers' generated code: $TORCHINDUCTOR_CACHE_DIR, else
    torch's own default (torchinductor_<user> under the temporary directory)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(default_cache_dir())


def compiled_layers_problems(plan: Any) -> list[str]:
    """A plan with compiled decoder layers writes Inductor's generated kernels at its first
    step (the same C compiler as Triton's launcher, checked with the fused kernels)."""
    if not _plan_field(plan, "compiled_layers", False):
        return []
    directory = inductor_cache_dir()
    if _writable(directory):
        return []
    return [
        f"plan.compiledLayers is true but Inductor's cache directory {directory} is not "
        "writable (set TORCHINDUCTOR_CACHE_DIR to a writable path; the operator points it at "
        "the pod's scratch volume)"
    ]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _import_problem(module: str, needed_for: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means it cannot be used
        return f"{module} cannot be imported ({type(exc).__name__}: {exc}); {needed_for} need it"
    return None


def _launch(what: str, run: Callable[[], None]) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return [f"no CUDA device is visible, so {what} cannot run"]
    try:
        run()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - whatever broke, the message carries it
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return [f"{what} failed to compile or run ({type(exc).__name__}: {first_line})"]
    return []


def _run_fused_kernel() -> None:
    import torch
    from liger_kernel.transformers import LigerRMSNorm

    norm = LigerRMSNorm(64).to("cuda", torch.bfloat16)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    norm(x).float().sum().backward()


def _run_nf4_roundtrip() -> None:
    import bitsandbytes.functional as bnbf
    import torch

    weight = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
    bnbf.dequantize_4bit(packed, state)


def _run_varlen_attention() -> None:
    import torch

    from . import attention

    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    attention.varlen_attention_forward(None, q, q, q, None, **attention.boundaries([6, 10]))


def _plan_field(plan: Any, name: str, default: Any) -> Any:
    from .modeling import field

    return field(plan, name, default)
