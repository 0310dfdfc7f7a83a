"""Run a command the way a worker pod runs it, without a container runtime.

CI cannot build or run the images, so what the pod imposes is emulated with Linux namespaces
(util-linux `unshare` and `setpriv`, as root):

- uid/gid 65532 with no passwd entry, no supplementary groups, no capabilities;
- a read-only root filesystem: every mount is remounted read-only except `/dev` (the pod's
  /dev/shm emptyDir) and the writable volumes the caller names (the scratch emptyDir, the
  output PVC);
- no network: a fresh network namespace with only a loopback that is down;
- the environment is exactly what the caller gives (the image's ENV and the pod's env), nothing
  inherited.

The interpreter and the project must be readable by uid 65532. A Python installed under a
private directory (pyenv in /root, mode 700) is made reachable by mounting a tmpfs over the
private directory that holds only the needed child, bound back in: the same files, as an image
would have them at a world-readable path.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

POD_UID = 65532
SANDBOX_ROOT = "/mnt"  # mounts of the sandbox live here, in its own mount namespace only
# What a Debian-based image's PATH holds before the Dockerfile prepends to it.
BASE_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable_reason() -> str | None:
    """Why this machine cannot build the sandbox, or None."""
    if os.geteuid() != 0:
        return "the pod sandbox needs root (mount and user namespaces via unshare)"
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    return None


def python_paths() -> list[Path]:
    """What a process of this environment must read: the interpreter, the venv, the sources."""
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    import finetune_api
    import finetune_operator
    import finetune_worker

    for package in (finetune_api, finetune_operator, finetune_worker):
        paths.add(Path(package.__file__).resolve().parent.parent)
    return sorted(paths)


def hidden_ancestors(paths: Iterable[Path]) -> dict[Path, set[str]]:
    """Directories others cannot traverse on the way to `paths`, each with the child needed."""
    hidden: dict[Path, set[str]] = {}
    for path in paths:
        parts = path.resolve().parts
        for depth in range(1, len(parts)):
            ancestor = Path(*parts[:depth])
            if not ancestor.stat().st_mode & stat.S_IXOTH:
                hidden.setdefault(ancestor, set()).add(parts[depth])
    return hidden


def sandbox_script(
    argv: list[str],
    env: Mapping[str, str],
    *,
    binds: Mapping[str, Path],
    writable: Iterable[str],
    reach: Iterable[Path],
) -> str:
    """The shell script run inside `unshare --mount --net`: mounts, then drop to the pod user.

    `binds` maps sandbox paths (under /mnt) to host directories; `writable` names the sandbox
    paths that stay writable (each a bind or a fresh tmpfs); `reach` are host paths uid 65532
    must be able to read.
    """
    q = shlex.quote
    lines = [
        "set -eu",
        "mount --make-rprivate /",
        f"mount -t tmpfs -o mode=755 tmpfs {SANDBOX_ROOT}",
        f"mkdir -p {SANDBOX_ROOT}/.hold",
    ]
    # the volumes first: hiding a private directory below must not hide a bind's source
    writable = list(writable)
    for target, source in binds.items():
        lines += [f"mkdir -p {q(target)}", f"mount --bind {q(str(source))} {q(target)}"]
    for target in writable:
        if target not in binds:
            lines += [f"mkdir -p {q(target)}", f"mount -t tmpfs -o mode=1777 tmpfs {q(target)}"]
    for i, (ancestor, children) in enumerate(
        sorted(hidden_ancestors(reach).items(), key=lambda item: len(item[0].parts))
    ):
        held = []
        for j, child in enumerate(sorted(children)):
            hold = f"{SANDBOX_ROOT}/.hold/{i}-{j}"
            held.append((child, hold))
            lines += [f"mkdir -p {hold}", f"mount --bind {q(str(ancestor / child))} {hold}"]
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {q(str(ancestor))}")
        for child, hold in held:
            target = q(str(ancestor / child))
            lines += [f"mkdir -p {target}", f"mount --bind {hold} {target}"]
    keep = "|".join(
        [
            "/proc",
            "/proc/*",
            "/sys",
            "/sys/*",
            "/dev",
            "/dev/*",
            *[shlex.quote(w) for w in writable],
        ]
    )
    lines += [
        "awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r m; do",
        f'  case "$m" in {keep}) continue;; esac',
        '  [ -e "$m" ] || continue  # shadowed by a mount above',
        '  mount -o remount,bind,ro "$m"',
        "done",
    ]
    env_args = " ".join(q(f"{k}={v}") for k, v in env.items())
    lines.append(
        f"exec setpriv --reuid={POD_UID} --regid={POD_UID} --clear-groups "
        f"--inh-caps=-all --bounding-set=-all env -i {env_args} " + " ".join(q(a) for a in argv)
    )
    return "\n".join(lines)


def run_as_pod(
    argv: list[str],
    env: Mapping[str, str],
    *,
    binds: Mapping[str, Path],
    writable: Iterable[str] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    script = sandbox_script(argv, env, binds=binds, writable=writable, reach=python_paths())
    return subprocess.run(
        ["unshare", "--mount", "--net", "--fork", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def image_env(dockerfile: Path, *, prefix_replacements: Mapping[str, str]) -> dict[str, str]:
    """The final stage's ENV of a Dockerfile as the container sees it, with `$PATH` expanded
    to the base image's and the image's install prefix mapped to this machine's."""
    from dockerfile import final_stage, instructions

    env: dict[str, str] = {"PATH": BASE_IMAGE_PATH}
    for op, args in final_stage(instructions(dockerfile)):
        if op != "ENV":
            continue
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            value = value.replace("$PATH", env.get("PATH", BASE_IMAGE_PATH))
            for old, new in prefix_replacements.items():
                value = value.replace(old, new)
            env[key] = value
    return env
