"""`finetune-dev demo`: a real fine-tune through the operator, on this machine.

Starts the local control plane, the local node agent (this machine as a Node whose pods
run as processes) and the operator, applies examples/finetunejob-demo.yaml, shows the
progress the worker reports into the FineTuneJob's status, and prints where the adapter
is, the plan and why, the measured throughput and memory, the merge result and the
AdapterDeployment. Everything it starts is stopped at the end, on Ctrl-C, or at the
start of the next run (a run killed with SIGKILL leaves a record in the data folder).

`finetune-dev demo down` stops what a killed run left behind; `finetune-dev demo
node-agent ...` runs the node agent on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune_dev.devcluster.volumes import hostpath_claim

REPO_ROOT = Path(__file__).resolve().parents[3]
NAMESPACE = "default"
NODE_NAME = "local-cpu"
STEPS = 8
# The claims the demo manifest names, each a hostPath PersistentVolume under <data>/pvc.
CLAIMS = ("demo-models", "demo-data", "demo-adapters")


class DemoFailed(Exception):
    """The demo cannot go on; the message says what happened and where to look."""


class ProcessDied(DemoFailed):
    """The operator or the node agent exited: waiting any longer is pointless."""


def say(step: int, text: str) -> None:
    print(f"==> [{step}/{STEPS}] {text}", flush=True)


def info(text: str) -> None:
    print(f"    {text}", flush=True)


@dataclass
class DemoPaths:
    root: Path

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def pvc(self) -> Path:
        return self.root / "pvc"

    @property
    def node(self) -> Path:
        return self.root / "node"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def processes(self) -> Path:
        return self.root / "processes.json"

    def claim(self, uri: str) -> Path:
        """`pvc://claim/path` -> the host directory behind it."""
        claim, _, rest = uri[len("pvc://") :].partition("/")
        return self.pvc / claim / rest


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune-dev demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-dir",
        default=str(REPO_ROOT / ".demo"),
        help="the demo's data folder (default: .demo in the repository)",
    )
    p.add_argument("--manifest", default=str(REPO_ROOT / "examples" / "finetunejob-demo.yaml"))
    p.add_argument("--dataset", default=str(REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl"))
    p.add_argument("--max-steps", type=int, help="override spec.training.maxSteps (CI: fewer)")
    p.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for training and follow-ups"
    )
    p.add_argument(
        "--keep", action="store_true", help="leave everything running at the end, until Ctrl-C"
    )
    p.add_argument("--summary-json", help="also write the final objects to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["node-agent"]:
        from .nodeagent import main as agent_main

        return agent_main(argv[1:])
    if argv[:1] == ["down"]:
        args = parse_args(argv[1:])
        Demo(args).stop_stale()
        print(f"stopped whatever an earlier demo left running in {args.data_dir}")
        return 0
    args = parse_args(argv)
    demo = Demo(args)

    def terminate(signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C must stop everything even when the shell started us with SIGINT ignored
    # (a background job, some CI runners): Python would then never raise KeyboardInterrupt.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\n==> interrupted: stopping everything the demo started", flush=True)
        return 130
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        demo.stop_all()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.paths = DemoPaths(Path(args.data_dir).resolve())
        self.cluster = None
        self.api = None
        self.processes: dict[str, subprocess.Popen] = {}
        self.log_offsets: dict[Path, int] = {}
        self.started = time.monotonic()

    # ---- the flow --------------------------------------------------------------------------

    def run(self) -> int:
        manifest = self.load_manifest()
        self.prepare_data(manifest)
        self.start_control_plane()
        self.install_api_and_volumes(manifest)
        self.start_node_agent()
        self.start_operator()
        name = self.apply(manifest)
        ftj = self.follow_training(name)
        followups = self.follow_followups(ftj)
        self.summarise(ftj, followups)
        if self.args.keep:
            print(
                f"\nEverything keeps running; in another terminal:\n"
                f"    export KUBECONFIG={self.cluster.kubeconfig}\n"
                f"    kubectl get ftj,amerge,adapterdeployments,jobs,pods\n"
                f"Press Ctrl-C to stop it all.",
                flush=True,
            )
            while True:
                time.sleep(3600)
        phase = (ftj.get("status") or {}).get("phase")
        return 0 if phase == "Succeeded" else 1

    def load_manifest(self) -> dict:
        path = Path(self.args.manifest)
        if not path.exists():
            raise DemoFailed(
                f"the demo manifest {path} does not exist; run the demo from a "
                f"checkout of the repository or pass --manifest"
            )
        manifest = yaml.safe_load(path.read_text())
        if self.args.max_steps:
            training = manifest["spec"]["training"]
            training["maxSteps"] = self.args.max_steps
            training["checkpointSteps"] = min(
                training.get("checkpointSteps", 200), self.args.max_steps
            )
        return manifest

    def prepare_data(self, manifest: dict) -> None:
        say(1, f"data folder {self.paths.root} (stale processes from an earlier run are stopped)")
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.stop_stale()
        for sub in (self.paths.node, self.paths.logs):
            shutil.rmtree(sub, ignore_errors=True)
        spec = manifest["spec"]
        model_dir = self.paths.claim(spec["model"]["uri"])
        dataset = self.paths.claim(spec["dataset"]["uri"])
        dataset.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.args.dataset, dataset)
        info(
            f"dataset: {self.args.dataset} -> {dataset} "
            f"({len(dataset.read_text().splitlines())} examples)"
        )
        if (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists():
            info(f"tiny model: reusing {model_dir}")
        else:
            info(
                "tiny model: making a small Llama-architecture model and tokenizer locally "
                "(first run only, no download)"
            )
            from ..tinymodel import make_tiny_model

            t = time.monotonic()
            shutil.rmtree(model_dir, ignore_errors=True)
            make_tiny_model(model_dir, [dataset])
            info(f"tiny model: written to {model_dir} in {time.monotonic() - t:.1f}s")
        outputs = {self.paths.claim(spec["output"]["uri"])}
        merge = (spec.get("followUp") or {}).get("merge") or {}
        if merge.get("enabled"):
            outputs.add(self.paths.claim(merge.get("output") or spec["output"]["uri"] + "-merged"))
        for out in outputs:
            if out.exists():
                info(f"removing the previous run's output {out} (a new run trains from scratch)")
                shutil.rmtree(out)
        for claim in CLAIMS:
            (self.paths.pvc / claim).mkdir(parents=True, exist_ok=True)

    def start_control_plane(self) -> None:
        from ..devcluster import controlplane

        say(
            2,
            "local control plane: etcd, kube-apiserver, controller-manager, scheduler "
            "(a fresh one each run)",
        )
        controlplane.down(self.paths.cluster, quiet=True)
        self.cluster = controlplane.up(self.paths.cluster, gpu_nodes=0)
        from .kubeapi import KubeAPI

        self.api = KubeAPI.from_kubeconfig(self.cluster.kubeconfig)
        info(f"API server {self.cluster.server}; kubeconfig {self.cluster.kubeconfig}")

    def kubectl(self, *args: str, input: str | None = None) -> str:
        from ..devcluster import controlplane

        try:
            return controlplane.kubectl(self.cluster, *args, input=input).stdout
        except controlplane.ClusterError as exc:
            raise DemoFailed(str(exc)) from None

    def install_api_and_volumes(self, manifest: dict) -> None:
        say(
            3,
            "installing the CRDs and the demo's volumes (hostPath PersistentVolumes "
            f"under {self.paths.pvc})",
        )
        crds = REPO_ROOT / "crds"
        self.kubectl("apply", "--server-side", "--field-manager=finetune-demo", "-f", str(crds))
        for crd in ("finetunejobs", "adaptermerges", "adapterdeployments"):
            self.wait(
                lambda crd=crd: (
                    self.kubectl(
                        "get",
                        "crd",
                        f"{crd}.finetune.dev",
                        "-o",
                        "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                    )
                    == "True"
                ),
                f"CRD {crd}.finetune.dev to be Established",
                30,
            )
        docs = []
        for claim in CLAIMS:
            docs += hostpath_claim(
                NAMESPACE,
                claim,
                volume=f"{NAMESPACE}-{claim}",
                path=str(self.paths.pvc / claim),
                size="10Gi",
            )
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        for claim in CLAIMS:
            self.wait(
                lambda claim=claim: (
                    self.kubectl(
                        "get", "pvc", claim, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}"
                    )
                    == "Bound"
                ),
                f"PersistentVolumeClaim {claim} to be Bound",
                60,
            )
        info(f"claims {', '.join(CLAIMS)} bound to {self.paths.pvc}/<claim>")

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        with open(self.paths.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[name] = proc
        self.paths.processes.write_text(json.dumps({n: p.pid for n, p in self.processes.items()}))
        return proc

    def start_node_agent(self) -> None:
        say(
            4,
            f"local node agent: this machine as Node {NODE_NAME!r}; pods bound to it run "
            "as processes here",
        )
        proc = self.spawn(
            "node-agent",
            [
                sys.executable,
                "-m",
                "finetune_dev.demo.nodeagent",
                "--kubeconfig",
                self.cluster.kubeconfig,
                "--data-dir",
                str(self.paths.node),
                "--node-name",
                NODE_NAME,
            ],
            {},
        )
        self.wait(
            lambda: (
                self._alive_or_fail("node-agent", proc)
                and self.kubectl(
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                )
                == "True"
            ),
            f"node {NODE_NAME} to be Ready",
            60,
        )
        node = json.loads(self.kubectl("get", "node", NODE_NAME, "-o", "json"))
        cap, labels = node["status"]["capacity"], node["metadata"]["labels"]
        info(
            f"node {NODE_NAME} Ready: cpu {cap['cpu']}, memory {cap['memory']}, "
            f"nvidia.com/gpu {cap['nvidia.com/gpu']} (a stand-in: "
            f"gpu.product={labels['nvidia.com/gpu.product']}, gpu.memory="
            f"{labels['nvidia.com/gpu.memory']} MiB of host memory; the worker trains on "
            f"the CPU)"
        )
        info(
            f"pod logs: {self.paths.node / 'logs'}/<namespace>/<pod>/<container>.log, "
            f"also through `kubectl logs`; agent log {self.paths.logs / 'node-agent.log'}"
        )

    def start_operator(self) -> None:
        say(
            5,
            "operator: kopf run -m finetune_operator.main (log "
            f"{self.paths.logs / 'operator.log'})",
        )
        self.spawn(
            "operator",
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "-m",
                "finetune_operator.main",
                "--all-namespaces",
                "--standalone",
            ],
            {
                "KUBECONFIG": self.cluster.kubeconfig,
                # The planner reads pvc:// models' config.json from the claims' directories.
                "FINETUNE_PVC_ROOT": str(self.paths.pvc),
                "FINETUNE_ALLOW_HUB": "false",
                "FINETUNE_RESYNC_SECONDS": "10",
                "FINETUNE_METRICS_PORT": "0",
            },
        )

    def apply(self, manifest: dict) -> str:
        name = manifest["metadata"]["name"]
        override = f" (maxSteps {self.args.max_steps})" if self.args.max_steps else ""
        say(6, f"kubectl apply -f {os.path.relpath(self.args.manifest)}{override}")
        self.kubectl("delete", "ftj", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
        print(
            self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(manifest))
            .strip()
            .replace("\n", "\n    ")
            .join(["    ", ""]),
            flush=True,
        )
        return name

    # ---- watching ----------------------------------------------------------------------------

    def _alive_or_fail(self, name: str, proc: subprocess.Popen) -> bool:
        if proc.poll() is not None:
            tail = self.log_tail(self.paths.logs / f"{name}.log")
            raise ProcessDied(
                f"the {name} exited with code {proc.returncode}. Last lines of "
                f"{self.paths.logs / (name + '.log')}:\n{tail}"
            )
        return True

    def check_processes(self) -> None:
        for name, proc in self.processes.items():
            self._alive_or_fail(name, proc)

    def wait(self, check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except ProcessDied:
                raise
            except Exception:  # noqa: BLE001, S110 - not there yet; the deadline decides
                pass
            time.sleep(0.5)
        raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")

    @staticmethod
    def log_tail(path: Path, lines: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def get(self, plural: str, name: str) -> dict | None:
        group = "" if plural in ("pods", "configmaps") else "finetune.dev"
        path = (
            f"/api/v1/namespaces/{NAMESPACE}/{plural}/{name}"
            if not group
            else f"/apis/finetune.dev/v1alpha1/namespaces/{NAMESPACE}/{plural}/{name}"
        )
        return self.api.get_or_none(path)

    def pod_lines(self, seen: dict[str, tuple]) -> None:
        """One line per change of a pod's phase or reason in the demo's namespace."""
        pods = self.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
        for pod in pods:
            name, status = pod["metadata"]["name"], pod.get("status") or {}
            state = {}
            for cs in status.get("containerStatuses") or []:
                state = cs.get("state") or {}
            detail = ""
            if "terminated" in state:
                detail = f"exit code {state['terminated'].get('exitCode')}"
            elif "waiting" in state:
                detail = f"{state['waiting'].get('reason')}: {state['waiting'].get('message')}"
            elif status.get("phase") == "Pending" and pod["spec"].get("nodeName") is None:
                conds = {c["type"]: c for c in status.get("conditions") or []}
                sched = conds.get("PodScheduled") or {}
                if sched.get("status") == "False":
                    detail = f"not scheduled: {sched.get('message', '')}"
            key = (status.get("phase"), detail)
            if seen.get(name) == key:
                continue
            seen[name] = key
            where = pod["spec"].get("nodeName") or "no node yet"
            log = ""
            if status.get("phase") == "Running":
                c = pod["spec"]["containers"][0]["name"]
                log = (
                    f" (log: kubectl logs {name},"
                    f" or {self.paths.node}/logs/{NAMESPACE}/{name}/{c}.log)"
                )
            info(
                f"pod {name}: {status.get('phase', 'Pending')} on {where}"
                f"{' - ' + detail if detail else ''}{log}"
            )

    def worker_lines(self, offsets: dict[Path, int]) -> None:
        """The worker's own log messages (not its per-step lines: the status shows those),
        so the quiet minute of loading libraries and data is not a silent one."""
        for log in sorted((self.paths.node / "logs" / NAMESPACE).glob("*/*.log")):
            try:
                with open(log, "rb") as f:
                    f.seek(offsets.get(log, 0))
                    data = f.read()
            except OSError:
                continue
            complete = data.rfind(b"\n") + 1
            offsets[log] = offsets.get(log, 0) + complete
            for line in data[:complete].decode(errors="replace").splitlines():
                _, sep, message = line.partition(" finetune_worker")
                text = message.partition(": ")[2]
                if not sep or "callbacks: step " in message or text.startswith("done: "):
                    continue  # steps and final numbers: the status and the summary say them
                level = line.split()[2].lower() if len(line.split()) > 2 else "info"
                info(f"{log.parent.name}: {'' if level == 'info' else level + ': '}{text}")

    def follow_training(self, name: str) -> dict:
        say(
            7,
            f"training: FineTuneJob {name} as the operator and the worker report it "
            "(kubectl get ftj -w)",
        )
        deadline = time.monotonic() + self.args.timeout
        last_line, printed_plan, pods_seen, conditions_seen = None, False, {}, {}
        while time.monotonic() < deadline:
            self.check_processes()
            ftj = self.get("finetunejobs", name)
            status = (ftj or {}).get("status") or {}
            for cond in status.get("conditions") or []:
                key = (cond.get("status"), cond.get("reason"))
                if conditions_seen.get(cond["type"]) != key:
                    conditions_seen[cond["type"]] = key
                    message = f": {cond['message']}" if cond.get("message") else ""
                    info(
                        f"condition {cond['type']}={cond.get('status')} "
                        f"{cond.get('reason', '')}{message}"
                    )
            if status.get("plan") and not printed_plan:
                printed_plan = True
                info("plan: " + describe_plan(status["plan"]))
            self.pod_lines(pods_seen)
            self.worker_lines(self.log_offsets)
            line = progress_line(status)
            if line != last_line:
                last_line = line
                info(f"[{time.monotonic() - self.started:4.0f}s] {line}")
            if status.get("phase") in ("Succeeded", "Failed"):
                return ftj
            time.sleep(1)
        raise DemoFailed(
            f"FineTuneJob {name} did not finish within {self.args.timeout:.0f}s; "
            f"see {self.paths.logs / 'operator.log'} and the pod logs under "
            f"{self.paths.node / 'logs'}"
        )

    def follow_followups(self, ftj: dict) -> dict:
        status = ftj.get("status") or {}
        follow = ftj["spec"].get("followUp") or {}
        result: dict = {"merge": None, "deployment": None}
        if status.get("phase") != "Succeeded":
            return result
        say(
            8,
            "follow-ups: AdapterMerge (merge the adapter into the base model) and "
            "AdapterDeployment (serve it)",
        )
        deadline = time.monotonic() + self.args.timeout
        pods_seen: dict[str, tuple] = {}
        want_merge = (follow.get("merge") or {}).get("enabled")
        want_deploy = (follow.get("deploy") or {}).get("enabled")
        merge_name = f"{ftj['metadata']['name']}-merge"
        deploy_name = (follow.get("deploy") or {}).get("name") or ftj["metadata"]["name"]
        last = None
        while time.monotonic() < deadline:
            self.check_processes()
            ftj = self.get("finetunejobs", ftj["metadata"]["name"]) or ftj
            refs = (ftj.get("status") or {}).get("followUp") or {}
            merge_name = (refs.get("merge") or {}).get("name") or merge_name
            deploy_name = (refs.get("deployment") or {}).get("name") or deploy_name
            merge = self.get("adaptermerges", merge_name) if want_merge else None
            deploy = self.get("adapterdeployments", deploy_name) if want_deploy else None
            self.pod_lines(pods_seen)
            self.worker_lines(self.log_offsets)
            merge_phase = ((merge or {}).get("status") or {}).get("phase")
            line = (
                f"AdapterMerge {merge_name}: "
                f"{merge_phase or ('absent' if merge is None else 'Pending')}"
                f"; AdapterDeployment {deploy_name}: "
                f"{'created' if deploy else 'absent'}"
            )
            if line != last:
                last = line
                info(line)
            merge_done = not want_merge or merge_phase in ("Succeeded", "Failed")
            if merge_done and (not want_deploy or deploy is not None):
                result["merge"], result["deployment"] = merge, deploy
                if deploy is not None:
                    # Give its serving pod a moment to reach the node agent and be refused.
                    end = time.monotonic() + 10
                    while time.monotonic() < end and not any(
                        "UnsupportedImage" in str(k) for k in pods_seen.values()
                    ):
                        self.pod_lines(pods_seen)
                        time.sleep(1)
                return result
            time.sleep(1)
        raise DemoFailed(
            f"the follow-ups did not finish within {self.args.timeout:.0f}s "
            f"(last: {last}); see {self.paths.logs / 'operator.log'}"
        )

    # ---- the end -----------------------------------------------------------------------------

    def summarise(self, ftj: dict, followups: dict) -> None:
        status = ftj.get("status") or {}
        spec = ftj["spec"]
        elapsed = time.monotonic() - self.started
        print(
            f"\n==> FineTuneJob {ftj['metadata']['name']}: {status.get('phase')} "
            f"({elapsed:.0f}s since the demo started)",
            flush=True,
        )
        adapter_dir = (
            self.paths.claim(spec["output"]["uri"])
            if spec["output"]["uri"].startswith("pvc://")
            else None
        )
        if status.get("phase") != "Succeeded":
            for cond in status.get("conditions") or []:
                info(
                    f"{cond['type']}={cond['status']} {cond.get('reason', '')}: "
                    f"{cond.get('message', '')}"
                )
            info(
                f"pod logs: {self.paths.node / 'logs' / NAMESPACE}; operator log: "
                f"{self.paths.logs / 'operator.log'}"
            )
        files = (
            sorted(p.name for p in adapter_dir.iterdir() if p.is_file())
            if adapter_dir and adapter_dir.is_dir()
            else []
        )
        info(
            f"adapter:    {spec['output']['uri']} -> {adapter_dir}"
            + (f" ({', '.join(files)})" if files else " (no files)")
        )
        if status.get("adapter"):
            a = status["adapter"]
            size = f", {a['sizeBytes']:,} bytes" if a.get("sizeBytes") else ""
            info(f"            sha256 {a.get('sha256', '?')[:16]}...{size}")
        if status.get("plan"):
            info("plan:       " + describe_plan(status["plan"]))
        m = status.get("metrics") or {}
        worker = self.worker_summary(status.get("jobName"))
        wm = worker.get("metrics") or {}
        if m or wm:

            def metric(key):  # the status first; the termination message otherwise
                return m.get(key) if m.get(key) is not None else wm.get(key)

            info(
                "measured:   "
                + ", ".join(
                    f"{k} {v}"
                    for k, v in (
                        ("tokens/s", _num(metric("tokensPerSecond"))),
                        ("samples/s", _num(metric("samplesPerSecond"))),
                        ("peak GPU memory", m.get("peakVRAM") or _bytes(metric("peakVRAMBytes"))),
                        ("peak host memory (RSS)", _bytes(metric("peakRSSBytes"))),
                        ("train loss", _num(metric("trainLoss"))),
                        ("eval loss", _num(metric("evalLoss"))),
                        ("training time", _seconds(metric("trainRuntimeSeconds"))),
                    )
                    if v is not None
                )
            )
            info(
                "            (from status.metrics and the worker's termination message; on "
                "this node the worker ran on the CPU, so its memory is host memory)"
            )
        merge = followups.get("merge")
        if merge is not None:
            ms = merge.get("status") or {}
            out = merge["spec"]["output"]["uri"]
            host = self.paths.claim(out) if out.startswith("pvc://") else None
            merged_files = (
                sorted(p.name for p in host.iterdir() if p.is_file())
                if host and host.is_dir()
                else []
            )
            info(
                f"merge:      AdapterMerge {merge['metadata']['name']} {ms.get('phase')}: "
                f"{out} -> {host}" + (f" ({', '.join(merged_files)})" if merged_files else "")
            )
        deploy = followups.get("deployment")
        if deploy is not None:
            ds = deploy.get("status") or {}
            info(
                f"deployment: AdapterDeployment {deploy['metadata']['name']} created "
                f"(runtime {deploy['spec'].get('runtime')}"
                + (f", phase {ds['phase']}" if ds.get("phase") else "")
                + ")"
            )
            for cond in ds.get("conditions") or []:
                if cond.get("status") == "True" or cond.get("type") == "Ready":
                    info(
                        f"            {cond['type']}={cond['status']} {cond.get('reason', '')}: "
                        f"{cond.get('message', '')}"
                    )
            refused = self.refused_pods()
            for pod, reason, message in refused:
                info(
                    f"            its serving pod {pod} is refused by the local node agent: "
                    f"{reason}: {message}"
                )
            if not refused:
                info(
                    "            vLLM needs a GPU and a container runtime: on this machine its "
                    "pod is not run (see docs/demo.md)"
                )
        logs = self.paths.node / "logs" / NAMESPACE
        info(f"logs:       pods {logs}/<pod>/<container>.log; operator and agent {self.paths.logs}")
        if self.args.summary_json:
            Path(self.args.summary_json).write_text(
                json.dumps(
                    {
                        "fineTuneJob": ftj,
                        "adapterMerge": merge,
                        "adapterDeployment": deploy,
                        "adapterDir": str(adapter_dir) if adapter_dir else None,
                        "mergedDir": str(self.paths.claim(merge["spec"]["output"]["uri"]))
                        if merge
                        else None,
                        "refusedPods": [list(r) for r in self.refused_pods()],
                        "workerSummary": worker,
                        "podLogs": str(logs),
                        "elapsedSeconds": elapsed,
                        "pods": self.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods")["items"],
                    },
                    indent=1,
                )
            )

    def worker_summary(self, job_name: str | None) -> dict:
        """The JSON summary the worker left as its termination message (pod status)."""
        if not job_name:
            return {}
        pods = self.api.get(
            f"/api/v1/namespaces/{NAMESPACE}/pods", labelSelector=f"job-name={job_name}"
        )["items"]
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                message = ((cs.get("state") or {}).get("terminated") or {}).get("message")
                try:
                    summary = json.loads(message or "")
                except json.JSONDecodeError:
                    continue
                if summary.get("result") == "Succeeded":
                    return summary
        return {}

    def refused_pods(self) -> list[tuple[str, str, str]]:
        out = []
        for pod in self.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason", "").startswith("Unsupported"):
                    out.append(
                        (pod["metadata"]["name"], waiting["reason"], waiting.get("message", ""))
                    )
        return out

    # ---- stopping ----------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Operator first (it would react to the rest going away), then the agent (which
        ends its pods' processes), then the control plane."""
        from ..devcluster import controlplane

        if not self.processes and self.cluster is None:
            return
        print("==> stopping the operator, the node agent and the control plane", flush=True)
        for name in ("operator", "node-agent"):
            proc = self.processes.get(name)
            if proc is not None:
                stop_process(proc, timeout=20)
        self.processes.clear()
        self.paths.processes.unlink(missing_ok=True)
        if self.cluster is not None:
            controlplane.down(self.paths.cluster, quiet=True)
            self.cluster = None
        info(f"stopped; data (model, dataset, adapter, logs) stays in {self.paths.root}")

    def stop_stale(self) -> None:
        """Processes recorded by a run that could not clean up (killed with SIGKILL)."""
        from ..devcluster import controlplane

        try:
            stale = json.loads(self.paths.processes.read_text())
        except (OSError, json.JSONDecodeError):
            stale = {}
        for name, pid in stale.items():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            # A recycled pid belongs to someone else: only ours are stopped.
            if "finetune_operator" in cmdline:
                info(f"stopping the {name} (pid {pid}) left by an earlier run")
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                _wait_gone(pid, 20)
        self.paths.processes.unlink(missing_ok=True)
        controlplane.down(self.paths.cluster, quiet=True)


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _num(v) -> str | None:
    if v is None:
        return None
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _seconds(v) -> str | None:
    return None if v is None else f"{v:.1f}s"


def _bytes(v) -> str | None:
    if v is None:
        return None
    return f"{v / 2**20:.0f} MiB"


def describe_plan(plan: dict) -> str:
    method = plan.get("method", "?")
    parts = [
        (
            f"{method} (micro-batch {plan.get('microBatchSize')} x gradient accumulation "
            f"{plan.get('gradientAccumulation')}, gradient checkpointing "
            f"{'on' if plan.get('gradientCheckpointing') else 'off'})"
        )
    ]
    if plan.get("estimatedPeakBytes"):
        budget = plan.get("budgetBytes")
        parts.append(
            f"predicted peak {_bytes(plan['estimatedPeakBytes'])}"
            + (f" of a {_bytes(budget)} budget" if budget else "")
        )
    if plan.get("trainableParams"):
        parts.append(f"{plan['trainableParams']:,} trainable parameters")
    text = "; ".join(parts)
    if plan.get("reason"):
        text += f". Why: {plan['reason']}"
    return text


def progress_line(status: dict) -> str:
    phase = status.get("phase") or "Pending (waiting for the operator)"
    p = status.get("progress") or {}
    m = status.get("metrics") or {}
    bits = [phase]
    if p.get("step") is not None and p.get("totalSteps"):
        bits.append(f"step {p['step']}/{p['totalSteps']}")
    if p.get("loss") is not None:
        bits.append(f"loss {p['loss']:.4f}")
    if p.get("etaSeconds") is not None and phase == "Running":
        bits.append(f"eta {p['etaSeconds']}s")
    if m.get("tokensPerSecond"):
        bits.append(f"{m['tokensPerSecond']:.0f} tokens/s")
    return "  ".join(bits)


if __name__ == "__main__":
    sys.exit(main())
