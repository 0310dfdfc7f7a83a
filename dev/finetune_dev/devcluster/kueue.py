"""Kueue on the local control plane: its CRDs and its controller manager as a local process.

The operator hands a FineTuneJob that names a queue to Kueue by creating the Job
suspended with the label ``kueue.x-k8s.io/queue-name``; Kueue's job controller makes a
Workload of it, its scheduler admits that Workload when the ClusterQueue has quota, and the
job controller then un-suspends the Job. ``start`` runs that real controller (built from
``sigs.k8s.io/kueue`` like the control plane, see ``binaries.py``) against a running dev
cluster; ``stop`` ends it. Only the tests that queue Jobs start it.

What differs from Kueue's own manifests, and why:

* No admission webhooks are registered. The API server could not reach a Service of a local
  process, and none is needed: the operator already creates Jobs suspended and labelled,
  which is all Kueue's mutating Job webhook would add. The manager still serves its webhook
  port (on 127.0.0.1), because it serves the CRD conversion webhook there.
* The CRDs come from the module itself (``config/components/crd/bases``), with the
  conversion webhook that Kueue's kustomization adds pointing at that local port by URL
  instead of at a Service. Every object here is read and written as ``v1beta2``, the
  storage version; conversion only runs for a ``v1beta1`` request.
* Certificates: Kueue's internal certificate management (the only mode that does not
  expect files under ``/etc/kueue``) keeps a CA and a serving certificate in the Secret
  ``kueue-system/kueue-webhook-server-cert``, injects the CA into the CRDs, and expects the
  kubelet to mount that Secret into its cert directory. There is no kubelet here, so they
  are generated with openssl beforehand, as ``controlplane.py`` generates the control
  plane's, written both into the Secret and into the cert directory; Kueue finds them valid
  and keeps them. The serving certificate also names 127.0.0.1, so the API server verifies
  the conversion webhook it calls by URL.
* Leader election is off, only the ``batch/job`` integration is on, and the visibility API
  server (an aggregated API server that needs the aggregation layer) is off.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import binaries, controlplane
from .controlplane import Cluster, ClusterError

NAMESPACE = "kueue-system"
SECRET = "kueue-webhook-server-cert"
WEBHOOK_SERVICE = "kueue-webhook-service"
# The CRDs Kueue's kustomization gives a conversion webhook (config/components/crd), and
# the ones its certificate manager injects the CA into: the same list.
CONVERSION_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
COMPONENT = "kueue"


@dataclass
class Kueue:
    cluster: Cluster
    directory: Path
    pid: int
    ports: dict[str, int]

    @property
    def log_path(self) -> Path:
        return self.cluster.log_path(COMPONENT)

    def alive(self) -> bool:
        return controlplane._alive(self.pid)

    def describe(self) -> str:
        """For a failing test: whether the manager still runs, and where its log is."""
        state = "running" if self.alive() else "NOT running (it exited)"
        return f"Kueue {binaries.KUEUE_VERSION} is {state}; its log is {self.log_path}"


def crd_documents(webhook_port: int) -> list[dict]:
    """Kueue's CRDs from the module source, with the conversion webhook at 127.0.0.1."""
    bases = binaries.module_source(COMPONENT) / "config" / "components" / "crd" / "bases"
    files = sorted(bases.glob("kueue.x-k8s.io_*.yaml"))
    if not files:
        raise ClusterError(f"no Kueue CRDs under {bases}: is the module source complete?")
    documents = []
    for path in files:
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERSION_CRDS:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/convert"},
                    "conversionReviewVersions": ["v1"],
                },
            }
        documents.append(crd)
    return documents


def _make_certs(pki: Path) -> None:
    """A CA and a serving certificate in the shape Kueue's certificate manager accepts.

    It checks the CA against the DNS name `kueue-ca` and reads its key as PKCS#1 RSA, and
    checks the serving certificate against `<service>.<namespace>.svc`, valid for at least
    its 90-day look-ahead (else it replaces both with its own, which nothing would mount).
    """
    pki.mkdir(parents=True, exist_ok=True)
    run = controlplane._openssl
    run("genrsa", "-traditional", "-out", "ca.key", "2048", cwd=pki)
    run(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/O=kueue/CN=kueue-ca",
        "-addext",
        "subjectAltName=DNS:kueue-ca",
        cwd=pki,
    )
    (pki / "server.ext").write_text(
        f"subjectAltName=DNS:{WEBHOOK_SERVICE}.{NAMESPACE}.svc,IP:127.0.0.1\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    run("genrsa", "-traditional", "-out", "tls.key", "2048", cwd=pki)
    run(
        "req",
        "-new",
        "-key",
        "tls.key",
        "-out",
        "tls.csr",
        "-subj",
        f"/CN={WEBHOOK_SERVICE}.{NAMESPACE}.svc",
        cwd=pki,
    )
    controlplane.sign_with_ca(pki, "tls", "server.ext", days=365)


def _config(ports: dict[str, int], cert_dir: Path) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": SECRET,
        },
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
    }


def _log(msg: str) -> None:
    controlplane._log(f"kueue: {msg}")


def install_crds(cluster: Cluster, webhook_port: int, timeout: float = 60) -> list[str]:
    return controlplane.apply_crds(cluster, crd_documents(webhook_port), timeout=timeout)


def _secret(pki: Path) -> dict:
    import base64

    data = {
        name: base64.b64encode((pki / name).read_bytes()).decode()
        for name in ("ca.crt", "ca.key", "tls.crt", "tls.key")
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": data,
    }


def _webhook_serves(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
            return True


def _ready(port: int) -> bool:
    # /readyz/readyz is the check Kueue's main manager adds (webhook server started);
    # the short-lived certificate bootstrap manager on the same port does not have it.
    url = f"http://127.0.0.1:{port}/readyz/readyz"
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def start(cluster: Cluster, timeout: float = 120) -> Kueue:
    """Install Kueue's CRDs, its namespace and certificates, and start its manager.

    Builds the binary first if it is not cached. Raises ClusterError naming the log when
    the manager exits or does not become ready in time.
    """
    paths = binaries.ensure_built([COMPONENT])
    started = time.monotonic()
    directory = Path(cluster.directory) / "kueue"
    directory.mkdir(parents=True, exist_ok=True)
    pki = directory / "certs"
    _make_certs(pki)
    ports = {name: controlplane._free_port() for name in ("webhook", "health", "metrics")}
    install_crds(cluster, ports["webhook"])
    controlplane.kubectl(
        cluster,
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        ),
    )
    controlplane.kubectl(cluster, "apply", "-f", "-", input=json.dumps(_secret(pki)))
    config = directory / "config.yaml"
    config.write_text(yaml.safe_dump(_config(ports, pki)))
    _log(f"starting the manager (log: {cluster.log_path(COMPONENT)})")
    controlplane._spawn(
        cluster,
        COMPONENT,
        [
            str(paths[COMPONENT]),
            f"--config={config}",
            f"--kubeconfig={cluster.kubeconfig}",
            "--zap-log-level=info",
        ],
    )
    kueue = Kueue(cluster, directory, cluster.pids[COMPONENT], ports)
    try:
        controlplane._wait(
            cluster,
            COMPONENT,
            "Kueue's manager to serve its webhook port and report ready",
            lambda: _webhook_serves(ports["webhook"], pki / "ca.crt") and _ready(ports["health"]),
            timeout,
        )
    except BaseException:
        stop(kueue)
        raise
    _log(f"ready in {time.monotonic() - started:.1f}s (pid {kueue.pid})")
    return kueue


def stop(kueue: Kueue) -> None:
    """Stop the manager. Its CRDs and objects stay: the cluster is torn down after it."""
    controlplane._stop(kueue.pid)
    cluster = kueue.cluster
    if cluster.pids.get(COMPONENT) == kueue.pid:
        del cluster.pids[COMPONENT]
        cluster.save()
