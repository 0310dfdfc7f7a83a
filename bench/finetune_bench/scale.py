"""The operator at scale: many FineTuneJobs at once on many fake GPU nodes, kill -9 included.

    python bench/scale.py --jobs 1000 --nodes 100 --kills 3      (or: make bench-scale)

Starts the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)
with `--nodes` kwok GPU nodes, runs the operator as its own process with the chart's
settings (`kopf run -m finetune_operator.main --all-namespaces --standalone`, a 60 s resync),
creates `--jobs` FineTuneJobs as fast as kubectl can (several `kubectl create` at once),
kill -9s the operator `--kills` times while it creates their Jobs (restarting it at once,
as a Deployment would), waits until every FineTuneJob has its Job and a status that says
what the Job did (kwok runs each pod for half a second, so each job ends `Succeeded`), then
watches one resync interval of steady state. It prints:

* creation -> Job: from the moment this process's watch saw the FineTuneJob to the moment
  it saw its Job (millisecond clocks; the API server's timestamps have whole seconds), p50,
  p90, p99, max;
* status lag: from the Job seen complete to its FineTuneJob seen `Succeeded` (0 when the
  operator read the finished pod before the Job controller wrote the Job);
* the operator's RSS (peak over every incarnation, and at the end of the steady window) and
  CPU seconds;
* API requests per job, from the operator's own metric
  (`finetune_operator_api_requests_total`: every request of k8s.py, not kopf's own watch
  streams; scraped every second and just before each kill, so what an incarnation sent in
  its last moments before a kill can be missed), for the whole run and for the steady
  window, writes (POST, PUT, PATCH, DELETE) apart; 409 answers;
* duplicates (more than one Job, or more than one of any child, per FineTuneJob; managed
  Jobs without an owner), orphans (managed children whose owner is gone), FineTuneJobs
  without a Job, and lost Events (FineTuneJobs without the Event of the transition their
  status is in, waited for up to 30 s after the end).

`--floor` measures what the operator cannot go below on the same machine: the same control
plane, nodes and kubectl creates, but instead of the operator a minimal creator
(bench/finetune_bench/floor.py) that only creates each FineTuneJob's children, the very
objects the operator's first pass creates, with its client and concurrency, and never reads
or writes a status. Its creation -> Job percentiles, measured the same way, are the lower
bound of the operator's for a burst of that size; it also prints the creates per second
(kubectl's and its own) until the last Job. No kills, no steady window.

`run()` is the same benchmark on a cluster someone else started, in one namespace: the CI
version (tests/controller/test_operator_scale.py) calls it on the test control plane.
Development only; results in docs/operations.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune_dev.devcluster import binaries, controlplane
from finetune_dev.devcluster.controlplane import Cluster

NODE_PREFIX = "scale-gpu-"
# The benchmark's nodes are tainted and labelled so that only its pods land there (and its
# pods only there): on a shared test control plane nothing else is disturbed.
NODE_LABEL = ("finetune.dev/scale-node", "true")
MANAGED = "app.kubernetes.io/managed-by=finetune-operator"
CHILD_KINDS = ("configmaps", "serviceaccounts", "roles", "rolebindings")
EVENT_GRACE_S = 30.0
WRITES = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class Config:
    jobs: int = 200
    nodes: int = 20
    kills: int = 2
    namespace: str = "scale"
    resync_seconds: float = 60.0
    """The chart's default (operator.resyncSeconds)."""
    steady_seconds: float | None = None
    """How long to watch steady state after convergence; default one resync interval."""
    timeout: float = 900.0
    """Convergence deadline, counted from the first create."""
    apply_processes: int = 4
    all_namespaces: bool = True
    """As the chart runs it; the CI version watches its one namespace instead."""
    floor: bool = False
    """The floor creator (floor.py) instead of the operator: no kills, no steady window."""
    python: str = sys.executable
    """The interpreter that runs the operator: `make bench-scale` gives one whose environment
    holds what the operator image installs and nothing else (no worker libraries, which
    kopf would import and the resident size would count)."""
    workdir: str = ""


@dataclass
class Result:
    config: dict
    machine: str
    converged: bool
    converge_s: float
    apply_s: float
    jobs_created_s: float
    """From the first create to the last Job seen."""
    creates: int
    """FineTuneJobs plus the POSTs of the operator (Events included) or of the floor creator
    (all of them before its last Job)."""
    latency_s: dict[str, float]
    latency_n: int
    """FineTuneJobs whose Job was seen (the latency's sample)."""
    status_lag_s: dict[str, float]
    status_lag_n: int
    rss_peak_mib: float
    rss_after_mib: float
    cpu_s: float
    requests_per_job: float
    writes_per_job: float
    conflicts_409_per_job: float
    steady_requests_per_job: float
    steady_writes_per_job: float
    requests_by_kind: dict[str, int]
    kills_done: int
    duplicates: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    without_job: list[str] = field(default_factory=list)
    lost_events: list[str] = field(default_factory=list)
    """FineTuneJobs without the Event of their current transition (missing_events)."""

    def report(self) -> str:
        def pct(d: dict[str, float]) -> str:
            if not d:
                return "n/a"
            return "  ".join(f"{k} {v:.2f}" for k, v in d.items())

        c = self.config
        who = "floor creator" if c["floor"] else "operator"
        lines = [
            (
                f"scale floor: {c['jobs']} FineTuneJobs, {c['nodes']} kwok GPU nodes, their "
                f"children created without the operator; {self.machine}"
                if c["floor"]
                else f"scale: {c['jobs']} FineTuneJobs, {c['nodes']} kwok GPU nodes, "
                f"{self.kills_done}/{c['kills']} kill -9 of the operator; {self.machine}"
            ),
            f"  created in {self.apply_s:.1f}s; converged: {self.converged} "
            f"({self.converge_s:.1f}s after the first create)",
            f"  every Job created {self.jobs_created_s:.1f}s after the first create"
            + (
                # The operator's POSTs go on after the last Job (Events): no rate to give.
                f": {self.creates} creates, "
                f"{self.creates / max(self.jobs_created_s, 1e-9):.0f} per s"
                if c["floor"]
                else ""
            ),
            f"  creation -> Job (s):  {pct(self.latency_s)}",
        ]
        if not c["floor"]:
            lines.append(f"  status lag (s):       {pct(self.status_lag_s)}")
        lines += [
            f"  {who} RSS: peak {self.rss_peak_mib:.0f} MiB, "
            f"{'at the end' if c['floor'] else 'after the steady window'} "
            f"{self.rss_after_mib:.0f} MiB; CPU {self.cpu_s:.1f}s "
            f"({self.cpu_s / max(c['jobs'], 1) * 1000:.0f} ms per job)",
            f"  API requests per job: {self.requests_per_job:.1f} "
            f"(writes {self.writes_per_job:.1f}, 409 answers {self.conflicts_409_per_job:.2f})",
        ]
        if not c["floor"]:
            lines.append(
                f"  steady state, one resync interval: {self.steady_requests_per_job:.1f} "
                f"requests per job (writes {self.steady_writes_per_job:.2f})"
            )
        lines += [
            "  requests by method and resource: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.requests_by_kind.items())),
            f"  duplicates: {len(self.duplicates)}  orphans: {len(self.orphans)}  "
            f"without a Job: {len(self.without_job)}  lost Events: {len(self.lost_events)}",
        ]
        for title, items in (
            ("duplicate", self.duplicates),
            ("orphan", self.orphans),
            ("without a Job", self.without_job),
            ("lost Event", self.lost_events),
        ):
            lines += [f"    {title}: {x}" for x in items[:10]]
        return "\n".join(lines)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def at(q: float) -> float:  # nearest rank
        return v[min(len(v), max(1, math.ceil(q * len(v)))) - 1]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": v[-1]}


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} CPUs ({model}){mem}, Python {platform.python_version()}"


# --- the cluster side -------------------------------------------------------------------


def kubectl(cluster: Cluster, *args: str, input: str | None = None, check: bool = True):
    return controlplane.kubectl(cluster, *args, input=input, check=check)


def add_nodes(cluster: Cluster, count: int) -> list[str]:
    """`count` kwok GPU nodes (8 GPUs each), tainted for the benchmark's pods; Ready."""
    key, value = NODE_LABEL
    names = [f"{NODE_PREFIX}{i}" for i in range(count)]
    nodes = []
    for name in names:
        node = controlplane.fake_gpu_node(name)
        node["metadata"]["labels"][key] = value
        node["spec"]["taints"] = [{"key": key, "value": value, "effect": "NoSchedule"}]
        nodes.append(node)
    kubectl(
        cluster,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = kubectl(cluster, "get", "nodes", "-l", f"{key}={value}", "-o", "json").stdout
        ready = {
            n["metadata"]["name"]
            for n in json.loads(out)["items"]
            for c in n["status"].get("conditions") or []
            if c["type"] == "Ready" and c["status"] == "True"
        }
        if ready >= set(names):
            return names
        time.sleep(1)
    raise RuntimeError(f"kwok did not mark the {count} benchmark nodes Ready in 120 s")


def cleanup(cluster: Cluster, namespace: str) -> None:
    """Remove what `run` made outside its namespace: the nodes and the two volumes."""
    key, value = NODE_LABEL
    kubectl(cluster, "delete", "nodes", "-l", f"{key}={value}", "--wait=false", check=False)
    volumes = [f"pv-{namespace}-{claim}"[:63] for claim in ("data", "adapters")]
    kubectl(cluster, "delete", "pv", *volumes, "--wait=false", "--ignore-not-found", check=False)


def volumes(namespace: str) -> list[dict]:
    """The `data` and `adapters` claims the jobs name, bound to hostPath volumes."""
    from finetune_dev.devcluster.volumes import hostpath_claim

    docs = []
    for claim in ("data", "adapters"):
        pv = f"pv-{namespace}-{claim}"[:63]
        docs += hostpath_claim(
            namespace, claim, volume=pv, path=f"/tmp/{pv}", access_modes=("ReadWriteMany",)
        )
    return docs


def finetunejob(name: str, namespace: str) -> dict:
    key, value = NODE_LABEL
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "meta-llama/Meta-Llama-3-8B"},
            "dataset": {"uri": "pvc://data/alpaca.jsonl", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "resources": {
                "gpu": {"count": 1, "memory": "24Gi"},
                "nodeSelector": {key: value},
                "tolerations": [{"key": key, "operator": "Equal", "value": value}],
            },
            "output": {"uri": f"pvc://adapters/{name}"},
        },
    }


class Watch:
    """`kubectl get KIND -w` in the background; `on(type, name, value, seen_at)` per event."""

    def __init__(
        self, cluster: Cluster, resource: str, namespace: str, value: str, on: Callable
    ) -> None:
        self.proc = subprocess.Popen(
            [
                str(binaries.kubectl_path()),
                "--kubeconfig",
                cluster.kubeconfig,
                "get",
                resource,
                "-n",
                namespace,
                "-w",
                "--output-watch-events",
                "-o",
                "jsonpath={.type} {.object.metadata.name} " + value + '{"\\n"}',
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.on = on
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) >= 2:
                self.on(parts[0], parts[1], parts[2] if len(parts) > 2 else "", time.monotonic())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- the operator side ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def parse_requests(text: str) -> tuple[Counter, Counter]:
    """(requests by (method, resource), errors by (method, code)) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    requests: Counter = Counter()
    errors: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "finetune_operator_api_requests_total":
                requests[(s.labels["method"], s.labels["resource"])] += int(s.value)
            elif s.name == "finetune_operator_api_errors_total":
                errors[(s.labels["method"], s.labels["code"])] += int(s.value)
    return requests, errors


class Operator:
    """The operator as its own process, as the chart runs it; RSS sampled every half second,
    requests scraped every second (and just before each kill), summed over incarnations.
    With `cfg.floor`, the floor creator (floor.py) in its place, in the same environment."""

    def __init__(self, cluster: Cluster, cfg: Config, log_path: Path) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.lock = threading.Lock()
        self.done_requests: Counter = Counter()  # of incarnations that ended
        self.done_errors: Counter = Counter()
        self.done_cpu = 0.0
        self.live_requests: Counter = Counter()
        self.live_errors: Counter = Counter()
        self.rss_peak = 0.0
        self.rss_now = 0.0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self.port = _free_port()
        env = {
            **os.environ,
            "KUBECONFIG": self.cluster.kubeconfig,
            "FINETUNE_NAMESPACES": "" if self.cfg.all_namespaces else self.cfg.namespace,
            "FINETUNE_RESYNC_SECONDS": str(self.cfg.resync_seconds),
            "FINETUNE_REFERENCE_WAIT_SECONDS": "900",
            "FINETUNE_METRICS_PORT": str(self.port),
            "FINETUNE_ALLOW_HUB": "false",
            "FINETUNE_GPU_TOLERATIONS": json.dumps(
                [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            ),
            "PYTHONUNBUFFERED": "1",
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.live_requests, self.live_errors = Counter(), Counter()
        if not self._sampler.is_alive():
            self._sampler.start()

    def command(self) -> list[str]:
        if self.cfg.floor:
            return [
                self.cfg.python,
                "-m",
                "finetune_bench.floor",
                "--namespace",
                self.cfg.namespace,
            ]
        scope = (
            ["--all-namespaces"]
            if self.cfg.all_namespaces
            else [f"--namespace={self.cfg.namespace}"]
        )
        return [self.cfg.python, "-m", "kopf", "run", "-m", "finetune_operator.main", *scope] + [
            "--standalone"
        ]

    def wait_ready(self, timeout: float = 120) -> None:
        """Until its metrics endpoint answers: the start-up handler has run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the operator did not start in {timeout:.0f}s; see {self.log_path}")

    def scrape(self) -> None:
        proc, port = self.proc, self.port
        if proc is None or proc.poll() is not None:
            return
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                requests, errors = parse_requests(r.read().decode())
        except OSError:
            return  # starting, or busy: the next scrape gets it
        with self.lock:
            if proc is self.proc:
                self.live_requests, self.live_errors = requests, errors

    def _sample(self) -> None:
        last_scrape = 0.0
        while not self._stop.is_set():
            proc = self.proc
            if proc is not None and proc.poll() is None:
                rss = _rss_mib(proc.pid)
                if rss is not None:
                    self.rss_now = rss
                    self.rss_peak = max(self.rss_peak, rss)
                if time.monotonic() - last_scrape >= 1.0:
                    self.scrape()
                    last_scrape = time.monotonic()
            self._stop.wait(0.5)

    def _end_incarnation(self) -> None:
        with self.lock:
            self.done_requests += self.live_requests
            self.done_errors += self.live_errors
            self.live_requests, self.live_errors = Counter(), Counter()

    def kill(self) -> None:
        """SIGKILL (no clean-up), after a last scrape, then start a new one at once."""
        assert self.proc is not None
        self.scrape()
        self.done_cpu += _cpu_s(self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._end_incarnation()
        self.start()

    def requests(self) -> tuple[Counter, Counter]:
        with self.lock:
            return self.done_requests + self.live_requests, self.done_errors + self.live_errors

    def cpu(self) -> float:
        live = _cpu_s(self.proc.pid) if self.proc and self.proc.poll() is None else 0.0
        return self.done_cpu + live

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- the run ------------------------------------------------------------------------------


class Progress:
    """What the watches saw, with this process's monotonic clock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ftj_seen: dict[str, float] = {}
        self.ftj_succeeded: dict[str, float] = {}
        self.job_seen: dict[str, float] = {}
        self.job_complete: dict[str, float] = {}

    def on_ftj(self, type: str, name: str, phase: str, at: float) -> None:
        with self.lock:
            if type in ("ADDED", "MODIFIED"):
                self.ftj_seen.setdefault(name, at)
                if phase == "Succeeded":
                    self.ftj_succeeded.setdefault(name, at)

    def on_job(self, type: str, name: str, succeeded: str, at: float) -> None:
        owner = name.removesuffix("-train")
        with self.lock:
            if type in ("ADDED", "MODIFIED"):
                self.job_seen.setdefault(owner, at)
                if succeeded.strip() not in ("", "0"):
                    self.job_complete.setdefault(owner, at)


def list_items(
    cluster: Cluster, namespace: str, resource: str, selector: str | None = None
) -> list[dict]:
    args = ["get", resource, "-n", namespace, "-o", "json"]
    return json.loads(kubectl(cluster, *args, *(["-l", selector] if selector else [])).stdout)[
        "items"
    ]


def missing_events(cluster: Cluster, namespace: str) -> list[str]:
    """FineTuneJobs without the Event of the transition their status is in: the one a pass
    posts (events.py: named after the transition, so one found after any number of kills is
    the one the killed passes would have posted)."""
    from finetune_operator import events
    from finetune_operator.reconcile.finetunejob import transition_event

    posted = {e["metadata"]["name"] for e in list_items(cluster, namespace, "events")}
    missing = []
    for ftj in list_items(cluster, namespace, "finetunejobs"):
        transition = transition_event(ftj.get("status") or {})
        if transition is None or events.too_old(transition):
            continue
        if events.event_name(ftj, transition.key) not in posted:
            missing.append(f"{ftj['metadata']['name']}: {transition.reason}")
    return sorted(missing)


def check_ownership(cluster: Cluster, namespace: str) -> tuple[list[str], list[str], list[str]]:
    """(duplicates, orphans, FineTuneJobs without a Job) as the API server has them now."""
    ftjs = {
        o["metadata"]["uid"]: o["metadata"]["name"]
        for o in list_items(cluster, namespace, "finetunejobs")
    }
    duplicates: list[str] = []
    orphans: list[str] = []
    with_job = set()
    for resource in ("jobs", *CHILD_KINDS):
        per_owner: Counter = Counter()
        for obj in list_items(cluster, namespace, resource, MANAGED):
            md = obj["metadata"]
            owners = [r for r in md.get("ownerReferences") or [] if r["kind"] == "FineTuneJob"]
            if not owners:
                if resource == "jobs" and md.get("labels", {}).get("finetune.dev/finetunejob"):
                    duplicates.append(f"{resource}/{md['name']} has no owner")
                continue
            uid = owners[0]["uid"]
            if uid not in ftjs:
                orphans.append(f"{resource}/{md['name']} (owner {owners[0]['name']} is gone)")
                continue
            per_owner[uid] += 1
            if resource == "jobs":
                with_job.add(uid)
        duplicates += [
            f"{n} {resource} of FineTuneJob {ftjs[uid]}" for uid, n in per_owner.items() if n > 1
        ]
    without = sorted(name for uid, name in ftjs.items() if uid not in with_job)
    return duplicates, orphans, without


def run(cluster: Cluster, cfg: Config, say: Callable[[str], None] = print) -> Result:
    """The benchmark on a running control plane with the CRDs installed; nodes are added
    (and left for the caller to remove with `cleanup`). With `cfg.floor` it is done once
    every FineTuneJob has its Job, and kills and the steady window are left out."""
    workdir = Path(cfg.workdir or controlplane.temporary_directory("ftop-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.floor:
        cfg.kills, cfg.steady_seconds = 0, 0
    steady = cfg.resync_seconds if cfg.steady_seconds is None else cfg.steady_seconds
    names = [f"scale-{i:05d}" for i in range(cfg.jobs)]

    say(f"adding {cfg.nodes} kwok GPU nodes")
    add_nodes(cluster, cfg.nodes)
    kubectl(cluster, "create", "namespace", cfg.namespace, check=False)
    kubectl(
        cluster,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": volumes(cfg.namespace)}),
    )

    progress = Progress()
    watches = [
        Watch(
            cluster,
            "finetunejobs.finetune.dev",
            cfg.namespace,
            "{.object.status.phase}",
            progress.on_ftj,
        ),
        Watch(cluster, "jobs.batch", cfg.namespace, "{.object.status.succeeded}", progress.on_job),
    ]
    operator = Operator(cluster, cfg, workdir / ("floor.log" if cfg.floor else "operator.log"))
    say(f"{operator.log_path.stem} log: {operator.log_path}")
    operator.start()
    operator.wait_ready()

    # Several `kubectl create` at once: one alone sends its POSTs one after the other.
    chunks = [names[i :: cfg.apply_processes] for i in range(cfg.apply_processes)]
    creators = []
    started = time.monotonic()
    for i, chunk in enumerate(chunks):
        if not chunk:
            continue
        path = workdir / f"finetunejobs-{i}.json"
        doc = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [finetunejob(n, cfg.namespace) for n in chunk],
        }
        path.write_text(json.dumps(doc))
        creators.append(
            subprocess.Popen(
                [
                    str(binaries.kubectl_path()),
                    "--kubeconfig",
                    cluster.kubeconfig,
                    "create",
                    "-f",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    apply_s = None
    kill_at = [cfg.jobs * (i + 1) // (cfg.kills + 1) for i in range(cfg.kills)]
    kills_done = 0
    jobs_at_last_start = 0
    last_report = 0.0
    deadline = started + cfg.timeout
    converged = False
    while time.monotonic() < deadline:
        now = time.monotonic()
        if apply_s is None and all(p.poll() is not None for p in creators):
            apply_s = now - started
            for p in creators:
                if p.returncode != 0:
                    raise RuntimeError(f"kubectl create failed: {p.stderr.read()[-2000:]}")
        with progress.lock:
            n_ftj, n_job = len(progress.ftj_seen), len(progress.job_seen)
            n_done = sum(1 for n in names if n in progress.ftj_succeeded)
        # Kill during the burst of Job creation, once the new incarnation has made one.
        if kills_done < cfg.kills and n_job >= kill_at[kills_done] and n_job > jobs_at_last_start:
            say(f"kill -9 of the operator (pid {operator.proc.pid}) at {n_job} Jobs")
            operator.kill()
            kills_done += 1
            jobs_at_last_start = n_job
        if now - last_report >= 5:
            last_report = now
            say(
                f"[{now - started:6.1f}s] FineTuneJobs {n_ftj}/{cfg.jobs}  Jobs {n_job}  "
                f"Succeeded {n_done}  operator RSS {operator.rss_now:.0f} MiB  "
                f"kills {kills_done}/{cfg.kills}"
            )
        # Kills still due once every Job exists cannot fall in the burst: they are not done,
        # and the result says how many were.
        if (n_job if cfg.floor else n_done) == cfg.jobs and apply_s is not None:
            converged = True
            break
        time.sleep(0.2)
    converge_s = time.monotonic() - started
    say(f"converged: {converged} after {converge_s:.1f}s")

    operator.scrape()
    burst_requests, burst_errors = operator.requests()
    if converged and steady > 0:
        say(f"steady state: watching one resync interval ({steady:.0f}s)")
        time.sleep(steady)
    operator.scrape()
    all_requests, all_errors = operator.requests()
    steady_requests = all_requests - burst_requests
    rss_after = operator.rss_now
    cpu = operator.cpu()
    duplicates, orphans, without = check_ownership(cluster, cfg.namespace)
    # The last pass posts its Event just after its status write, which convergence waited
    # for: a short wait for the stragglers, not for a lost one.
    deadline = time.monotonic() + EVENT_GRACE_S
    lost_events = missing_events(cluster, cfg.namespace) if not cfg.floor else []
    while lost_events and time.monotonic() < deadline:
        time.sleep(1.0)
        lost_events = missing_events(cluster, cfg.namespace)
    operator.stop()
    for w in watches:
        w.stop()

    with progress.lock:
        latency = [
            progress.job_seen[n] - progress.ftj_seen[n]
            for n in names
            if n in progress.job_seen and n in progress.ftj_seen
        ]
        # 0 when the operator read the finished pod before the Job controller wrote the Job.
        lag = [
            max(0.0, progress.ftj_succeeded[n] - progress.job_complete[n])
            for n in names
            if n in progress.ftj_succeeded and n in progress.job_complete
        ]
        last_job = max(progress.job_seen.values(), default=started)
    jobs = max(cfg.jobs, 1)
    writes = sum(v for (m, _), v in all_requests.items() if m in WRITES)
    return Result(
        config=asdict(cfg),
        machine=machine(),
        converged=converged,
        converge_s=converge_s,
        apply_s=apply_s or 0.0,
        jobs_created_s=last_job - started,
        creates=cfg.jobs + sum(v for (m, _), v in all_requests.items() if m == "POST"),
        latency_s=percentiles(latency),
        latency_n=len(latency),
        status_lag_s=percentiles(lag),
        status_lag_n=len(lag),
        rss_peak_mib=operator.rss_peak,
        rss_after_mib=rss_after,
        cpu_s=cpu,
        requests_per_job=sum(all_requests.values()) / jobs,
        writes_per_job=writes / jobs,
        conflicts_409_per_job=sum(v for (_, code), v in all_errors.items() if code == "409") / jobs,
        steady_requests_per_job=sum(steady_requests.values()) / jobs,
        steady_writes_per_job=sum(v for (m, _), v in steady_requests.items() if m in WRITES) / jobs,
        requests_by_kind={f"{m} {r}": v for (m, r), v in all_requests.items()},
        kills_done=kills_done,
        duplicates=duplicates,
        orphans=orphans,
        without_job=without,
        lost_events=lost_events,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--resync-seconds", type=float, default=60.0)
    p.add_argument("--steady-seconds", type=float, default=None, help="default: one resync")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument(
        "--floor",
        action="store_true",
        help="no operator: only its children created by a minimal creator (floor.py)",
    )
    p.add_argument(
        "--operator-python",
        default=sys.executable,
        help="the interpreter that runs the operator (make bench-scale: the image's packages only)",
    )
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--keep", action="store_true", help="leave the control plane running")
    args = p.parse_args(argv)
    cfg = Config(
        jobs=args.jobs,
        nodes=args.nodes,
        kills=args.kills,
        resync_seconds=args.resync_seconds,
        steady_seconds=args.steady_seconds,
        timeout=args.timeout,
        floor=args.floor,
        python=args.operator_python,
    )
    directory = controlplane.temporary_directory("ftop-scale-cluster-")
    cfg.workdir = str(directory / "bench")

    def say(msg: str) -> None:
        print(f"[scale] {msg}", flush=True)

    say(f"starting the control plane in {directory}")
    cluster = controlplane.up(directory, gpu_nodes=0, with_crds=True)
    try:
        result = run(cluster, cfg, say)
    finally:
        if args.keep:
            say(f"control plane left running: KUBECONFIG={cluster.kubeconfig}")
        else:
            controlplane.down(directory, quiet=True)
    print(result.report(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    ok = result.converged and not (
        result.duplicates or result.orphans or result.without_job or result.lost_events
    )
    return 0 if ok else 1
