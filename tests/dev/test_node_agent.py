"""The demo's local node agent: pure rules, and pods run through it on a real control plane.

The cluster tests give the agent a node of its own with a taint, so no other test's pod is
ever scheduled to it, and map one test image to this Python, so a pod's program is a
`python -c` script that reports what it saw (mounted files, environment, its token).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from kubetest import condition, wait_for

from finetune_dev.demo import pods as podlib
from finetune_dev.demo.pods import ImageMapping, MountTable, Refusal

PY_IMAGE = "example.test/python:3.11"


# ---- pure rules ---------------------------------------------------------------------------


def test_mount_paths_translate_as_whole_path_components():
    table = MountTable(
        {
            "/mnt/data": "/host/pvc/data",
            "/etc/finetune": "/host/cfg",
            "/dev/termination-log": "/host/term",
        }
    )
    text = (
        "outputDir: /mnt/data/out\nconfig: '/etc/finetune/worker.yaml'\n"
        "other: /mnt/database /x/mnt/data /etc/finetuner\nlog: /dev/termination-log\n"
    )
    assert table.translate(text) == (
        "outputDir: /host/pvc/data/out\nconfig: '/host/cfg/worker.yaml'\n"
        "other: /mnt/database /x/mnt/data /etc/finetuner\nlog: /host/term\n"
    )


def test_longest_mount_path_wins():
    table = MountTable({"/mnt": "/a", "/mnt/models": "/b"})
    assert table.translate("/mnt/models/x /mnt/y") == "/b/x /a/y"


def test_references_expand_like_kubernetes():
    env = {"A": "1", "B": "two"}
    assert podlib.expand_references("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def _pod(
    image="example.test/python:3.11",
    command=("python", "-c", "pass"),
    volumes=(),
    restart="Never",
    init=False,
) -> dict:
    spec = {
        "restartPolicy": restart,
        "volumes": list(volumes),
        "containers": [{"name": "main", "image": image, "command": list(command)}],
    }
    if init:
        spec["initContainers"] = [{"name": "init", "image": image, "command": ["true"]}]
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec}


MAPPINGS = [ImageMapping("example.test/python*", "python", sys.executable)]


def test_mapped_image_is_accepted():
    assert podlib.check_pod(_pod(), MAPPINGS) == {"main": MAPPINGS[0]}


@pytest.mark.parametrize(
    "pod, reason, words",
    [
        (
            _pod(image="vllm/vllm-openai:v0.11.0", command=("vllm", "serve")),
            podlib.UNSUPPORTED_IMAGE,
            ["vllm/vllm-openai:v0.11.0", "cannot be mapped"],
        ),
        (_pod(command=("bash", "-c", "true")), podlib.UNSUPPORTED_IMAGE, ["'bash'"]),
        (_pod(command=()), podlib.UNSUPPORTED_IMAGE, ["no command"]),
        (
            _pod(volumes=[{"name": "host", "hostPath": {"path": "/etc"}}]),
            podlib.UNSUPPORTED_VOLUME,
            ["'host'", "'hostPath'"],
        ),
        (
            _pod(volumes=[{"name": "p", "projected": {"sources": [{"clusterTrustBundle": {}}]}}]),
            podlib.UNSUPPORTED_VOLUME,
            ["clusterTrustBundle"],
        ),
        (_pod(restart="Always"), podlib.UNSUPPORTED_POD, ["restartPolicy 'Always'"]),
        (_pod(init=True), podlib.UNSUPPORTED_POD, ["init containers"]),
    ],
)
def test_pods_it_cannot_honour_are_refused_with_a_reason(pod, reason, words):
    with pytest.raises(Refusal) as err:
        podlib.check_pod(pod, MAPPINGS)
    assert err.value.reason == reason
    for w in words:
        assert w in err.value.message


def test_default_mapping_runs_the_worker_of_this_environment():
    (mapping,) = podlib.default_mappings()
    assert mapping.matches("ghcr.io/finetune-dev/finetune-worker:0.1.0", "finetune-worker")
    assert not mapping.matches("ghcr.io/finetune-dev/finetune-worker:0.1.0", "python")
    assert Path(mapping.executable).name == "finetune-worker"


def test_only_local_persistent_volumes_are_mounted():
    assert (
        podlib.pv_host_path({"metadata": {"name": "a"}, "spec": {"hostPath": {"path": "/data/a"}}})
        == "/data/a"
    )
    with pytest.raises(Refusal, match="'nfs'"):
        podlib.pv_host_path({"metadata": {"name": "b"}, "spec": {"nfs": {"path": "/x"}}})


# ---- on a real control plane ----------------------------------------------------------------


@pytest.fixture
def agent(cluster, tmp_path):
    from finetune_dev.demo.nodeagent import NodeAgent

    name = f"agent-{uuid.uuid4().hex[:6]}"
    a = NodeAgent(
        cluster.kubeconfig,
        tmp_path / "agent",
        node_name=name,
        mappings=MAPPINGS,
        taints=[{"key": "finetune.dev/test-node", "value": name, "effect": "NoSchedule"}],
        interval=0.3,
    )
    a.start()
    yield a
    a.stop()


def _test_pod(
    name: str,
    node: str | None,
    script: str,
    *,
    image: str = PY_IMAGE,
    restart: str = "Never",
    volumes=(),
    mounts=(),
    env=(),
    extra_spec=None,
) -> dict:
    spec = {
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": 5,
        "containers": [
            {
                "name": "main",
                "image": image,
                "command": ["python", "-c", script],
                "env": list(env),
                "volumeMounts": list(mounts),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }
        ],
        "volumes": list(volumes),
        **(extra_spec or {}),
    }
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _create(kube, pod: dict) -> None:
    # The namespace's default ServiceAccount appears a moment after the namespace.
    wait_for(
        lambda: kube.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
        what="the default ServiceAccount",
    )
    kube.create(pod)


def _terminal(kube, name: str, timeout: float = 60) -> dict:
    def finished():
        pod = kube.get("pod", name)
        return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None

    return wait_for(finished, timeout=timeout, what=f"pod {name} to finish")


REPORT_SCRIPT = r"""
import json, os, ssl, sys, urllib.request
sa = '/var/run/secrets/kubernetes.io/serviceaccount'
token = open(sa + '/token').read()
ctx = ssl.create_default_context(cafile=sa + '/ca.crt')
url = 'https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews' % (
    os.environ['KUBERNETES_SERVICE_HOST'], os.environ['KUBERNETES_SERVICE_PORT'])
body = json.dumps({'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'})
req = urllib.request.Request(url, data=body.encode(), method='POST', headers={
    'Authorization': 'Bearer ' + token, 'Content-Type': 'application/json'})
user = json.load(urllib.request.urlopen(req, context=ctx))['status']['userInfo']['username']
print(json.dumps({
    'message': open('/etc/cfg/message').read(),
    'configPath': open('/etc/cfg/where').read(),
    'secret': open('/etc/secret/key').read(),
    'namespace': open(sa + '/namespace').read(),
    'greeting': os.environ['GREETING'], 'podName': os.environ['POD_NAME'],
    'fromSecret': os.environ['FROM_SECRET'], 'user': user,
}))
sys.stdout.flush()
open('/dev/termination-log', 'w').write('finished with code 3')
sys.exit(3)
"""


@pytest.mark.cluster
def test_pod_runs_as_a_process_with_volumes_env_token_logs_and_status(kube, namespace, agent):
    kube.kubectl(
        "create",
        "configmap",
        "cfg",
        "--from-literal=message=hello",
        "--from-literal=where=/etc/cfg/where",
    )
    kube.kubectl("create", "secret", "generic", "sec", "--from-literal=key=s3cret")
    pod = _test_pod(
        "report",
        agent.node_name,
        REPORT_SCRIPT,
        volumes=[
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "sec", "secret": {"secretName": "sec"}},
        ],
        mounts=[
            {"name": "cfg", "mountPath": "/etc/cfg"},
            {"name": "sec", "mountPath": "/etc/secret", "readOnly": True},
        ],
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "GREETING", "value": "hi $(POD_NAME)"},
            {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "key"}}},
        ],
    )
    _create(kube, pod)
    done = _terminal(kube, "report")
    status = done["status"]
    assert status["phase"] == "Failed"
    (cs,) = status["containerStatuses"]
    term = cs["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert term["message"] == "finished with code 3"
    assert term["startedAt"] and term["finishedAt"]
    assert status["podIP"] == "127.0.0.1" and status["hostIP"] == "127.0.0.1"
    assert condition(done, "Ready")["status"] == "False"
    assert condition(done, "PodScheduled")["status"] == "True"

    # `kubectl logs` reaches the agent's log endpoint through the API server.
    logs = kube.kubectl("logs", "report").stdout
    seen = json.loads(logs.strip().splitlines()[-1])
    assert seen["message"] == "hello"
    assert seen["secret"] == "s3cret" and seen["fromSecret"] == "s3cret"
    assert seen["namespace"] == namespace
    assert seen["greeting"] == "hi report" and seen["podName"] == "report"
    # The token came from the TokenRequest API: the API server knows who the pod is.
    assert seen["user"] == f"system:serviceaccount:{namespace}:default"
    # ConfigMap files are the one place the agent rewrites: container paths -> host paths.
    assert seen["configPath"].endswith("/volumes/cfg/where")
    assert Path(seen["configPath"]).is_absolute()
    # The log is also a file, and the pod's files (secrets, token) do not outlive it.
    assert agent.log_path(namespace, "report", "main").read_text() == logs
    assert not any(p.name.startswith(f"{namespace}_report_") for p in agent.pods_dir.iterdir())


@pytest.mark.cluster
def test_scheduler_binds_a_gpu_pod_to_the_agent_node(kube, agent):
    pod = _test_pod(
        "gpu",
        None,
        "print('trained on the stand-in GPU')",
        extra_spec={
            "tolerations": [
                {
                    "key": "finetune.dev/test-node",
                    "operator": "Equal",
                    "value": agent.node_name,
                    "effect": "NoSchedule",
                }
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "nvidia.com/gpu.memory",
                                        "operator": "Gt",
                                        "values": ["4095"],
                                    },
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": [agent.node_name],
                                    },
                                ]
                            }
                        ]
                    }
                }
            },
        },
    )
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    _create(kube, pod)
    done = _terminal(kube, "gpu")
    assert done["spec"]["nodeName"] == agent.node_name
    assert done["status"]["phase"] == "Succeeded"
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    node = kube.get("node", agent.node_name, namespaced=False)
    assert node["status"]["capacity"]["cpu"] == str(os.cpu_count())
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "LOCAL-CPU"


@pytest.mark.cluster
def test_unmappable_batch_pod_fails_with_a_clear_reason(kube, agent):
    pod = _test_pod("vllm", agent.node_name, "")
    pod["spec"]["containers"][0].update(
        image="vllm/vllm-openai:v0.11.0", command=["vllm", "serve", "/models/x"]
    )
    _create(kube, pod)
    done = _terminal(kube, "vllm", timeout=30)
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["reason"] == podlib.UNSUPPORTED_IMAGE
    assert "vllm/vllm-openai:v0.11.0" in done["status"]["message"]
    waiting = done["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == podlib.UNSUPPORTED_IMAGE


@pytest.mark.cluster
def test_unmappable_serving_pod_stays_pending_with_the_reason(kube, agent):
    """restartPolicy Always: Failed would only make its ReplicaSet replace it forever."""
    pod = _test_pod("server", agent.node_name, "", restart="Always")
    pod["spec"]["containers"][0].update(image="vllm/vllm-openai:v0.11.0", command=["vllm", "serve"])
    _create(kube, pod)

    def refused():
        p = kube.get("pod", "server")
        statuses = p["status"].get("containerStatuses") or []
        return p if statuses and "waiting" in statuses[0]["state"] else None

    p = wait_for(refused, timeout=30, what="the serving pod to be refused")
    assert p["status"]["phase"] == "Pending"
    waiting = p["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == podlib.UNSUPPORTED_IMAGE
    assert "cannot be mapped" in waiting["message"]
    assert condition(p, "Ready")["reason"] == "ContainersNotReady"


@pytest.mark.cluster
def test_unsupported_volume_is_refused(kube, agent):
    pod = _test_pod(
        "hostpath",
        agent.node_name,
        "print(1)",
        volumes=[{"name": "root", "hostPath": {"path": "/"}}],
        mounts=[{"name": "root", "mountPath": "/host"}],
    )
    _create(kube, pod)
    done = _terminal(kube, "hostpath", timeout=30)
    assert done["status"]["reason"] == podlib.UNSUPPORTED_VOLUME
    assert "'hostPath'" in done["status"]["message"]


@pytest.mark.cluster
def test_deleting_a_running_pod_stops_its_process_and_removes_it(kube, agent):
    pod = _test_pod(
        "sleeper",
        agent.node_name,
        "import os, time; open('/scratch/pid', 'w').write(str(os.getpid())); time.sleep(600)",
        volumes=[{"name": "scratch", "emptyDir": {}}],
        mounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    _create(kube, pod)
    wait_for(
        lambda: kube.get("pod", "sleeper")["status"].get("phase") == "Running",
        timeout=30,
        what="the pod to run",
    )
    (running,) = [p for p in agent.running.values() if p.name == "sleeper"]
    pid = running.containers["main"].process.pid
    kube.kubectl("delete", "pod", "sleeper", "--wait=false")
    wait_for(
        lambda: kube.get_or_none("pod", "sleeper") is None,
        timeout=30,
        what="the pod object to be removed by the agent",
    )
    assert running.containers["main"].exit_code == 143  # SIGTERM, as a runtime reports it
    assert (
        not Path(f"/proc/{pid}").exists()
        or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    )


@pytest.mark.cluster
def test_kubectl_logs_follow_streams_until_the_container_exits(kube, agent):
    script = "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second', flush=True)"
    _create(kube, _test_pod("chatty", agent.node_name, script))
    wait_for(
        lambda: kube.get("pod", "chatty")["status"].get("phase") in ("Running", "Succeeded"),
        timeout=30,
        what="the pod to start",
    )
    # Returns only when the agent ends the stream, i.e. after the process exited.
    followed = kube.kubectl("logs", "-f", "chatty", timeout=30).stdout
    assert followed.split() == ["first", "second"]
    assert _terminal(kube, "chatty")["status"]["phase"] == "Succeeded"
    assert kube.kubectl("logs", "chatty", "--tail=1").stdout.strip() == "second"
