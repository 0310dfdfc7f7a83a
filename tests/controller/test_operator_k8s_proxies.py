"""k8s.py's API client takes proxies from the environment only when the environment names
some: otherwise aiohttp would look up proxy variables and ~/.netrc in a thread for every
request, to find nothing (k8s.trust_environment)."""

from __future__ import annotations

import asyncio

import pytest

from finetune_operator import k8s


@pytest.mark.parametrize(
    "environ, trusted",
    [
        ({}, False),
        ({"HOME": "/home/op", "FINETUNE_NAMESPACES": "a,b"}, False),
        ({"HTTPS_PROXY": "http://proxy:3128"}, True),
        ({"http_proxy": "http://proxy:3128"}, True),
        ({"No_Proxy": "10.0.0.0/8"}, True),
        ({"ALL_PROXY": "socks5://proxy:1080"}, True),
        ({"NETRC": "/etc/op/netrc"}, True),
        ({"HTTPS_PROXY": ""}, False),  # set but empty: asks for nothing
    ],
)
def test_the_environment_is_trusted_only_when_it_names_a_proxy(environ, trusted):
    assert k8s.trust_environment(environ) is trusted


@pytest.mark.parametrize("proxy, trusted", [(None, False), ("http://proxy:3128", True)])
def test_the_shared_client_follows_the_decision(monkeypatch, tmp_path, proxy, trusted):
    for name in [n for n in k8s.os.environ if n.lower().endswith("_proxy") or n == "NETRC"]:
        monkeypatch.delenv(name)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "current-context: c\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {}}]\n"
    )
    monkeypatch.setattr(k8s, "_api", None)

    async def session_trusts_env() -> bool:
        api = await k8s.connect(kubeconfig)
        try:
            return api.session.trust_env
        finally:
            await k8s.close()

    assert asyncio.run(session_trusts_env()) is trusted
