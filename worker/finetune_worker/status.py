"""The worker's only Kubernetes API I/O: merge-patching its own FineTuneJob's status.

The pod's service account may patch exactly `finetunejobs/status` of its own job (the
operator's Role names it), so the body carries nothing but `status.progress` and/or
`status.metrics`. Plain HTTPS with the standard library keeps the image free of a
Kubernetes client. The API being unreachable must never stop training: the reporter
logs one warning and carries on; the termination message carries the final numbers.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
# Only these status fields belong to the worker; everything else is the operator's.
WORKER_STATUS_FIELDS = ("progress", "metrics")


class StatusPatchError(Exception):
    """A status patch that the API server refused or could not be sent."""

    def __init__(self, message: str, *, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class KubeStatusClient:
    """Sends merge patches to `.../finetunejobs/{name}/status` as the pod's service account."""

    server: str  # https://host:port
    token_file: Path
    ca_file: Path | None
    timeout_s: float = 5.0

    @classmethod
    def from_environment(cls) -> KubeStatusClient | None:
        """The in-cluster client, or None outside a cluster (no service host or no token)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        sa_dir = Path(os.environ.get("FINETUNE_WORKER_SA_DIR", SERVICE_ACCOUNT_DIR))
        token = sa_dir / "token"
        if not host or not token.is_file():
            return None
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            host = f"[{host}]"
        ca = sa_dir / "ca.crt"
        return cls(server=f"https://{host}:{port}", token_file=token,
                   ca_file=ca if ca.is_file() else None)

    def status_url(self, namespace: str, name: str) -> str:
        return (f"{self.server}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/"
                f"{PLURAL}/{name}/status")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict:
        unknown = set(status) - set(WORKER_STATUS_FIELDS)
        if unknown:
            raise ValueError(f"the worker may only patch {WORKER_STATUS_FIELDS}, not {sorted(unknown)}")
        body = json.dumps({"status": status}).encode()
        # Projected service-account tokens rotate, so read the file on every call.
        token = self.token_file.read_text().strip()
        request = urllib.request.Request(
            self.status_url(namespace, name), data=body, method="PATCH",
            headers={"Content-Type": "application/merge-patch+json",
                     "Accept": "application/json",
                     "Authorization": f"Bearer {token}"})
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise StatusPatchError(f"HTTP {exc.code} patching {namespace}/{name}: {detail}",
                                   code=exc.code) from exc
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            raise StatusPatchError(f"cannot reach the API server at {self.server}: {exc}") from exc


class StatusReporter:
    """Rate-limited status updates that never raise.

    Progress is sent at most every `min_interval_s`; a pending update is kept and
    sent with the next call after the interval, and `final()` always sends.
    """

    def __init__(self, namespace: str, name: str, client: KubeStatusClient | None, *,
                 min_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.namespace, self.name, self.client = namespace, name, client
        self.min_interval_s = max(float(min_interval_s), 0.0)
        self._clock = clock
        self._last_sent: float | None = None
        self._pending: dict[str, Any] = {}
        self._warned = False
        self.sent = 0  # patches the API server accepted

    def update(self, *, progress: dict | None = None, metrics: dict | None = None) -> bool:
        """Queue fields and send them if the interval has passed; True when sent."""
        self._merge(progress, metrics)
        now = self._clock()
        if self._last_sent is not None and now - self._last_sent < self.min_interval_s:
            return False
        return self._flush(now)

    def final(self, *, progress: dict | None = None, metrics: dict | None = None) -> bool:
        """Send everything pending regardless of the interval (end of run or failure)."""
        self._merge(progress, metrics)
        return self._flush(self._clock())

    def _merge(self, progress: dict | None, metrics: dict | None) -> None:
        for key, value in (("progress", progress), ("metrics", metrics)):
            if value:
                self._pending.setdefault(key, {}).update(value)

    def _flush(self, now: float) -> bool:
        if not self._pending or self.client is None:
            return False
        self._last_sent = now  # also on failure: an unreachable API is not retried in a loop
        try:
            self.client.patch_status(self.namespace, self.name, self._pending)
        except Exception as exc:  # noqa: BLE001 - reporting must never stop training
            if not self._warned:
                log.warning("cannot report status to the FineTuneJob (%s); training continues "
                            "and the final numbers go to the termination message", exc)
                self._warned = True
            return False
        self._pending = {}
        self.sent += 1
        return True
