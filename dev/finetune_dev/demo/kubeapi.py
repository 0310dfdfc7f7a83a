"""The demo's only Kubernetes API I/O: a small synchronous REST client from a kubeconfig.

The node agent and the demo driver are plain threads and loops, not asyncio, and they
talk to one local API server, so the standard library (urllib + ssl) is enough: no
client library, no event loop. Errors carry the HTTP status so callers can treat 404
as "already gone" and 409 as "already there" or "changed under us".
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ApiError(Exception):
    def __init__(self, message: str, *, code: int | None = None, reason: str = ""):
        super().__init__(message)
        self.code = code
        self.reason = reason


def _material(entry: dict, key: str, base: Path, scratch: Path) -> str | None:
    """A kubeconfig file reference (`key`) or inline data (`key-data`) as a file path."""
    if entry.get(key):
        path = Path(entry[key])
        return str(path if path.is_absolute() else base / path)
    data = entry.get(f"{key}-data")
    if data:
        out = scratch / key
        out.write_bytes(base64.b64decode(data))
        return str(out)
    return None


@dataclass
class KubeAPI:
    server: str
    context: ssl.SSLContext
    token: str | None = None
    timeout: float = 15.0

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> KubeAPI:
        path = Path(path)
        config = yaml.safe_load(path.read_text())
        current = config.get("current-context")
        ctx = next(c["context"] for c in config["contexts"] if c["name"] == current)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == ctx["user"])
        scratch = Path(tempfile.mkdtemp(prefix="ftop-kubeconfig-"))
        ca = _material(cluster, "certificate-authority", path.parent, scratch)
        context = ssl.create_default_context(cafile=ca)
        cert = _material(user, "client-certificate", path.parent, scratch)
        key = _material(user, "client-key", path.parent, scratch)
        if cert and key:
            context.load_cert_chain(cert, key)
        return cls(server=cluster["server"].rstrip("/"), context=context, token=user.get("token"))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict | None = None,
    ) -> Any:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            reason, message = "", detail[:500]
            try:
                status = json.loads(detail)
                reason, message = status.get("reason", ""), status.get("message", message)
            except json.JSONDecodeError:
                pass
            raise ApiError(
                f"{method} {path}: HTTP {exc.code}: {message}", code=exc.code, reason=reason
            ) from None
        except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
            raise ApiError(
                f"{method} {path}: cannot reach the API server at {self.server}: {exc}"
            ) from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **query) -> Any:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str) -> Any | None:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.code == 404:
                return None
            raise

    def create(self, path: str, body: dict) -> Any:
        return self.request("POST", path, body)

    def create_if_absent(self, path: str, body: dict) -> Any | None:
        try:
            return self.create(path, body)
        except ApiError as exc:
            if exc.code == 409:
                return None
            raise

    def merge_patch(self, path: str, body: dict) -> Any:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def strategic_patch(self, path: str, body: dict) -> Any:
        return self.request(
            "PATCH", path, body, content_type="application/strategic-merge-patch+json"
        )

    def delete(self, path: str, body: dict | None = None) -> bool:
        """Delete; False when it was already gone."""
        try:
            self.request("DELETE", path, body)
        except ApiError as exc:
            if exc.code == 404:
                return False
            raise
        return True
