"""Runs the operator as a separate process (`kopf run`), the way it runs in a pod."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from kubetest import wait_for

from finetune_dev.devcluster.controlplane import Cluster

RESYNC_MARKER = "resync complete"
# The test operator watches only namespaces of tests that asked for it (the `namespace`
# fixture prefixes those with "op-"): API-only tests must not see an operator write status.
OPERATOR_NAMESPACES = "op-*"


class OperatorProcess:
    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        *,
        kubeconfig: str | None = None,
        extra_env: dict[str, str] | None = None,
        namespaces: str = OPERATOR_NAMESPACES,
    ):
        self.cluster = cluster
        self.workdir = workdir
        self.kubeconfig = kubeconfig or cluster.kubeconfig
        self.extra_env = extra_env or {}
        self.namespaces = namespaces
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "operator.log"
        self.starts = 0

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "FINETUNE_RESYNC_SECONDS": "5",
            # Tests add GPU nodes and plan a job at once: no list of them may be reused.
            "FINETUNE_GPU_NODES_CACHE_SECONDS": "0",
            "FINETUNE_METRICS_PORT": "0",
            "FINETUNE_ALLOW_HUB": "false",
            "FINETUNE_NAMESPACES": self.namespaces,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        self.starts += 1
        offset = len(self.log_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kopf",
                    "run",
                    "-m",
                    "finetune_operator.main",
                    f"--namespace={self.namespaces}",
                    "--standalone",
                    "--verbose",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # With --verbose kopf logs each watch-stream it opens. Watching a namespace pattern,
        # it first watches namespaces and then lists and watches each matching one as it
        # appears, so nothing created in a test namespace is missed.
        wait_for(
            lambda: (
                "watch-stream for namespaces" in self.log_text()[offset:]
                or self.proc.poll() is not None
            ),
            timeout=60,
            what="the operator to start",
        )
        if self.proc.poll() is not None:
            raise AssertionError("operator exited at start-up:\n" + self.log_text()[-4000:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_resyncs(self, count: int, timeout: float = 60) -> None:
        """Wait until the operator has finished `count` more periodic resyncs (each one
        reconciles every object), so a test can assert that nothing changed."""
        start = self.log_text().count(RESYNC_MARKER)
        wait_for(
            lambda: self.log_text().count(RESYNC_MARKER) >= start + count,
            timeout=timeout,
            what=f"{count} operator resyncs",
        )

    def kill(self) -> None:
        """SIGKILL: no clean-up, as when a node dies under the operator."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()
