"""The worker's only Kubernetes API I/O: merge-patching its own FineTuneJob's status.

The pod's service account may patch exactly `finetunejobs/status` of its own job (the
operator's Role names it), so the body carries nothing but `status.progress` and/or
`status.metrics`. The official `kubernetes` client sends it, configured as
`kubernetes.config.load_incluster_config()` configures it (the service host and port from
the environment, the service-account token and CA from files, the token re-read as it
rotates). One seam: `FINETUNE_WORKER_SA_DIR` moves the service-account directory, for the
tests and the demo's node agent, which cannot write /var/run/secrets. The client is
imported only when a client is built, so `finetune-worker --help` stays instant.

The API being unreachable, or refusing the patch, must never stop training: the reporter
logs one warning and carries on; the termination message carries the final numbers. No
response body and no token is ever logged (see `quiet_client_logs`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import Configuration

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_DIR_ENV = "FINETUNE_WORKER_SA_DIR"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
# Only these status fields belong to the worker; everything else is the operator's.
WORKER_STATUS_FIELDS = ("progress", "metrics")
# A JSON merge patch: a custom resource has no strategic merge, and a merge patch leaves
# the status fields it does not name (the operator's) alone.
MERGE_PATCH = "application/merge-patch+json"
# kubernetes<37's REST layer logs every response body at DEBUG; with `--log-level DEBUG`
# that would print the FineTuneJob and any error Status the API server sends back.
API_CLIENT_LOGGERS = ("kubernetes.client.rest",)


def quiet_client_logs() -> None:
    """Keep the API client's response bodies out of the log at every verbosity.

    Request headers (the bearer token) are only ever printed by http.client's own debug
    output, which `Configuration.debug` switches on and nothing here does.
    """
    for name in API_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


class StatusPatchError(Exception):
    """A status patch that the API server refused or could not be sent."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def in_cluster_configuration(
    service_account_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Configuration:
    """The client configuration of a pod: what `load_incluster_config()` sets, with the
    service-account directory from `service_account_dir`, else $FINETUNE_WORKER_SA_DIR,
    else the in-cluster path.

    Raises kubernetes.config.ConfigException outside a cluster (no service host or port,
    no token, no CA).
    """
    from kubernetes.client import Configuration
    from kubernetes.config.incluster_config import InClusterConfigLoader

    environ = os.environ if environ is None else environ
    sa_dir = Path(service_account_dir or environ.get(SERVICE_ACCOUNT_DIR_ENV, SERVICE_ACCOUNT_DIR))
    configuration = Configuration()
    # The loader load_incluster_config() uses, given our paths; it installs a hook that
    # re-reads the token file every minute, since projected tokens rotate.
    InClusterConfigLoader(
        token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt"), environ=environ
    ).load_and_set(configuration)
    # One attempt per patch: the reporter's next interval is the retry, and a training
    # step must not wait through urllib3's default three reconnects to a dead API server.
    configuration.retries = 0
    return configuration


class KubeStatusClient:
    """Sends merge patches to `.../finetunejobs/{name}/status` as the pod's service account."""

    def __init__(self, configuration: Configuration, *, timeout_s: float = 5.0) -> None:
        from kubernetes.client import ApiClient, CustomObjectsApi

        quiet_client_logs()
        self.server: str = configuration.host
        self.timeout_s = timeout_s
        self._api = CustomObjectsApi(ApiClient(configuration))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> KubeStatusClient | None:
        """The in-cluster client, or None outside a cluster (no service host, token or CA)."""
        from kubernetes.config import ConfigException

        try:
            configuration = in_cluster_configuration(environ=environ)
        except ConfigException as exc:
            log.info("no in-cluster Kubernetes API access: %s", exc)
            return None
        return cls(configuration)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch `status` into the job's status; the object the API server returns."""
        unknown = set(status) - set(WORKER_STATUS_FIELDS)
        if unknown:
            raise ValueError(
                f"the worker may only patch {WORKER_STATUS_FIELDS}, not {sorted(unknown)}"
            )
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return self._api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _content_type=MERGE_PATCH,
                _request_timeout=self.timeout_s,
            )
        except ApiException as exc:
            if not exc.status:  # status 0: the client's own failure (TLS), no response
                raise StatusPatchError(
                    f"cannot reach the API server at {self.server}: "
                    f"{' '.join(str(exc.reason).split())}"
                ) from None
            # The exception's text holds the response headers and body: build our own, and
            # drop the chain so no traceback carries them either.
            raise StatusPatchError(
                refusal_message(exc.status, exc.reason, namespace, name), code=exc.status
            ) from None
        except (HTTPError, OSError) as exc:  # urllib3's connection errors, TLS, timeouts
            raise StatusPatchError(f"cannot reach the API server at {self.server}: {exc}") from exc


def refusal_message(code: int | None, reason: str | None, namespace: str, name: str) -> str:
    """What an HTTP error on the status patch means, from its status line only."""
    target = f"{PLURAL}/status of {namespace}/{name}"
    what = f"HTTP {code} {reason or ''}".rstrip()
    if code == 401:
        return f"{what} patching {target}: the API server rejected the service-account token"
    if code == 403:
        return (
            f"{what} patching {target}: the pod's service account may not patch it "
            f"(the operator's Role for this job grants `patch` on {PLURAL}/status; "
            "check the Role and RoleBinding)"
        )
    if code == 404:
        return f"{what} patching {target}: the FineTuneJob does not exist (deleted?)"
    return f"{what} patching {target}"


class StatusReporter:
    """Rate-limited status updates that never raise.

    Progress is sent at most every `min_interval_s`; a pending update is kept and
    sent with the next call after the interval, and `final()` always sends.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        client: KubeStatusClient | None,
        *,
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
                log.warning(
                    "cannot report status to the FineTuneJob (%s); training continues "
                    "and the final numbers go to the termination message",
                    exc,
                )
                self._warned = True
            return False
        self._pending = {}
        self.sent += 1
        return True
