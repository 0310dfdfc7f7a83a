"""Shared fixtures: one real control plane per test session, a namespace per test."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from kubetest import Kube

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real etcd + kube-apiserver + controller-manager + scheduler + kwok.

    Built from Go modules on first use (cached); if that is impossible the session
    fails with the reason: there is no silent skip.
    """
    from finetune_operator.devcluster import controlplane

    directory = tmp_path_factory.mktemp("cluster")
    c = controlplane.up(directory)
    yield c
    controlplane.down(directory, quiet=True)


@pytest.fixture
def namespace(cluster, request) -> str:
    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:5]}"
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    Kube(cluster).kubectl("create", "namespace", name, namespaced=False)
    yield name
    Kube(cluster).kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found",
                          namespaced=False, check=False)


@pytest.fixture
def kube(cluster, namespace) -> Kube:
    return Kube(cluster, namespace)


@pytest.fixture(scope="session")
def admin_kube(cluster) -> Kube:
    return Kube(cluster, "default")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
