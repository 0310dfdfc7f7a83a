"""The local node agent: a kubelet stand-in that runs pods as processes on this machine.

It registers a Node (this machine's CPU and memory, labelled like a one-GPU node so the
worker's affinity matches: the "GPU" is a stand-in and the worker trains on the CPU),
keeps its Ready condition fresh, and runs the pods the scheduler binds to it the way a
kubelet would: the container's command and args with its environment, ConfigMap, Secret
and downward-API volumes materialised as files, the service-account token obtained
through the TokenRequest API, PersistentVolumeClaims mapped to their hostPath/local
volume's directory, stdout and stderr kept as a log file (served to `kubectl logs`
through the kubelet log endpoint), and phase, container state, exit code and
termination message written back to the pod's status.

Pods it cannot honour (an image it cannot map to a local program, an unsupported volume
type or restart policy) are refused with a reason and message in the pod's status, never
silently: batch pods (restartPolicy Never) fail, long-running pods stay Pending with the
container waiting, as a kubelet leaves a pod whose image cannot be pulled.

One loop does everything (list pods, start, reap, heartbeat) once a second; processes are
polled, not waited on in threads, so a stop is never blocked.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import pods as podlib
from .kubeapi import ApiError, KubeAPI
from .pods import ImageMapping, MountTable, Refusal

log = logging.getLogger("finetune_dev.demo.nodeagent")

DEFAULT_NODE_NAME = "local-cpu"
GPU_PRODUCT = "LOCAL-CPU"
HEARTBEAT_SECONDS = 10
TOKEN_SECONDS = 3600
TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
MAX_GRACE_SECONDS = 30
AGENT_VERSION = "v1.36.3-finetune-local-agent"


class NotYet(Exception):
    """Something the pod needs is not there yet (a ConfigMap, an unbound claim): retry."""


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def machine_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# Stand-in GPUs the node offers: two, so a two-process FineTuneJob (gpu.count 2, gloo on the
# CPU) can be watched training distributed on a laptop.
DEFAULT_GPUS = 2


def build_node(
    name: str,
    *,
    cpus: int,
    memory_bytes: int,
    gpu_memory_mib: int,
    labels: dict[str, str] | None = None,
    taints: list[dict] | None = None,
    gpus: int = DEFAULT_GPUS,
) -> dict:
    """The Node object: this machine's CPU and memory, GFD-style labels for stand-in GPUs."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                    platform.machine(), platform.machine()
                ),
                "finetune.dev/local-node-agent": "true",
                # A stand-in for GPU Feature Discovery's labels: there is no GPU, the worker
                # runs on the CPU, and "GPU memory" is this machine's memory.
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.memory": str(gpu_memory_mib),
                "nvidia.com/gpu.count": str(gpus),
                **(labels or {}),
            },
        },
        "spec": {"taints": taints} if taints else {},
    }


def node_status(cpus: int, memory_bytes: int, port: int, gpus: int = DEFAULT_GPUS) -> dict:
    resources = {
        "cpu": str(cpus),
        "memory": f"{memory_bytes // 1024}Ki",
        "pods": "110",
        "nvidia.com/gpu": str(gpus),
        "ephemeral-storage": "100Gi",
    }
    return {
        "capacity": resources,
        "allocatable": resources,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "nodeInfo": {
            "machineID": "local",
            "systemUUID": "local",
            "bootID": "local",
            "kernelVersion": platform.release(),
            "osImage": platform.platform(),
            "containerRuntimeVersion": "local-process://1",
            "kubeletVersion": AGENT_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(
                platform.machine(), platform.machine()
            ),
        },
    }


def ready_conditions(stamp: str) -> list[dict]:
    conditions = [
        {
            "type": t,
            "status": "False",
            "reason": f"KubeletHasNo{t}",
            "message": "",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the local node agent is posting ready status",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
    )
    return conditions


@dataclass
class RunningContainer:
    name: str
    image: str
    process: subprocess.Popen
    log_file: object
    log_path: Path
    termination_path: Path
    policy: str
    started_at: str
    exit_code: int | None = None
    finished_at: str | None = None
    reported: bool = False


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    directory: Path
    containers: dict[str, RunningContainer]
    tokens: list[tuple[Path, dict, float]] = field(default_factory=list)
    kill_deadline: float | None = None
    deleting: bool = False


class NodeAgent:
    def __init__(
        self,
        kubeconfig: str | Path,
        data_dir: str | Path,
        *,
        node_name: str = DEFAULT_NODE_NAME,
        mappings: list[ImageMapping] | None = None,
        taints: list[dict] | None = None,
        labels: dict[str, str] | None = None,
        interval: float = 1.0,
        delete_node_on_stop: bool = True,
        gpu_memory_mib: int | None = None,
    ):
        self.api = KubeAPI.from_kubeconfig(kubeconfig)
        self.data_dir = Path(data_dir).resolve()
        self.pods_dir = self.data_dir / "pods"
        self.logs_dir = self.data_dir / "logs"
        self.node_name = node_name
        self.mappings = podlib.default_mappings() if mappings is None else mappings
        self.taints = taints
        self.labels = labels
        self.interval = interval
        self.delete_node_on_stop = delete_node_on_stop
        self.cpus = os.cpu_count() or 1
        self.memory = machine_memory_bytes()
        self.gpu_memory_mib = gpu_memory_mib or self.memory // 2**20
        self.running: dict[str, RunningPod] = {}
        self.waiting: dict[str, str] = {}  # uid -> last "not yet" message written
        self.refused: set[str] = set()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: ThreadingHTTPServer | None = None
        self._last_heartbeat = 0.0
        parsed = urllib.parse.urlparse(self.api.server)
        self.service_host, self.service_port = parsed.hostname, str(parsed.port or 443)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Register the node, serve logs and run the loop in a background thread."""
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        port = self._start_log_server()
        self.register(port)
        self._thread = threading.Thread(target=self._loop, name="node-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop every process it started, then (optionally) remove the Node."""
        self.stopping.set()
        if self._thread:
            self._thread.join(timeout=30)
        for pod in list(self.running.values()):
            self._signal(pod, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            c.process.poll() is None for p in self.running.values() for c in p.containers.values()
        ):
            time.sleep(0.1)
        for pod in list(self.running.values()):
            self._signal(pod, signal.SIGKILL)
            for c in pod.containers.values():
                c.process.wait()
                c.log_file.close()
            shutil.rmtree(pod.directory, ignore_errors=True)
        self.running.clear()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self.delete_node_on_stop:
            try:
                self.api.delete(f"/api/v1/nodes/{self.node_name}")
            except ApiError as exc:
                log.warning("could not remove node %s: %s", self.node_name, exc)

    def register(self, port: int) -> None:
        node = build_node(
            self.node_name,
            cpus=self.cpus,
            memory_bytes=self.memory,
            gpu_memory_mib=self.gpu_memory_mib,
            labels=self.labels,
            taints=self.taints,
        )
        if self.api.create_if_absent("/api/v1/nodes", node) is None:
            self.api.merge_patch(
                f"/api/v1/nodes/{self.node_name}",
                {
                    "metadata": {"labels": node["metadata"]["labels"]},
                    "spec": node["spec"] or {"taints": None},
                },
            )
        self._port = port
        self.heartbeat()
        log.info(
            "node %s registered: %d CPUs, %.1f GiB memory, 1 stand-in GPU (%s)",
            self.node_name,
            self.cpus,
            self.memory / 2**30,
            GPU_PRODUCT,
        )

    def heartbeat(self) -> None:
        status = node_status(self.cpus, self.memory, self._port)
        status["conditions"] = ready_conditions(now())
        self.api.strategic_patch(f"/api/v1/nodes/{self.node_name}/status", {"status": status})
        self._last_heartbeat = time.monotonic()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sync_once()
            except ApiError as exc:
                log.warning("sync failed (retrying): %s", exc)
            except Exception:
                log.exception("sync failed (retrying)")
            self.stopping.wait(self.interval)

    def sync_once(self) -> None:
        if time.monotonic() - self._last_heartbeat >= HEARTBEAT_SECONDS:
            self.heartbeat()
        listing = self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node_name}")
        seen = set()
        for pod in listing["items"]:
            seen.add(pod["metadata"]["uid"])
            try:
                self.sync_pod(pod)
            except ApiError as exc:
                log.warning(
                    "pod %s/%s: %s", pod["metadata"]["namespace"], pod["metadata"]["name"], exc
                )
        for uid, running in list(self.running.items()):
            if uid not in seen:  # force-deleted from the API: stop it at once
                log.info(
                    "pod %s/%s is gone from the API; stopping it", running.namespace, running.name
                )
                self._signal(running, signal.SIGKILL)
                running.deleting = True
        self.reap()
        self._refresh_tokens()

    # ---- one pod -----------------------------------------------------------------------

    def sync_pod(self, pod: dict) -> None:
        md = pod["metadata"]
        uid = md["uid"]
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if md.get("deletionTimestamp"):
            running = self.running.get(uid)
            if running is None:
                self._finalise_delete(pod)
            elif not running.deleting:
                running.deleting = True
                grace = min(
                    int(pod["spec"].get("terminationGracePeriodSeconds", 30)), MAX_GRACE_SECONDS
                )
                running.kill_deadline = time.monotonic() + grace
                log.info(
                    "pod %s/%s deleted: SIGTERM, %ds to exit", md["namespace"], md["name"], grace
                )
                self._signal(running, signal.SIGTERM)
            return
        if uid in self.running or uid in self.refused or phase in ("Succeeded", "Failed"):
            return
        if phase == "Running":
            # Running in the API but not here: the agent restarted under it.
            self._write_status(
                pod,
                {
                    "phase": "Failed",
                    "reason": "ContainerLost",
                    "message": (
                        "the local node agent restarted while this pod ran; its process is gone"
                    ),
                },
            )
            return
        try:
            self.start_pod(pod)
        except Refusal as refusal:
            self.refused.add(uid)
            self._refuse(pod, refusal)
        except NotYet as reason:
            if self.waiting.get(uid) != str(reason):
                self.waiting[uid] = str(reason)
                self._write_waiting(pod, "ContainerCreating", str(reason))

    def start_pod(self, pod: dict) -> None:
        md, spec = pod["metadata"], pod["spec"]
        mapped = podlib.check_pod(pod, self.mappings)
        directory = self.pods_dir / f"{md['namespace']}_{md['name']}_{md['uid'][:8]}"
        shutil.rmtree(directory, ignore_errors=True)
        try:
            volumes, tokens = self._materialise_volumes(pod, directory / "volumes")
            running = RunningPod(
                uid=md["uid"],
                namespace=md["namespace"],
                name=md["name"],
                directory=directory,
                containers={},
                tokens=tokens,
            )
            for container in spec["containers"]:
                running.containers[container["name"]] = self._start_container(
                    pod, container, mapped[container["name"]], volumes, directory
                )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.running[md["uid"]] = running
        self.waiting.pop(md["uid"], None)
        stamp = now()
        self._write_status(
            pod,
            {
                "phase": "Running",
                "startTime": stamp,
                "podIP": "127.0.0.1",
                "hostIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "hostIPs": [{"ip": "127.0.0.1"}],
                "conditions": self._conditions(pod, ready=True),
                "containerStatuses": [
                    self._container_status(c) for c in running.containers.values()
                ],
            },
        )
        log.info(
            "pod %s/%s running: %s",
            md["namespace"],
            md["name"],
            ", ".join(
                f"{c.name} (pid {c.process.pid}, log {c.log_path})"
                for c in running.containers.values()
            ),
        )

    def _materialise_volumes(self, pod: dict, root: Path) -> tuple[dict[str, Path], list]:
        """Each volume as a host directory; returns name -> directory and the token files.

        `self._text_files[volume]` lists the ConfigMap text files, whose container paths
        each container's mount table rewrites.
        """
        ns = pod["metadata"]["namespace"]
        out: dict[str, Path] = {}
        tokens: list[tuple[Path, dict, float]] = []
        self._text_files: dict[str, list[Path]] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = root / name
            if "persistentVolumeClaim" in volume:
                out[name] = Path(self._claim_path(ns, volume["persistentVolumeClaim"]["claimName"]))
                continue
            target.mkdir(parents=True, exist_ok=True)
            out[name] = target
            if "configMap" in volume:
                self._text_files[name] = self._write_config_map(ns, volume["configMap"], target)
            elif "secret" in volume:
                self._write_secret(ns, volume["secret"], target)
            elif "downwardAPI" in volume:
                self._write_downward(pod, volume["downwardAPI"].get("items") or [], target)
            elif "projected" in volume:
                for source in volume["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        tokens.append(self._write_token(pod, source["serviceAccountToken"], target))
                    elif "configMap" in source:
                        self._text_files.setdefault(name, []).extend(
                            self._write_config_map(ns, source["configMap"], target)
                        )
                    elif "secret" in source:
                        self._write_secret(ns, source["secret"], target)
                    elif "downwardAPI" in source:
                        self._write_downward(pod, source["downwardAPI"].get("items") or [], target)
            # emptyDir: the directory itself (medium Memory included: it is only scratch).
        return out, tokens

    def _claim_path(self, namespace: str, claim: str) -> str:
        pvc = self.api.get_or_none(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        if pvc is None:
            raise NotYet(f"PersistentVolumeClaim {claim!r} does not exist yet")
        pv_name = (pvc.get("spec") or {}).get("volumeName")
        if not pv_name or (pvc.get("status") or {}).get("phase") != "Bound":
            raise NotYet(f"PersistentVolumeClaim {claim!r} is not bound to a volume yet")
        pv = self.api.get(f"/api/v1/persistentvolumes/{pv_name}")
        path = Path(podlib.pv_host_path(pv))
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _items(self, data: dict[str, bytes], items: list[dict] | None) -> dict[str, bytes]:
        if not items:
            return data
        return {i["path"]: data[i["key"]] for i in items if i["key"] in data}

    def _write_files(self, files: dict[str, bytes], target: Path, mode: int | None) -> None:
        for rel, content in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            if mode is not None:
                # Files stay readable by the agent's own user, whatever the mode says.
                os.chmod(path, (mode | 0o400) & 0o777)

    def _write_config_map(self, ns: str, source: dict, target: Path) -> list[Path]:
        """Write a ConfigMap's text keys; returns them, for path translation."""
        cm = self.api.get_or_none(f"/api/v1/namespaces/{ns}/configmaps/{source['name']}")
        if cm is None:
            if source.get("optional"):
                return []
            raise NotYet(f"ConfigMap {source['name']!r} does not exist yet")
        text = self._items(
            {k: v.encode() for k, v in (cm.get("data") or {}).items()}, source.get("items")
        )
        binary = self._items(
            {k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()},
            source.get("items"),
        )
        self._write_files({**text, **binary}, target, source.get("defaultMode"))
        return [target / rel for rel in text]

    def _write_secret(self, ns: str, source: dict, target: Path) -> None:
        name = source.get("secretName") or source.get("name")
        secret = self.api.get_or_none(f"/api/v1/namespaces/{ns}/secrets/{name}")
        if secret is None:
            if source.get("optional"):
                return
            raise NotYet(f"Secret {name!r} does not exist yet")
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        self._write_files(
            self._items(data, source.get("items")), target, source.get("defaultMode", 0o440)
        )

    def _write_downward(self, pod: dict, items: list[dict], target: Path) -> None:
        files = {}
        for item in items:
            if "fieldRef" not in item:
                raise Refusal(
                    podlib.UNSUPPORTED_VOLUME,
                    (
                        f"downward API item {item.get('path')!r} uses resourceFieldRef; the local "
                        f"node agent supports fieldRef only"
                    ),
                )
            files[item["path"]] = podlib.field_ref(pod, item["fieldRef"]["fieldPath"]).encode()
        self._write_files(files, target, None)

    def _write_token(self, pod: dict, source: dict, target: Path) -> tuple[Path, dict, float]:
        """A bound service-account token through the TokenRequest API, as a kubelet does."""
        md, spec = pod["metadata"], pod["spec"]
        sa = spec.get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": int(source.get("expirationSeconds", TOKEN_SECONDS)),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": md["name"],
                    "uid": md["uid"],
                },
            },
        }
        if source.get("audience"):
            request["spec"]["audiences"] = [source["audience"]]
        path = target / source.get("path", "token")
        self._request_token(md["namespace"], sa, request, path)
        expiry = time.monotonic() + 0.8 * request["spec"]["expirationSeconds"]
        return path, {"namespace": md["namespace"], "sa": sa, "request": request}, expiry

    def _request_token(self, ns: str, sa: str, request: dict, path: Path) -> None:
        answer = self.api.create(f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", request)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(answer["status"]["token"])
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def _refresh_tokens(self) -> None:
        for pod in self.running.values():
            for i, (path, req, expiry) in enumerate(pod.tokens):
                if time.monotonic() >= expiry:
                    self._request_token(req["namespace"], req["sa"], req["request"], path)
                    seconds = req["request"]["spec"]["expirationSeconds"]
                    pod.tokens[i] = (path, req, time.monotonic() + 0.8 * seconds)

    # ---- containers ----------------------------------------------------------------------

    def _mount_table(
        self, container: dict, volumes: dict[str, Path], termination_path: Path
    ) -> MountTable:
        entries = {}
        for mount in container.get("volumeMounts") or []:
            host = volumes[mount["name"]]
            if mount.get("subPath"):
                host = host / mount["subPath"]
            entries[mount["mountPath"]] = str(host)
        entries[
            container.get("terminationMessagePath") or podlib.DEFAULT_TERMINATION_MESSAGE_PATH
        ] = str(termination_path)
        return MountTable(entries)

    def _environment(self, pod: dict, container: dict, table: MountTable) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                cm = self.api.get_or_none(
                    f"/api/v1/namespaces/{ns}/configmaps/{source['configMapRef']['name']}"
                )
                if cm is None and not source["configMapRef"].get("optional"):
                    raise NotYet(f"ConfigMap {source['configMapRef']['name']!r} does not exist yet")
                env.update({prefix + k: v for k, v in ((cm or {}).get("data") or {}).items()})
            elif "secretRef" in source:
                s = self.api.get_or_none(
                    f"/api/v1/namespaces/{ns}/secrets/{source['secretRef']['name']}"
                )
                if s is None and not source["secretRef"].get("optional"):
                    raise NotYet(f"Secret {source['secretRef']['name']!r} does not exist yet")
                env.update(
                    {
                        prefix + k: base64.b64decode(v).decode()
                        for k, v in ((s or {}).get("data") or {}).items()
                    }
                )
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = podlib.expand_references(var["value"], env)
            elif "valueFrom" in var:
                env[var["name"]] = self._env_from(pod, var)
            else:
                env[var["name"]] = ""
        # The translation happens last, so $(VAR) references see the pod's own paths.
        return {k: table.translate(v) for k, v in env.items()}

    def _env_from(self, pod: dict, var: dict) -> str:
        ns = pod["metadata"]["namespace"]
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            return podlib.field_ref(pod, ref["fieldRef"]["fieldPath"])
        for kind, path in (("configMapKeyRef", "configmaps"), ("secretKeyRef", "secrets")):
            if kind in ref:
                sel = ref[kind]
                obj = self.api.get_or_none(f"/api/v1/namespaces/{ns}/{path}/{sel['name']}")
                value = ((obj or {}).get("data") or {}).get(sel["key"])
                if value is None:
                    if sel.get("optional"):
                        return ""
                    raise NotYet(
                        f"env {var['name']}: {kind[:-6]} {sel['name']!r} key "
                        f"{sel['key']!r} does not exist yet"
                    )
                return base64.b64decode(value).decode() if path == "secrets" else value
        raise Refusal(
            podlib.UNSUPPORTED_POD,
            (
                f"env {var['name']!r} uses {next(iter(ref))}; the local node agent supports "
                f"value, fieldRef, configMapKeyRef and secretKeyRef"
            ),
        )

    def _start_container(
        self,
        pod: dict,
        container: dict,
        mapping: ImageMapping,
        volumes: dict[str, Path],
        pod_dir: Path,
    ) -> RunningContainer:
        md = pod["metadata"]
        name = container["name"]
        cdir = pod_dir / "containers" / name
        cdir.mkdir(parents=True, exist_ok=True)
        termination = cdir / "termination-log"
        termination.touch()
        table = self._mount_table(container, volumes, termination)
        # ConfigMap files hold paths as the container sees them (the worker config names
        # /mnt/<claim> and /etc/finetune): rewrite them to host paths for this container.
        for mount in container.get("volumeMounts") or []:
            for f in self._text_files.get(mount["name"], []):
                f.write_text(table.translate(f.read_text()))
        env = self._environment(pod, container, table)
        base = {
            "PATH": f"{Path(mapping.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(cdir),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": md["name"],
            "KUBERNETES_SERVICE_HOST": self.service_host,
            "KUBERNETES_SERVICE_PORT": self.service_port,
            "KUBERNETES_SERVICE_PORT_HTTPS": self.service_port,
        }
        sa_mount = table.entries.get(podlib.SERVICE_ACCOUNT_MOUNT)
        if sa_mount:
            # The one variable a kubelet would not set: the worker's override of the
            # service-account directory, since /var/run/secrets is not ours to write.
            base["FINETUNE_WORKER_SA_DIR"] = sa_mount
        env = {**base, **env}
        argv = [podlib.expand_references(a, env) for a in podlib.container_argv(container)]
        argv = [mapping.executable] + [table.translate(a) for a in argv[1:]]
        workdir = (
            table.translate(container["workingDir"]) if container.get("workingDir") else str(cdir)
        )
        log_path = self.logs_dir / md["namespace"] / md["name"] / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Open for the process's lifetime; reap() closes it when the process exits.
        log_file = open(log_path, "ab")  # noqa: SIM115
        try:
            process = subprocess.Popen(
                argv,
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log_file.close()
            raise Refusal(
                podlib.UNSUPPORTED_IMAGE,
                (f"container {name!r}: cannot start {mapping.executable}: {exc}"),
            ) from None
        return RunningContainer(
            name=name,
            image=container.get("image", ""),
            process=process,
            log_file=log_file,
            log_path=log_path,
            termination_path=termination,
            policy=container.get("terminationMessagePolicy", "File"),
            started_at=now(),
        )

    # ---- exits ------------------------------------------------------------------------------

    def reap(self) -> None:
        for uid, pod in list(self.running.items()):
            changed = False
            for c in pod.containers.values():
                if c.exit_code is None and c.process.poll() is not None:
                    code = c.process.returncode
                    c.exit_code = 128 - code if code < 0 else code  # -15 -> 143, as runtimes say
                    c.finished_at = now()
                    c.log_file.close()
                    changed = True
            if pod.kill_deadline and time.monotonic() > pod.kill_deadline:
                self._signal(pod, signal.SIGKILL)
                pod.kill_deadline = None
            if not changed and not (pod.deleting and self._all_exited(pod)):
                continue
            done = self._all_exited(pod)
            api_pod = self.api.get_or_none(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")
            if api_pod is not None and api_pod["metadata"]["uid"] == uid:
                statuses = [self._container_status(c) for c in pod.containers.values()]
                patch = {"containerStatuses": statuses}
                if done:
                    ok = all(c.exit_code == 0 for c in pod.containers.values())
                    patch["phase"] = "Succeeded" if ok else "Failed"
                    patch["conditions"] = self._conditions(api_pod, ready=False)
                    log.info(
                        "pod %s/%s %s (exit codes %s)",
                        pod.namespace,
                        pod.name,
                        patch["phase"],
                        {c.name: c.exit_code for c in pod.containers.values()},
                    )
                self._write_status(api_pod, patch)
            if done:
                shutil.rmtree(pod.directory, ignore_errors=True)  # secrets do not linger
                del self.running[uid]
                if pod.deleting and api_pod is not None and api_pod["metadata"]["uid"] == uid:
                    self._finalise_delete(api_pod)

    @staticmethod
    def _all_exited(pod: RunningPod) -> bool:
        return all(c.exit_code is not None for c in pod.containers.values())

    def _signal(self, pod: RunningPod, sig: int) -> None:
        for c in pod.containers.values():
            if c.process.poll() is None:
                try:
                    os.killpg(c.process.pid, sig)
                except ProcessLookupError:
                    pass

    def _termination_message(self, c: RunningContainer) -> str:
        try:
            message = c.termination_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(
                errors="replace"
            )
        except OSError:
            message = ""
        if not message and c.policy == "FallbackToLogsOnError" and c.exit_code:
            try:
                lines = c.log_path.read_bytes().decode(errors="replace").splitlines()
            except OSError:
                lines = []
            message = "\n".join(lines[-FALLBACK_LOG_LINES:])[-2048:]
        return message

    def _container_status(self, c: RunningContainer) -> dict:
        status = {
            "name": c.name,
            "image": c.image,
            "imageID": "",
            "containerID": f"local-process://{c.process.pid}",
            "restartCount": 0,
        }
        if c.exit_code is None:
            status.update(ready=True, started=True, state={"running": {"startedAt": c.started_at}})
        else:
            terminated = {
                "exitCode": c.exit_code,
                "reason": "Completed" if c.exit_code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": c.finished_at,
                "containerID": status["containerID"],
            }
            message = self._termination_message(c)
            if message:
                terminated["message"] = message
            status.update(ready=False, started=False, state={"terminated": terminated})
        return status

    # ---- status writes -----------------------------------------------------------------------

    def _conditions(
        self, pod: dict, *, ready: bool, reason: str | None = None, message: str | None = None
    ) -> list[dict]:
        stamp = now()
        ready_status = "True" if ready else "False"
        out = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
        ]
        for t in ("ContainersReady", "Ready"):
            cond = {"type": t, "status": ready_status, "lastTransitionTime": stamp}
            if reason:
                cond.update(reason=reason, message=message or "")
            out.append(cond)
        return out

    def _write_status(self, pod: dict, status: dict) -> None:
        md = pod["metadata"]
        self.api.strategic_patch(
            f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}/status",
            {"metadata": {"uid": md["uid"]}, "status": status},
        )

    def _write_waiting(self, pod: dict, reason: str, message: str) -> None:
        self._write_status(
            pod,
            {
                "phase": "Pending",
                "conditions": self._conditions(
                    pod, ready=False, reason="ContainersNotReady", message=message
                ),
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c.get("image", ""),
                        "imageID": "",
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "state": {"waiting": {"reason": reason, "message": message}},
                    }
                    for c in pod["spec"]["containers"]
                ],
            },
        )

    def _refuse(self, pod: dict, refusal: Refusal) -> None:
        md = pod["metadata"]
        log.warning(
            "refusing pod %s/%s: %s: %s",
            md["namespace"],
            md["name"],
            refusal.reason,
            refusal.message,
        )
        if pod["spec"].get("restartPolicy", "Always") == "Never":
            # A batch pod fails at once, so its Job (and the operator) see why.
            self._write_status(
                pod,
                {
                    "phase": "Failed",
                    "reason": refusal.reason,
                    "message": refusal.message,
                    "conditions": self._conditions(
                        pod, ready=False, reason=refusal.reason, message=refusal.message
                    ),
                    "containerStatuses": [
                        {
                            "name": c["name"],
                            "image": c.get("image", ""),
                            "imageID": "",
                            "ready": False,
                            "started": False,
                            "restartCount": 0,
                            "state": {
                                "waiting": {"reason": refusal.reason, "message": refusal.message}
                            },
                        }
                        for c in pod["spec"]["containers"]
                    ],
                },
            )
        else:
            # A long-running pod stays Pending, like an image that cannot be pulled: a
            # failed one would only be replaced by its ReplicaSet, again and again.
            self._write_waiting(pod, refusal.reason, refusal.message)
            self._write_status(pod, {"reason": refusal.reason, "message": refusal.message})

    def _finalise_delete(self, pod: dict) -> None:
        """What a kubelet does last: remove the pod object once nothing runs."""
        md = pod["metadata"]
        self.api.delete(
            f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}",
            {
                "kind": "DeleteOptions",
                "apiVersion": "v1",
                "gracePeriodSeconds": 0,
                "preconditions": {"uid": md["uid"]},
            },
        )
        self.refused.discard(md["uid"])
        self.waiting.pop(md["uid"], None)

    # ---- kubectl logs ----------------------------------------------------------------------

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return self.logs_dir / namespace / pod / f"{container}.log"

    def is_running(self, namespace: str, pod: str) -> bool:
        return any(
            p.namespace == namespace and p.name == pod and not self._all_exited(p)
            for p in list(self.running.values())
        )

    def _start_log_server(self) -> int:
        """The kubelet's /containerLogs endpoint, so `kubectl logs [-f]` works.

        The API server reaches it over HTTPS at the Node's InternalIP and kubelet port;
        it listens on loopback only. A self-signed certificate is enough: this control
        plane's API server does not verify kubelet certificates.
        """
        tls = self.data_dir / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        cert, key = tls / "agent.crt", tls / "agent.key"
        if not cert.exists():
            subprocess.run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    str(key),
                    "-out",
                    str(cert),
                    "-days",
                    "30",
                    "-subj",
                    f"/CN={self.node_name}",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ],
                check=True,
                capture_output=True,
            )
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: the agent's log is for pods
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404, "only /containerLogs/<ns>/<pod>/<container> is served")
                    return
                _, ns, pod, container = parts
                query = urllib.parse.parse_qs(url.query)
                path = agent.log_path(ns, pod, container)
                if not path.exists():
                    self.send_error(404, f"no log for {ns}/{pod}/{container} on this node")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                if "tailLines" in query:
                    n = int(query["tailLines"][0])
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-n:]) if n > 0 else b""
                if "limitBytes" in query:
                    data = data[: int(query["limitBytes"][0])]
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                    if query.get("follow", ["false"])[0] == "true":
                        self._follow(path, ns, pod)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _follow(self, path: Path, ns: str, pod: str) -> None:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    while not agent.stopping.is_set():
                        chunk = f.read(65536)
                        if chunk:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        elif not agent.is_running(ns, pod):
                            return
                        else:
                            time.sleep(0.2)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, name="node-agent-logs", daemon=True).start()
        return server.server_address[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="finetune-dev demo node-agent",
        description="Register this machine as a Node and run the pods bound to it as local "
        "processes (a kubelet stand-in for the demo).",
    )
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        required=not os.environ.get("KUBECONFIG"),
    )
    p.add_argument(
        "--data-dir", required=True, help="where pod directories and container logs live"
    )
    p.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    p.add_argument(
        "--map",
        nargs=3,
        action="append",
        metavar=("IMAGE_GLOB", "COMMAND", "EXECUTABLE"),
        help="run containers of IMAGE_GLOB whose command is COMMAND as EXECUTABLE "
        "(repeatable; replaces the default finetune-worker mapping)",
    )
    p.add_argument("--taint", action="append", default=[], metavar="KEY=VALUE:EFFECT")
    p.add_argument("--keep-node", action="store_true", help="leave the Node object on exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s node-agent %(levelname)s %(message)s",
    )
    mappings = [ImageMapping(*m) for m in args.map] if args.map else None
    taints = []
    for t in args.taint:
        kv, _, effect = t.partition(":")
        key, _, value = kv.partition("=")
        taints.append({"key": key, "value": value, "effect": effect or "NoSchedule"})
    agent = NodeAgent(
        args.kubeconfig,
        args.data_dir,
        node_name=args.node_name,
        mappings=mappings,
        taints=taints or None,
        delete_node_on_stop=not args.keep_node,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.start()
    print(json.dumps({"node": agent.node_name, "logs": str(agent.logs_dir)}), flush=True)
    stop.wait()
    log.info("stopping: ending every pod process this agent started")
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
