"""`finetune-dev cluster up | down | env | build`: the local control plane for people."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import binaries, controlplane


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune-dev cluster",
        description="Local Kubernetes control plane (etcd, "
        "kube-apiserver, controller-manager, scheduler, kwok).",
    )
    parser.add_argument("action", choices=["up", "down", "env", "build", "status"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"cluster directory (default {controlplane.default_directory()})",
    )
    parser.add_argument(
        "--gpu-nodes",
        type=int,
        default=len(controlplane.FAKE_GPU_FLEET),
        help="kwok fake GPU nodes to create on `up`",
    )
    parser.add_argument(
        "--no-crds",
        action="store_true",
        help="on `up`, do not install the FineTuneJob, AdapterMerge and "
        "AdapterDeployment CRDs (a bare cluster)",
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            for name, path in binaries.ensure_built().items():
                print(f"{name:<24} {path}")
        elif args.action == "up":
            cluster = controlplane.up(
                args.dir, gpu_nodes=args.gpu_nodes, with_crds=not args.no_crds
            )
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.action == "down":
            controlplane.down(args.dir)
        elif args.action in ("env", "status"):
            cluster = controlplane.Cluster.load(args.dir or controlplane.default_directory())
            if cluster is None:
                print(
                    "no dev cluster is running; start one with `finetune-dev cluster up`",
                    file=sys.stderr,
                )
                return 1
            dead = cluster.dead_components()
            if dead:
                print(
                    f"dev cluster at {cluster.directory} is broken: {', '.join(dead)} not "
                    "running. Run `finetune-dev cluster down` then `finetune-dev cluster up`.",
                    file=sys.stderr,
                )
                return 1
            if args.action == "env":
                print(f"export KUBECONFIG={cluster.kubeconfig}")
            else:
                for name, pid in cluster.pids.items():
                    print(f"{name:<24} pid {pid:<8} log {cluster.log_path(name)}")
                print(f"{'apiserver':<24} {cluster.server}")
    except (controlplane.ClusterError, binaries.BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
