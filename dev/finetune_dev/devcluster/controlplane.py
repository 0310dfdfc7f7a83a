"""A real, local Kubernetes control plane for development, tests and the demo.

``up`` starts etcd, kube-apiserver (secure port, RBAC, service-account issuer),
kube-controller-manager, kube-scheduler and kwok as child processes on loopback with
free ports and a private data directory, and writes an admin kubeconfig. ``down``
stops every process it started and deletes the directory. With ``with_crds`` it also
installs the project's CRDs, generated from the API models of this very package, so
that an example applies on the first try. The state of a running
cluster lives in ``<dir>/state.json`` so that a separate ``down`` (or a crashed test
run followed by a new one) can find and stop it.

Everything is one implementation: ``finetune-dev cluster up|down|env``, the pytest
fixtures and ``make demo`` all call the functions here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import binaries

SERVICE_CIDR = "10.96.0.0/24"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Nodes with this annotation are driven by kwok (heartbeats, pod lifecycle); any other
# node (the demo's local node agent, a test acting as a kubelet) is left alone.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
# Server-side apply owner of the CRDs that `finetune-dev cluster up` installs.
CRD_FIELD_MANAGER = "finetune-operator-dev"


class ClusterError(RuntimeError):
    """Something people must act on: the message says what happened and what to do."""


@dataclass
class Cluster:
    directory: str
    kubeconfig: str
    server: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def state_file(self) -> Path:
        return Path(self.directory) / "state.json"

    def save(self) -> None:
        self.state_file.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Cluster | None:
        state = Path(directory) / "state.json"
        if not state.exists():
            return None
        return cls(**json.loads(state.read_text()))

    def log_path(self, component: str) -> Path:
        return Path(self.directory) / "logs" / f"{component}.log"

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}

    def dead_components(self) -> list[str]:
        return [name for name, pid in self.pids.items() if not _alive(pid)]


def default_directory() -> Path:
    return binaries.cache_root() / "dev-cluster"


def _log(msg: str) -> None:
    print(f"[dev-cluster] {msg}", file=sys.stderr, flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); ask /proc whether it actually runs.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args[:2])} failed: {res.stderr.strip()}")


def sign_with_ca(pki: Path, name: str, ext: str, *, days: int) -> None:
    """Sign `name`.csr with the CA in `pki` (ca.crt, ca.key) into `name`.crt, with the
    extensions in the file `ext`."""
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        str(days),
        "-extfile",
        ext,
        cwd=pki,
    )


def _make_pki(pki: Path) -> None:
    """CA, apiserver serving cert, admin client cert and the service-account key pair.

    EC keys: generating them takes milliseconds, so a cluster starts in seconds.
    """
    pki.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "30",
        "-subj",
        "/CN=finetune-operator-dev-ca",
        cwd=pki,
    )
    (pki / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,"
        "DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (
        ("apiserver", "/CN=kube-apiserver", "server.ext"),
        ("admin", "/O=system:masters/CN=dev-admin", "client.ext"),
    ):
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki
        )
        sign_with_ca(pki, name, ext, days=30)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key", cwd=pki)
    _openssl("ec", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "finetune-dev",
                        "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
                    }
                ],
                "users": [
                    {
                        "name": "dev-admin",
                        "user": {
                            "client-certificate": str(pki / "admin.crt"),
                            "client-key": str(pki / "admin.key"),
                        },
                    }
                ],
                "contexts": [
                    {
                        "name": "finetune-dev",
                        "context": {
                            "cluster": "finetune-dev",
                            "user": "dev-admin",
                            "namespace": "default",
                        },
                    }
                ],
                "current-context": "finetune-dev",
            }
        )
    )


def _spawn(cluster: Cluster, name: str, argv: list[str]) -> None:
    log = cluster.log_path(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session: Ctrl-C in the terminal does not reach the children directly;
        # `down` (or the owner's cleanup) stops them in order.
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    cluster.pids[name] = proc.pid
    cluster.save()


def _log_tail(cluster: Cluster, name: str, lines: int = 25) -> str:
    try:
        text = cluster.log_path(name).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _crash_message(cluster: Cluster, name: str) -> str:
    tail = _log_tail(cluster, name)
    hint = "Its log is at " + str(cluster.log_path(name)) + "."
    if "address already in use" in tail:
        hint += (
            " A port it wanted was taken by another process between choosing and "
            "binding; run `finetune-dev cluster up` again (it picks new free ports)."
        )
    elif name == "etcd" and ("database file" in tail or "member" in tail):
        hint += (
            " The etcd data directory looks stale or foreign; run "
            "`finetune-dev cluster down` to remove it, then `finetune-dev cluster up`."
        )
    return f"{name} exited during start-up. {hint}\nLast lines:\n{tail}"


def _wait(cluster: Cluster, name: str, what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if name in cluster.pids and not _alive(cluster.pids[name]):
            raise ClusterError(_crash_message(cluster, name))
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError, subprocess.SubprocessError):
            pass
        time.sleep(0.2)
    raise ClusterError(
        f"timed out after {timeout:.0f}s waiting for {what}. Log: {cluster.log_path(name)}\n"
        + _log_tail(cluster, name)
    )


def _https_ok(cluster: Cluster, path: str) -> bool:
    pki = Path(cluster.directory) / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(cluster.server + path, context=ctx, timeout=2) as r:
        return r.status == 200


def kubectl(
    cluster: Cluster, *args: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(binaries.kubectl_path()), "--kubeconfig", cluster.kubeconfig, *args],
        input=input,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and res.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def up(
    directory: str | os.PathLike | None = None, *, gpu_nodes: int = 3, with_crds: bool = False
) -> Cluster:
    """Start a control plane in `directory` (idempotent: a healthy one is reused).

    `with_crds` installs (or updates, on a reused cluster) the FineTuneJob, AdapterMerge and
    AdapterDeployment CRDs. Off by default: the test fixtures and the demo apply the
    committed `crds/` themselves, and some tests need a cluster without them.
    """
    directory = Path(directory or default_directory()).resolve()
    existing = Cluster.load(directory)
    if existing is not None:
        dead = existing.dead_components()
        if not dead:
            try:
                if _https_ok(existing, "/readyz"):
                    _log(f"control plane already running at {existing.server}")
                    if with_crds:
                        install_crds(existing)
                    return existing
            except (OSError, urllib.error.URLError, ssl.SSLError):
                pass
        _log(
            f"found a stale cluster directory {directory} (components not running: "
            f"{', '.join(dead) or 'apiserver not ready'}); stopping what is left and "
            "starting fresh"
        )
        down(directory, quiet=True)
    elif directory.exists() and any(directory.iterdir()):
        raise ClusterError(
            f"{directory} exists and is not a dev cluster directory (no state.json); refusing "
            "to overwrite it. Choose another directory or remove it."
        )

    paths = binaries.ensure_built()
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    pki = directory / "pki"
    _make_pki(pki)
    ports = {"etcd": _free_port(), "etcd-peer": _free_port(), "apiserver": _free_port()}
    cluster = Cluster(
        directory=str(directory),
        kubeconfig=str(directory / "kubeconfig"),
        server=f"https://127.0.0.1:{ports['apiserver']}",
        ports=ports,
        started_at=time.time(),
    )
    _write_kubeconfig(Path(cluster.kubeconfig), cluster.server, pki)
    cluster.save()
    try:
        _start_components(cluster, paths, pki)
        _wait_for_controllers(cluster)
        if gpu_nodes:
            create_fake_gpu_nodes(cluster, gpu_nodes)
        if with_crds:
            install_crds(cluster)
    except BaseException:
        down(directory, quiet=True)
        raise
    _log(
        f"control plane ready at {cluster.server} in {time.monotonic() - started:.1f}s "
        f"(kubeconfig: {cluster.kubeconfig})"
    )
    return cluster


def _start_components(cluster: Cluster, paths: dict[str, Path], pki: Path) -> None:
    d = Path(cluster.directory)
    p = cluster.ports
    etcd_url = f"http://127.0.0.1:{p['etcd']}"
    peer_url = f"http://127.0.0.1:{p['etcd-peer']}"
    _log("starting etcd")
    _spawn(
        cluster,
        "etcd",
        [
            str(paths["etcd"]),
            "--name",
            "dev",
            "--data-dir",
            str(d / "etcd"),
            "--listen-client-urls",
            etcd_url,
            "--advertise-client-urls",
            etcd_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"dev={peer_url}",
            # A throwaway cluster: durability is not worth the fsync latency.
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ],
    )
    _wait(
        cluster,
        "etcd",
        "etcd to answer /health",
        lambda: urllib.request.urlopen(etcd_url + "/health", timeout=2).status == 200,
        30,
    )

    _log("starting kube-apiserver")
    _spawn(
        cluster,
        "kube-apiserver",
        [
            str(paths["kube-apiserver"]),
            "--etcd-servers",
            etcd_url,
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            "--secure-port",
            str(p["apiserver"]),
            "--tls-cert-file",
            str(pki / "apiserver.crt"),
            "--tls-private-key-file",
            str(pki / "apiserver.key"),
            "--client-ca-file",
            str(pki / "ca.crt"),
            "--authorization-mode",
            "RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file",
            str(pki / "sa.pub"),
            "--service-account-signing-key-file",
            str(pki / "sa.key"),
            "--api-audiences",
            "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range",
            SERVICE_CIDR,
            "--allow-privileged=true",
            # Nodes would be created with a not-ready taint that only the node-lifecycle
            # controller removes; that controller is off (see the controller-manager flags).
            "--disable-admission-plugins",
            "TaintNodesByCondition",
            "--profiling=false",
            "--v=1",
        ],
    )
    _wait(
        cluster,
        "kube-apiserver",
        "kube-apiserver /readyz",
        lambda: _https_ok(cluster, "/readyz"),
        90,
    )

    _log("starting kube-controller-manager, kube-scheduler and kwok")
    _spawn(
        cluster,
        "kube-controller-manager",
        [
            str(paths["kube-controller-manager"]),
            "--kubeconfig",
            cluster.kubeconfig,
            "--authentication-kubeconfig",
            cluster.kubeconfig,
            "--authorization-kubeconfig",
            cluster.kubeconfig,
            "--leader-elect=false",
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            "0",
            "--service-account-private-key-file",
            str(pki / "sa.key"),
            "--root-ca-file",
            str(pki / "ca.crt"),
            "--use-service-account-credentials=false",
            # Fast garbage collection and job sync keep the tests short.
            "--concurrent-gc-syncs",
            "10",
            # No node-lifecycle controller: fake nodes send no heartbeats, and tainting them
            # NotReady after 40 s would stop scheduling in the middle of a test run.
            "--controllers",
            (
                "*,-node-ipam-controller,-cloud-node-lifecycle-controller,"
                "-service-lb-controller,-node-route-controller,"
                "-node-lifecycle-controller"
            ),
            "--v=1",
        ],
    )
    _spawn(
        cluster,
        "kube-scheduler",
        [
            str(paths["kube-scheduler"]),
            "--kubeconfig",
            cluster.kubeconfig,
            "--authentication-kubeconfig",
            cluster.kubeconfig,
            "--authorization-kubeconfig",
            cluster.kubeconfig,
            "--leader-elect=false",
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            "0",
            "--v=1",
        ],
    )
    key, value = KWOK_NODE_ANNOTATION
    _spawn(
        cluster,
        "kwok",
        [
            str(paths["kwok"]),
            "--kubeconfig",
            cluster.kubeconfig,
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            "--node-ip",
            "10.0.0.1",
            "--cidr",
            "10.0.0.1/24",
            "--server-address",
            "127.0.0.1:0",
            "--config",
            str(Path(__file__).with_name("kwok-stages.yaml")),
        ],
    )


def _wait_for_controllers(cluster: Cluster) -> None:
    # The default ServiceAccount appears once the controller-manager's serviceaccount
    # controller runs: proof that it is up and talking to the apiserver.
    _wait(
        cluster,
        "kube-controller-manager",
        "the default ServiceAccount (controller-manager)",
        lambda: (
            kubectl(
                cluster, "get", "serviceaccount", "default", "-n", "default", check=False
            ).returncode
            == 0
        ),
        60,
    )
    for name in ("kube-scheduler", "kwok"):
        if not _alive(cluster.pids[name]):
            raise ClusterError(_crash_message(cluster, name))


def install_crds(cluster: Cluster, timeout: float = 30) -> list[str]:
    """Apply the CRDs generated from this package's API models; wait until each is Established.

    Generated in-process rather than read from `crds/`, so an installed package needs no
    checkout (in a checkout they are the same text: a test fails on drift). Server-side
    apply with `--force-conflicts`: on a dev cluster, the running code's API is the truth,
    whoever applied an older version of it.
    """
    import yaml

    from finetune_api import crdgen

    documents = [yaml.safe_load(doc) for doc in crdgen.generate().values()]
    names = apply_crds(cluster, documents, timeout=timeout)
    _log(f"installed CRDs {', '.join(names)}")
    return names


def apply_crds(cluster: Cluster, documents: list[dict], *, timeout: float = 60) -> list[str]:
    """Server-side apply CRDs (forcing conflicts: on a dev cluster the running code's API is
    the truth) and wait until the API server serves every one. -> their names."""
    import json

    names = [d["metadata"]["name"] for d in documents]
    kubectl(
        cluster,
        "apply",
        "--server-side",
        f"--field-manager={CRD_FIELD_MANAGER}",
        "--force-conflicts",
        "-f",
        "-",
        input="\n".join(json.dumps(d) for d in documents),
    )
    _wait(
        cluster,
        "kube-apiserver",
        f"CRDs {', '.join(names)} to be Established",
        lambda: all(
            kubectl(
                cluster,
                "get",
                "crd",
                name,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                check=False,
            ).stdout
            == "True"
            for name in names
        ),
        timeout,
    )
    return names


def fake_gpu_node(
    name: str,
    *,
    product: str = "NVIDIA-H100-80GB-HBM3",
    memory_mib: int = 81559,
    gpus: int = 8,
    compute: tuple[int, int] | None = None,
) -> dict:
    """A kwok-managed Node labelled the way NVIDIA GPU Feature Discovery labels one.

    `compute`: the GPU's compute capability (GFD's `nvidia.com/gpu.compute.major`/`.minor`,
    which the operator pins fp8 plans to); by default the product's, from the planner's
    table, and no compute labels for a product the table does not know."""
    from finetune_operator.planner.gpus import compute_capability

    key, value = KWOK_NODE_ANNOTATION
    major_minor = compute or compute_capability(product)
    compute_labels = (
        {
            "nvidia.com/gpu.compute.major": str(major_minor[0]),
            "nvidia.com/gpu.compute.minor": str(major_minor[1]),
        }
        if major_minor
        else {}
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {key: value},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": str(memory_mib),
                "nvidia.com/gpu.count": str(gpus),
                **compute_labels,
            },
        },
        "spec": {},
        "status": {
            "allocatable": {
                "cpu": "64",
                "memory": "512Gi",
                "pods": "110",
                "nvidia.com/gpu": str(gpus),
            },
            "capacity": {
                "cpu": "64",
                "memory": "512Gi",
                "pods": "110",
                "nvidia.com/gpu": str(gpus),
            },
        },
    }


FAKE_GPU_FLEET = (
    ("gpu-h100-0", "NVIDIA-H100-80GB-HBM3", 81559),
    ("gpu-l4-0", "NVIDIA-L4", 23034),
    ("gpu-h200-0", "NVIDIA-H200", 143771),
)


def create_fake_gpu_nodes(cluster: Cluster, count: int = len(FAKE_GPU_FLEET)) -> list[str]:
    names = []
    for name, product, mem in FAKE_GPU_FLEET[:count]:
        kubectl(
            cluster,
            "apply",
            "-f",
            "-",
            input=json.dumps(fake_gpu_node(name, product=product, memory_mib=mem)),
        )
        names.append(name)
    # kwok sets the Ready condition; the scheduler only binds to Ready nodes.
    _wait(
        cluster,
        "kwok",
        "kwok to mark the fake GPU nodes Ready",
        lambda: all(
            kubectl(
                cluster,
                "get",
                "node",
                n,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            ).stdout
            == "True"
            for n in names
        ),
        30,
    )
    return names


def down(directory: str | os.PathLike | None = None, *, quiet: bool = False) -> bool:
    """Stop every process of the cluster in `directory` and remove the directory."""
    import shutil

    directory = Path(directory or default_directory()).resolve()
    cluster = Cluster.load(directory)
    if cluster is None:
        if not quiet:
            _log(f"no dev cluster at {directory}; nothing to stop")
        return False
    # Reverse start order: clients before the apiserver, the apiserver before etcd.
    for name in reversed(list(cluster.pids)):
        _stop(cluster.pids[name])
    shutil.rmtree(directory, ignore_errors=True)
    if not quiet:
        _log(f"stopped {', '.join(cluster.pids) or 'nothing'} and removed {directory}")
    return True


def _stop(pid: int, timeout: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        _reap(pid)
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def temporary_directory(prefix: str = "ftop-cluster-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
