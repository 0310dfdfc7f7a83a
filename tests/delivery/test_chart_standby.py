"""The chart's standby mode, for real: two operators peered through kopf, with only the
RBAC the chart renders for `standby.enabled=true`.

The chart runs the active operator with `--priority=100` and the standby with
`--priority=50`, both peering in the ClusterKopfPeering the chart creates. Here both run
as processes authenticated as the chart's ServiceAccount, exactly with the chart's args
and peering environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from charttest import (
    IDENTITY_NAMESPACE,
    assert_no_forbidden,
    by_kind,
    install_identity,
    render,
    write_token_kubeconfig,
)
from kubetest import Kube, bound_pvc, wait_for

pytestmark = pytest.mark.cluster

RELEASE = "ftop-standby"
PEERING = "finetune-operator"
# kopf's default peer lifetime: a peer that stopped touching the peering object is
# considered gone this long after its last keep-alive.
PEER_LIFETIME_S = 60


def deployment_args(objects: list[dict], role: str) -> list[str]:
    (dep,) = [
        d
        for d in by_kind(objects, "Deployment")
        if d["metadata"]["labels"]["finetune.dev/operator-role"] == role
    ]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return container["args"], env


class Peer:
    def __init__(
        self, name: str, args: list[str], env: dict[str, str], kubeconfig: str, workdir: Path
    ):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        # The chart's args, minus the liveness endpoint (two peers share this host).
        argv = [a for a in args if not a.startswith("--liveness")]
        run_env = {
            **os.environ,
            **env,
            "KUBECONFIG": kubeconfig,
            "POD_ID": name,
            "FINETUNE_RESYNC_SECONDS": "5",
            "FINETUNE_METRICS_PORT": "0",
            "FINETUNE_ALLOW_HUB": "false",
            "PYTHONUNBUFFERED": "1",
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kopf", *argv, "--verbose"],
                env=run_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def peers(cluster, crds, tmp_path):
    objects = render(RELEASE, IDENTITY_NAMESPACE, set_values=["standby.enabled=true"])
    admin = Kube(cluster)
    kopf_crds = [
        c for c in by_kind(objects, "CustomResourceDefinition") if c["spec"]["group"] == "kopf.dev"
    ]
    admin.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(kopf_crds), namespaced=False)
    for crd in kopf_crds:
        wait_for(
            lambda c=crd["metadata"]["name"]: (
                admin.kubectl(
                    "get",
                    "crd",
                    c,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                    namespaced=False,
                ).stdout
                == "True"
            ),
            what="kopf's peering CRDs",
        )
    (peering,) = by_kind(objects, "ClusterKopfPeering")
    admin.kubectl("delete", "clusterkopfpeering", PEERING, "--ignore-not-found", namespaced=False)
    admin.apply(peering)
    sa, _ = install_identity(cluster, release=RELEASE, set_values=["standby.enabled=true"])
    token = Kube(cluster, IDENTITY_NAMESPACE).kubectl("create", "token", sa).stdout.strip()
    kubeconfig = write_token_kubeconfig(
        cluster, tmp_path / "kc", token, f"system:serviceaccount:{IDENTITY_NAMESPACE}:{sa}"
    )
    started = {}
    # The active one first, as after an install: the standby then finds it and pauses.
    for role in ("active", "standby"):
        args, env = deployment_args(objects, role)
        started[role] = Peer(role, args, env, kubeconfig, tmp_path)
        if role == "active":
            wait_for(
                lambda: "watch-stream for clusterkopfpeerings" in started["active"].log(),
                timeout=60,
                what="the active operator to join the peering",
            )
    # Peering is mandatory in a pair: the standby starts paused and stays paused while the
    # active one's keep-alive in the peering object is fresh.
    wait_for(
        lambda: (
            "standby"
            in (admin.get("clusterkopfpeering", PEERING, namespaced=False).get("status") or {})
        ),
        timeout=60,
        what="the standby to join the peering",
    )
    yield started
    for peer in started.values():
        peer.kill()
    for peer in started.values():
        assert_no_forbidden(peer.log())


def ftj(name: str) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Meta-Llama-3-8B"},
            "dataset": {"uri": "pvc://data/alpaca.jsonl", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "resources": {"gpu": {"count": 1, "memory": "24Gi"}},
            "output": {"uri": f"pvc://adapters/{name}"},
            "suspend": True,
        },
    }


def test_paused_standby_does_no_work(peers, kube):
    active, standby = peers["active"], peers["standby"]
    for claim in ("data", "adapters"):  # a job whose claims do not exist yet waits for them
        bound_pvc(kube, claim)
    paused_at = len(standby.log())
    kube.apply(ftj("only-the-active-one"))
    wait_for(lambda: kube.get_or_none("job", "only-the-active-one-train"), what="the training Job")
    # Two of the active operator's resyncs later, the standby has still done nothing.
    start = active.log().count("resync complete")
    wait_for(
        lambda: active.log().count("resync complete") >= start + 2,
        timeout=60,
        what="two resyncs of the active operator",
    )
    assert "resync complete" not in standby.log()[paused_at:]
    assert "only-the-active-one" not in standby.log()[paused_at:]


def test_standby_takes_over_when_the_active_operator_dies(peers, kube):
    standby = peers["standby"]
    for claim in ("data", "adapters"):
        bound_pvc(kube, claim)
    peers["active"].kill()  # as when its node dies: no goodbye in the peering object
    kube.apply(ftj("after-failover"))
    wait_for(
        lambda: "Resuming operations" in standby.log(),
        timeout=PEER_LIFETIME_S + 30,
        what="the standby to resume once the active operator's keep-alive expired",
    )
    job = wait_for(
        lambda: kube.get_or_none("job", "after-failover-train"),
        timeout=30,
        what="the standby to create the training Job",
    )
    assert job["spec"]["suspend"] is True
    status = wait_for(
        lambda: kube.get("finetunejob", "after-failover").get("status"),
        what="the standby to write status",
    )
    assert status["plan"]["method"] in ("lora", "qlora", "fp8")  # planned by the standby
