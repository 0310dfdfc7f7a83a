"""The operator's credentials (kubeconfig.py) and its API client (k8s.Client): a kubeconfig
read as kubectl reads it, a service-account token re-read when it rotates, an exec plugin
run again when its credential expires, and against the real control plane a revoked token
replaced by the rotated one on the 401, with no request lost."""

from __future__ import annotations

import asyncio
import base64
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kubetest import Kube

from finetune_operator import k8s, kubeconfig


def write_kubeconfig(path: Path, user: dict, cluster: dict | None = None) -> Path:
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [{"name": "k", "cluster": cluster or {"server": "https://k:6443"}}],
                "users": [{"name": "u", "user": user}],
            }
        )
    )
    return path


def test_files_are_relative_to_the_kubeconfig_and_the_first_file_wins(tmp_path):
    (tmp_path / "team").mkdir()
    first = write_kubeconfig(
        tmp_path / "team" / "config",
        {"client-certificate": "certs/me.crt", "client-key": "~/me.key"},
        {"server": "https://first:6443/", "certificate-authority": "ca.crt"},
    )
    second = tmp_path / "other"
    second.write_text(
        "current-context: elsewhere\n"
        "contexts: [{name: c, context: {cluster: k, user: u, namespace: ns}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://second:6443'}}]\n"
    )
    creds = kubeconfig.from_kubeconfig([tmp_path / "absent", first, second])
    assert creds.server == "https://first:6443"
    assert creds.ca_file == str(tmp_path / "team" / "ca.crt")
    assert creds.cert_file == str(tmp_path / "team" / "certs" / "me.crt")
    assert creds.key_file == str(Path("~/me.key").expanduser())
    assert creds.namespace is None  # the first file's context, not the second's
    assert creds.source.endswith("context c, user u")  # what the operator logs

    with pytest.raises(kubeconfig.ConfigError, match="'elsewhere' not found"):
        kubeconfig.from_kubeconfig([second])
    with pytest.raises(kubeconfig.ConfigError, match="no kubeconfig at .*absent"):
        kubeconfig.from_kubeconfig([tmp_path / "absent"])


def test_inline_data_is_decoded(tmp_path):
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    encoded = base64.b64encode(pem).decode()
    creds = kubeconfig.from_kubeconfig(
        [
            write_kubeconfig(
                tmp_path / "config",
                {"client-certificate-data": encoded, "token": "t0"},
                {"server": "https://k:6443", "certificate-authority-data": encoded},
            )
        ]
    )
    assert creds.ca_data == pem and creds.cert_data == pem and creds.ca_file is None
    assert creds.bearer_token() == "t0"


def test_a_token_file_is_read_again_after_a_minute_or_after_a_401(tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    creds = kubeconfig.Credentials(server="https://k", token_file=str(token))
    assert creds.bearer_token(now=1000.0) == "first"
    token.write_text("rotated\n")
    assert creds.bearer_token(now=1000.0 + kubeconfig.TOKEN_FILE_REREAD_S - 1) == "first"
    assert creds.bearer_token(now=1000.0 + kubeconfig.TOKEN_FILE_REREAD_S) == "rotated"
    token.write_text("again\n")
    creds.refresh()
    assert creds.bearer_token(now=1000.0 + kubeconfig.TOKEN_FILE_REREAD_S) == "again"


def test_the_service_account_of_a_pod(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("team-a\n")
    monkeypatch.setattr(kubeconfig, "SERVICE_ACCOUNT_DIR", tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    creds = kubeconfig.in_cluster(env)
    assert creds is not None
    assert creds.server == "https://[fd00::1]:443"
    assert creds.ca_file == str(tmp_path / "ca.crt") and creds.namespace == "team-a"
    assert creds.bearer_token() == "sa-token"
    assert kubeconfig.in_cluster({}) is None  # not in a pod: the kubeconfig is used


def exec_plugin(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "plugin.py"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def test_an_exec_plugin_is_run_as_kubectl_runs_it_and_again_when_it_expires(tmp_path):
    calls = tmp_path / "calls"
    exec_plugin(
        tmp_path,
        f"""
        import json, os, pathlib
        calls = pathlib.Path({str(calls)!r})
        n = len(calls.read_text()) if calls.exists() else 0
        calls.write_text("x" * (n + 1))
        info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
        print(json.dumps({{
            "apiVersion": info["apiVersion"], "kind": "ExecCredential",
            "status": {{"token": os.environ["PREFIX"] + str(n),
                       "expirationTimestamp": "2000-01-01T00:00:00Z" if n == 0 else None}},
        }}))
        """,
    )
    config = write_kubeconfig(
        tmp_path / "config",
        {
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": "./plugin.py",  # relative to the kubeconfig, as in kubectl
                "env": [{"name": "PREFIX", "value": "tok-"}],
            }
        },
    )
    creds = kubeconfig.from_kubeconfig([config])
    assert creds.token == "tok-0"
    # The first credential expired long ago: the plugin runs again; the second never expires.
    assert creds.bearer_token() == "tok-1"
    assert creds.bearer_token() == "tok-1"
    assert calls.read_text() == "xx"


def test_a_failing_exec_plugin_says_why(tmp_path):
    exec_plugin(tmp_path, 'import sys\nsys.exit("error: SSO session expired; run login")\n')
    config = write_kubeconfig(tmp_path / "config", {"exec": {"command": "./plugin.py"}})
    with pytest.raises(kubeconfig.ConfigError, match="exited with 1: error: SSO session expired"):
        kubeconfig.from_kubeconfig([config])


def service_account_token(kube: Kube, account: str, bound_secret: str) -> str:
    """A token of `account` bound to the Secret `bound_secret`: deleting the Secret revokes it."""
    kube.kubectl("create", "secret", "generic", bound_secret)
    return kube.kubectl(
        "create",
        "token",
        account,
        "--bound-object-kind=Secret",
        f"--bound-object-name={bound_secret}",
    ).stdout.strip()


def test_a_revoked_token_is_replaced_by_the_rotated_one_on_the_401(cluster, kube: Kube, tmp_path):
    import yaml

    kube.kubectl("create", "serviceaccount", "reader")
    kube.kubectl(
        "create",
        "rolebinding",
        "reader",
        "--clusterrole=view",
        f"--serviceaccount={kube.namespace}:reader",
    )
    token_file = tmp_path / "token"
    token_file.write_text(service_account_token(kube, "reader", "token-1"))
    admin = yaml.safe_load(Path(kube.kubeconfig).read_text())
    config = write_kubeconfig(
        tmp_path / "config", {"tokenFile": str(token_file)}, admin["clusters"][0]["cluster"]
    )

    async def refused(token: str) -> bool:
        """Whether the API server now answers `token` with 401 (it caches a token's review
        for a few seconds, so a revocation takes effect a little later)."""
        probe = k8s.Client(
            kubeconfig.Credentials(server=creds.server, ca_file=creds.ca_file, token=token)
        )
        try:
            await probe.request("GET", k8s.path("v1", "ConfigMap", kube.namespace))
            return False
        except k8s.ApiError as exc:
            return exc.status == 401
        finally:
            await probe.close()

    async def until_refused(token: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await refused(token):
            assert time.monotonic() < deadline, "the revoked token is still accepted"
            await asyncio.sleep(0.5)

    creds = kubeconfig.from_kubeconfig([config])

    async def scenario() -> list[str]:
        api = await k8s.connect(config)
        try:
            kube.kubectl("create", "configmap", "probe", "--from-literal=k=v")
            names = [
                md["name"] for md in await k8s.list_metadata("v1", "ConfigMap", kube.namespace)
            ]
            first = api.credentials.token
            # The kubelet rotates the file; then the old token is revoked, well before the
            # client's next scheduled read of the file.
            token_file.write_text(service_account_token(kube, "reader", "token-2"))
            kube.kubectl("delete", "secret", "token-1", "--wait=true")
            await until_refused(first)
            got = await k8s.get("v1", "ConfigMap", kube.namespace, "probe")
            assert got is not None and got["data"] == {"k": "v"}
            assert api.credentials.token not in (None, first)  # read again on the 401
            # A request the token does not allow is refused as such, not retried as a 401.
            with pytest.raises(k8s.ApiError) as forbidden:
                await k8s.list_objects("v1", "Secret", kube.namespace)
            assert forbidden.value.status == 403 and "reader" in forbidden.value.body
            return names
        finally:
            await k8s.close()

    assert "probe" in asyncio.run(scenario())
