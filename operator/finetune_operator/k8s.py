"""The operator's only module that talks to the Kubernetes API.

Everything else builds plain dicts (builders/) or computes status from dicts
(status.py); this module turns them into requests. Creates are idempotent (409
"already exists" returns the existing object), deletes are tolerant (404 is
"already gone"), status writes carry the resourceVersion they were computed from so a
concurrent change makes the write fail instead of overwriting newer state.

The requests go through one aiohttp session (`Client`), with the credentials of
kubeconfig.py. The operator sends and reads plain JSON, so it needs no generated API
client: kubernetes_asyncio's imports every API and model module it generates (about 36 MiB
resident in the operator, where its whole live state after a burst of 1,000 jobs is about
180 MiB), and it logged response bodies at DEBUG, Secrets included. Nothing here logs a
request or a response body at any level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from finetune_api.common import API_VERSION
from finetune_api.constants import OPERATOR_NAME

from . import kubeconfig, metrics

log = logging.getLogger(__name__)


class ApiError(Exception):
    """The API server answered with an error status. `body` is its Status object as text (it
    names the field, the missing permission or the conflict), `headers` its headers."""

    def __init__(
        self, status: int, reason: str = "", body: str = "", headers: Mapping | None = None
    ):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body
        self.headers: Mapping = headers or {}


FIELD_MANAGER = OPERATOR_NAME

# apiVersion, kind -> plural. Only the kinds the operator reads or writes.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Pod"): "pods",
    ("v1", "Service"): "services",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("v1", "Event"): "events",
    ("v1", "Node"): "nodes",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    (API_VERSION, "FineTuneJob"): "finetunejobs",
    (API_VERSION, "AdapterMerge"): "adaptermerges",
    (API_VERSION, "AdapterDeployment"): "adapterdeployments",
    ("kopf.dev/v1", "ClusterKopfPeering"): "clusterkopfpeerings",
    ("kopf.dev/v1", "KopfPeering"): "kopfpeerings",
}


class Conflict(Exception):
    """The object changed since it was read; the caller reconciles again."""


class Gone(Exception):
    """The object, or its namespace, is being deleted: nothing left to reconcile."""


def _gone(exc: ApiError) -> bool:
    if exc.status == 404:
        return True
    return exc.status == 403 and "NamespaceTerminating" in (exc.body or "")


def trust_environment(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the API clients take proxies (and .netrc credentials) from the environment:
    only when it names some, in a `*_proxy` variable (HTTPS_PROXY, no_proxy, ...: what
    urllib's getproxies reads, any case) or NETRC.

    With trust_env aiohttp looks up the proxy variables and ~/.netrc in a thread for every
    request, to find nothing where no proxy is set: turning that off (the API client used
    then always set it) took the operator's CPU per job from 132-135 ms to 86-108 ms in a
    300-job burst (bench/scale.py, docs/operations.md "Scale"). kopf's own
    session ignores the environment unless told (settings.networking); main.py gives it the
    same answer, so both clients go through a proxy or neither."""
    env = os.environ if environ is None else environ
    return any(
        value and (name.lower().endswith("_proxy") or name.upper() == "NETRC")
        for name, value in env.items()
    )


def ssl_context(credentials: kubeconfig.Credentials) -> ssl.SSLContext | bool:
    """TLS as the credentials ask: their CA (else the system's), their client certificate."""
    if not credentials.server.startswith("https"):
        return False
    ctx = ssl.create_default_context(
        cafile=credentials.ca_file,
        cadata=credentials.ca_data.decode() if credentials.ca_data else None,
    )
    if credentials.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert, key = credentials.cert_file, credentials.key_file
    if credentials.cert_data or credentials.key_data:
        # ssl loads a certificate chain from files only: a private directory, removed as soon
        # as it is loaded (the key never outlives this call on disk).
        with tempfile.TemporaryDirectory(prefix="finetune-operator-") as tmp:
            if credentials.cert_data:
                cert = os.path.join(tmp, "cert.pem")
                _write_private(cert, credentials.cert_data)
            if credentials.key_data:
                key = os.path.join(tmp, "key.pem")
                _write_private(key, credentials.key_data)
            ctx.load_cert_chain(cert, key)
    elif cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Client:
    """One API server, one authenticated aiohttp session with a pool of keep-alive
    connections: what every request of the operator goes through."""

    def __init__(self, credentials: kubeconfig.Credentials):
        self.credentials = credentials
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context(credentials)),
            trust_env=trust_environment(),
            # No total limit: a watch (watch_events) lasts as long as the server keeps it.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        )

    async def request(
        self,
        method: str,
        resource_path: str,
        *,
        query: list | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float | None = 60.0,
    ) -> Any:
        """One request; -> the answer's JSON (or text, when it is not JSON). Raises ApiError
        for an error status. A 401 is tried once more with the token read again: a rotated
        service-account token, an expired exec credential."""
        for renewed in (False, True):
            async with self._send(
                method, resource_path, query, body, content_type, accept, timeout
            ) as resp:
                if resp.status == 401 and not renewed:
                    self.credentials.refresh()
                    continue
                payload = await resp.read()
                if resp.status >= 400:
                    raise _error(resp, payload)
                if resp.content_type == "application/json":
                    return json.loads(payload) if payload else None
                return payload.decode(errors="replace")
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def stream(self, resource_path: str, query: list) -> AsyncIterator[dict]:
        """A GET answered with one JSON document a line (a watch), as long as the server
        keeps it open; no total timeout."""
        async with self._send(
            "GET", resource_path, query, None, "", "application/json", None
        ) as resp:
            if resp.status >= 400:
                raise _error(resp, await resp.read())
            async for line in resp.content:
                if line.strip():
                    yield json.loads(line)

    def _send(self, method, resource_path, query, body, content_type, accept, timeout):
        headers = {"Accept": accept}
        token = self.credentials.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        # Without a timeout (a watch) the session's applies: none in total.
        limits = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
        return self.session.request(
            method,
            self.credentials.server + resource_path,
            params=query,
            data=data,
            headers=headers,
            proxy=self.credentials.proxy_url,
            **limits,
        )

    async def close(self) -> None:
        await self.session.close()


def _error(resp: aiohttp.ClientResponse, payload: bytes) -> ApiError:
    return ApiError(resp.status, resp.reason or "", payload.decode(errors="replace"), resp.headers)


_api: Client | None = None


async def connect(kubeconfig_path: str | os.PathLike | None = None) -> Client:
    """The one shared client: the pod's service account when running in a pod, else
    KUBECONFIG (or the kubeconfig given, for tools and tests)."""
    global _api
    if _api is None:
        credentials = kubeconfig.load(kubeconfig_path)
        log.info("API server %s, credentials from %s", credentials.server, credentials.source)
        _api = Client(credentials)
    return _api


async def close() -> None:
    global _api
    if _api is not None:
        await _api.close()
        _api = None


def path(
    api_version: str,
    kind: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    plural = PLURALS[(api_version, kind)]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [prefix]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


# Answers that say "not now" rather than "no": throttled (429, honouring Retry-After), an API
# server restarting or overloaded (5xx), or a connection that dropped. A call is repeated with
# capped exponential backoff and jitter, as client-go's and controller-runtime's clients do; a
# POST repeated after a lost answer meets 409 AlreadyExists, which create_if_absent expects.
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
RETRY_ATTEMPTS = 6
RETRY_BASE_S = 0.2
RETRY_CAP_S = 10.0
RETRY_AFTER_CAP_S = 60.0


def retry_delay(
    attempt: int,
    retry_after: str | None = None,
    *,
    base: float = RETRY_BASE_S,
    cap: float = RETRY_CAP_S,
) -> float:
    """Seconds before repeat number `attempt` (0-based): the server's Retry-After when it sent
    one (capped), else capped exponential backoff with jitter (half to all of it)."""
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), RETRY_AFTER_CAP_S)
        except ValueError:
            pass  # an HTTP date: fall back to our own backoff
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)


def transient(exc: BaseException) -> tuple[str, str | None] | None:
    """(code label, Retry-After) when `exc` is worth repeating the call for, else None.

    Also how a failed pass is judged (requeue.py): these are what _call raises once its own
    attempts are spent."""
    if isinstance(exc, ApiError):
        if exc.status in TRANSIENT_STATUS:
            return str(exc.status), (exc.headers or {}).get("Retry-After")
        return None
    if isinstance(exc, aiohttp.ClientConnectionError | TimeoutError):
        return "connection", None
    return None


async def _call(
    method: str,
    resource_path: str,
    *,
    body: Any = None,
    content_type: str = "application/json",
    query: list | None = None,
    accept: str = "application/json",
) -> Any:
    api = await connect()
    resource = resource_label(resource_path)
    for attempt in range(RETRY_ATTEMPTS):
        started = time.monotonic()
        # Every attempt is a request the API server serves: what the scale benchmark counts.
        metrics.API_REQUESTS.labels(method=method, resource=resource).inc()
        try:
            return await api.request(
                method,
                resource_path,
                query=query,
                body=body,
                content_type=content_type,
                accept=accept,
            )
        except (TimeoutError, ApiError, aiohttp.ClientError) as exc:
            if isinstance(exc, ApiError):
                metrics.API_ERRORS.labels(method=method, code=str(exc.status)).inc()
            verdict = transient(exc)
            if verdict is not None and attempt + 1 < RETRY_ATTEMPTS:
                code, retry_after = verdict
                delay = retry_delay(attempt, retry_after)
                metrics.API_TRANSIENT_RETRIES.labels(method=method, code=code).inc()
                log.info("%s %s: %s; trying again in %.2fs", method, resource_path, code, delay)
                await asyncio.sleep(delay)
                continue
            if isinstance(exc, ApiError) and _gone(exc) and method != "GET":
                raise Gone(f"{method} {resource_path}: {exc.status} {exc.reason}") from exc
            raise
        finally:
            metrics.API_LATENCY.labels(method=method).observe(time.monotonic() - started)
    raise AssertionError("unreachable: the last attempt returns or raises")


def resource_label(resource_path: str) -> str:
    """The metrics label of a request path: the plural, and the subresource if any
    (`/apis/batch/v1/namespaces/x/jobs/y` -> `jobs`, `.../finetunejobs/y/status` ->
    `finetunejobs/status`). Bounded by the kinds the operator uses, unlike the path."""
    parts = [p for p in resource_path.split("?", 1)[0].split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]
    if len(rest) > 2 and rest[0] == "namespaces":
        rest = rest[2:]
    if not rest:
        return "unknown"
    return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")


def _ident(obj: dict) -> tuple[str, str, str | None, str]:
    md = obj["metadata"]
    return obj["apiVersion"], obj["kind"], md.get("namespace"), md["name"]


async def get(api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
    try:
        return await _call("GET", path(api_version, kind, namespace, name))
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def list_objects(
    api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
) -> list[dict]:
    query = [("labelSelector", label_selector)] if label_selector else None
    result = await _call("GET", path(api_version, kind, namespace), query=query)
    return result.get("items", [])


# The API server answers a list with this Accept header with each object's metadata only
# (PartialObjectMetadataList): a fraction of the bytes to send, parse and hold.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


async def list_metadata(
    api_version: str,
    kind: str,
    namespace: str | None,
    label_selector: str | None = None,
    field_selector: str | None = None,
) -> list[dict]:
    """The metadata of the objects a list would return (names, labels, ...), fetched as
    metadata only."""
    query = [("labelSelector", label_selector)] if label_selector else []
    if field_selector:
        query.append(("fieldSelector", field_selector))
    result = await _call(
        "GET", path(api_version, kind, namespace), query=query, accept=METADATA_ONLY
    )
    # An empty PartialObjectMetadataList says `"items": null`.
    return [item["metadata"] for item in result.get("items") or []]


async def list_names(
    api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
) -> list[str]:
    """The names of the objects a list would return, fetched as metadata only."""
    return [md["name"] for md in await list_metadata(api_version, kind, namespace, label_selector)]


REQUEST_FAILURES = (ApiError, aiohttp.ClientError, TimeoutError)
"""What a request raises once its own attempts are spent (refused, or no answer): for the
callers that can do without the answer, so they need not know the API client's types."""


def describe_failure(exc: BaseException) -> str:
    """One line for the log: the status and the API server's message (which names a missing
    permission), or the connection error."""
    if isinstance(exc, ApiError):
        try:
            message = json.loads(exc.body or "{}").get("message")
        except (ValueError, AttributeError):
            message = None
        return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"


async def create_if_absent(obj: dict) -> tuple[dict, bool]:
    """Create `obj`; if it already exists return the existing one. -> (object, created)."""
    api_version, kind, namespace, name = _ident(obj)
    try:
        created = await _call(
            "POST",
            path(api_version, kind, namespace),
            body=obj,
            query=[("fieldManager", FIELD_MANAGER)],
        )
        return created, True
    except ApiError as exc:
        if exc.status != 409:
            raise
    existing = await get(api_version, kind, namespace, name)
    if existing is None:  # deleted between our create and get: next pass creates it
        raise Conflict(f"{kind} {namespace}/{name} vanished while being created")
    return existing, False


async def server_side_apply(obj: dict) -> dict:
    """Server-side apply: for children whose desired content changes over time."""
    api_version, kind, namespace, name = _ident(obj)
    return await _call(
        "PATCH",
        path(api_version, kind, namespace, name),
        body=obj,
        content_type="application/apply-patch+yaml",
        query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
    )


async def merge_patch(
    api_version: str, kind: str, namespace: str | None, name: str, patch: dict
) -> dict:
    return await _call(
        "PATCH",
        path(api_version, kind, namespace, name),
        body=patch,
        content_type="application/merge-patch+json",
    )


async def patch_status(obj: dict, status: dict) -> dict:
    """Replace-by-merge the status, guarded by the resourceVersion `obj` was read at."""
    api_version, kind, namespace, name = _ident(obj)
    body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": status}
    try:
        return await _call(
            "PATCH",
            path(api_version, kind, namespace, name, "status"),
            body=body,
            content_type="application/merge-patch+json",
        )
    except ApiError as exc:
        if exc.status == 409:
            raise Conflict(f"{kind} {namespace}/{name} changed while reconciling") from exc
        raise


async def delete(
    api_version: str, kind: str, namespace: str | None, name: str, propagation: str = "Background"
) -> bool:
    try:
        await _call(
            "DELETE",
            path(api_version, kind, namespace, name),
            body={"propagationPolicy": propagation},
        )
        return True
    except Gone:
        return False


async def post_event(
    obj: dict, *, name: str, type: str, reason: str, message: str, at: str | None = None
) -> bool:
    """Create the core/v1 Event `name` about `obj` (what `kubectl describe` shows) unless it
    exists. -> whether it exists now (created, or 409: posted before).

    The name says which transition the Event tells of (events.py), so create-if-absent makes
    posting idempotent: a pass may try again after a crash or a failure without ever posting
    a transition twice. `at` is when the transition happened (default: now).

    Posted here rather than with `kopf.event`, whose queue exists only inside kopf's
    per-object tasks: a transition found by the periodic resync lost its Event. An Event
    is a courtesy: failing to post one is logged and never fails the reconcile that
    already wrote the status; the next pass tries again.
    """
    from .conditions import now

    md = obj["metadata"]
    stamp = at or now()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": md["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": md["name"],
            "namespace": md["namespace"],
            "uid": md.get("uid"),
            "resourceVersion": md.get("resourceVersion"),
        },
        "type": type,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": os.environ.get("POD_ID") or FIELD_MANAGER,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        await _call("POST", path("v1", "Event", md["namespace"]), body=event)
        return True
    except ApiError as exc:
        if exc.status == 409:
            return True  # posted before this pass: by a crashed pass, or another replica
        failure: Exception = exc
    except (Gone, aiohttp.ClientError, TimeoutError) as exc:
        failure = exc
    log.warning(
        "could not post the %s Event on %s %s/%s: %s; the next pass tries again",
        reason,
        obj["kind"],
        md["namespace"],
        md["name"],
        failure,
    )
    return False


async def read_pod_log_tail(namespace: str, pod: str, lines: int = 20) -> str:
    """Last lines of a worker's log, for a failure message people can act on."""
    try:
        text = await _call(
            "GET",
            path("v1", "Pod", namespace, pod, "log"),
            query=[("tailLines", str(lines))],
            accept="text/plain",
        )
    except REQUEST_FAILURES:
        return ""
    return text if isinstance(text, str) else ""


async def watch_events(api_version: str, kind: str, namespace: str | None) -> AsyncIterator[dict]:
    """The watch events ({"type", "object"}) of a kind, from a list's resourceVersion on,
    until the server ends the watch (for tools: the operator's own watches are kopf's)."""
    # Not through _call: a tool's watch is not one of the requests the metrics count.
    api = await connect()
    listed = await api.request("GET", path(api_version, kind, namespace))
    for item in listed.get("items") or []:
        yield {"type": "ADDED", "object": {"apiVersion": api_version, "kind": kind, **item}}
    query = [
        ("watch", "true"),
        ("resourceVersion", listed["metadata"]["resourceVersion"]),
        ("allowWatchBookmarks", "false"),
    ]
    async for event in api.stream(path(api_version, kind, namespace), query):
        yield event
