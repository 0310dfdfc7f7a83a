"""Where the operator's credentials come from: the pod's service account, or a kubeconfig.

One source for both clients: k8s.py's requests and kopf's watches (main.py's login handler),
so they always speak to the same API server as the same user.

In a pod the service account's token is a projected token that the kubelet rotates (hourly
by default, valid for longer): it is read again a minute after it was last read, as client-go
does, never cached for the life of the process. Out of a cluster a kubeconfig is read the
way kubectl reads it: the files in KUBECONFIG (the first to set a value wins), its current
context, file paths relative to the kubeconfig that names them, and the credentials a user
entry can hold: client certificates, a token or tokenFile, or an exec plugin (EKS, GKE, AKS
and OIDC helpers), whose ExecCredential is run again when it expires.

Nothing here logs a token, a key or a plugin's output. Reading a token file and running an
exec plugin happen in the calling thread: a file read a minute, and a plugin run once per
credential it returns (out of a cluster only).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# client-go re-reads a token file once a minute (CachedFileTokenSource): a rotated token is in
# use within a minute, well inside the old one's validity.
TOKEN_FILE_REREAD_S = 60.0
# An exec plugin's credential is renewed this long before it says it expires.
EXEC_EXPIRY_MARGIN_S = 60.0
EXEC_TIMEOUT_S = 60.0


class ConfigError(Exception):
    """No usable credentials: the message says what is missing and where it was looked for."""


@dataclass
class Credentials:
    """An API server and how to authenticate to it. File contents are PEM bytes."""

    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    cert_file: str | None = None
    cert_data: bytes | None = None
    key_file: str | None = None
    key_data: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    exec_plugin: dict | None = None
    exec_dir: str | None = None
    proxy_url: str | None = None
    namespace: str | None = None
    source: str = ""
    """Where these came from, for the log: the service account, or the kubeconfig's files,
    context and user (never a secret)."""
    # When `token` was read from token_file, or when the exec credential expires (monotonic).
    _token_read_at: float = field(default=0.0, repr=False)
    _token_expires_at: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.exec_plugin is not None:
            self._run_exec_plugin()

    def bearer_token(self, *, now: float | None = None) -> str | None:
        """The token to send now: re-read from its file after a minute, or asked of the exec
        plugin again shortly before it expires."""
        now = time.monotonic() if now is None else now
        stale = now - self._token_read_at >= TOKEN_FILE_REREAD_S
        if self.token_file and (self.token is None or stale):
            self.token = read_token_file(self.token_file)
            self._token_read_at = now
        elif self.exec_plugin is not None and (
            self._token_expires_at is not None
            and now >= self._token_expires_at - EXEC_EXPIRY_MARGIN_S
        ):
            self._run_exec_plugin()
        return self.token

    def refresh(self) -> None:
        """Forget the cached token (the API server answered 401): the next request reads
        the token file again or runs the exec plugin again."""
        if self.token_file:
            self._token_read_at = float("-inf")
        elif self.exec_plugin is not None:
            self._run_exec_plugin()

    def _run_exec_plugin(self) -> None:
        status = run_exec_plugin(self.exec_plugin or {}, self.exec_dir)
        self.token = status.get("token") or self.token
        if status.get("clientCertificateData"):
            self.cert_data = status["clientCertificateData"].encode()
            self.cert_file = None
        if status.get("clientKeyData"):
            self.key_data = status["clientKeyData"].encode()
            self.key_file = None
        expiry = status.get("expirationTimestamp")
        self._token_expires_at = (
            time.monotonic() + (_parse_time(expiry) - time.time()) if expiry else None
        )


def read_token_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from exc


def _parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run_exec_plugin(plugin: dict, workdir: str | None) -> dict:
    """Run a kubeconfig user's exec plugin; -> its ExecCredential's status.

    The plugin is told the API version it must answer in (KUBERNETES_EXEC_INFO, as kubectl
    does) and gets the process's environment plus the kubeconfig's `env` entries."""
    command = plugin.get("command")
    if not command:
        raise ConfigError("the kubeconfig user's exec plugin names no command")
    api_version = plugin.get("apiVersion", "client.authentication.k8s.io/v1")
    env = dict(os.environ)
    env.update({item["name"]: item["value"] for item in plugin.get("env") or []})
    env["KUBERNETES_EXEC_INFO"] = json.dumps(
        {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
    )
    # A command given as a relative path is relative to the kubeconfig, as in kubectl.
    if os.sep in command and not os.path.isabs(command) and workdir:
        command = os.path.join(workdir, command)
    try:
        done = subprocess.run(
            [command, *(plugin.get("args") or [])],
            env=env,
            capture_output=True,
            timeout=EXEC_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"the kubeconfig's exec plugin {command!r} did not run: {exc}") from exc
    if done.returncode != 0:
        # Its stderr says why (not logged in, expired SSO...); its stdout may hold a token.
        reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise ConfigError(
            f"the kubeconfig's exec plugin {command!r} exited with {done.returncode}: {reason[0]}"
        )
    try:
        status = json.loads(done.stdout)["status"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"the kubeconfig's exec plugin {command!r} printed no ExecCredential with a status"
        ) from exc
    return status


def in_cluster(environ: dict[str, str] | None = None) -> Credentials | None:
    """The pod's service account, when this process runs in a pod that has one."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    token_file = SERVICE_ACCOUNT_DIR / "token"
    if not host or not port or not token_file.exists():
        return None
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
    return Credentials(
        server=f"https://{host}:{port}",
        ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        token_file=str(token_file),
        namespace=namespace_file.read_text().strip() if namespace_file.exists() else None,
        source=f"the pod's service account ({SERVICE_ACCOUNT_DIR})",
    )


def kubeconfig_paths(environ: dict[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    listed = env.get("KUBECONFIG")
    if listed:
        return [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def from_kubeconfig(paths: list[Path] | None = None, context: str | None = None) -> Credentials:
    """The current (or named) context's credentials from a kubeconfig, merged over `paths`
    as kubectl merges KUBECONFIG: the first file to set a value wins."""
    paths = kubeconfig_paths() if paths is None else paths
    current: str | None = None
    entries: dict[str, dict[str, tuple[dict, Path]]] = {"clusters": {}, "users": {}, "contexts": {}}
    read_any = False
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the kubeconfig {path}: {exc}") from exc
        read_any = True
        current = current or doc.get("current-context")
        for section, key in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for item in doc.get(section) or []:
                entries[section].setdefault(item["name"], (item.get(key) or {}, path.parent))
    if not read_any:
        raise ConfigError(
            "no credentials: not in a pod with a service account, and no kubeconfig at "
            + os.pathsep.join(str(p) for p in paths)
            + " (set KUBECONFIG)"
        )
    name = context or current
    if not name or name not in entries["contexts"]:
        raise ConfigError(f"kubeconfig context {name!r} not found in {', '.join(map(str, paths))}")
    ctx, _ = entries["contexts"][name]
    cluster, cluster_dir = entries["clusters"].get(ctx.get("cluster"), ({}, None))
    user, user_dir = entries["users"].get(ctx.get("user"), ({}, None))
    if not cluster.get("server"):
        raise ConfigError(f"kubeconfig context {name!r}: its cluster has no server")

    def file(entry: dict, key: str, directory: Path | None) -> str | None:
        value = entry.get(key)
        if not value:
            return None
        value = os.path.expanduser(value)
        return value if os.path.isabs(value) or directory is None else str(directory / value)

    def data(entry: dict, key: str) -> bytes | None:
        value = entry.get(key)
        return base64.b64decode(value) if value else None

    provider: dict[str, Any] = (user.get("auth-provider") or {}).get("config") or {}
    return Credentials(
        server=cluster["server"].rstrip("/"),
        ca_file=file(cluster, "certificate-authority", cluster_dir),
        ca_data=data(cluster, "certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        proxy_url=cluster.get("proxy-url"),
        cert_file=file(user, "client-certificate", user_dir),
        cert_data=data(user, "client-certificate-data"),
        key_file=file(user, "client-key", user_dir),
        key_data=data(user, "client-key-data"),
        token=user.get("token") or provider.get("access-token") or provider.get("id-token"),
        token_file=file(user, "tokenFile", user_dir),
        exec_plugin=user.get("exec"),
        exec_dir=str(user_dir) if user_dir else None,
        namespace=ctx.get("namespace"),
        source=f"kubeconfig {os.pathsep.join(map(str, paths))}, context {name}, "
        f"user {ctx.get('user')}",
    )


def load(kubeconfig: str | os.PathLike | None = None) -> Credentials:
    """The credentials this process should use: the given kubeconfig; else the pod's service
    account when running in a pod; else KUBECONFIG or ~/.kube/config."""
    if kubeconfig is not None:
        return from_kubeconfig([Path(kubeconfig)])
    return in_cluster() or from_kubeconfig()
