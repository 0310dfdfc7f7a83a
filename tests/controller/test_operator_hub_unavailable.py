"""A Hub that does not answer delays planning; it does not fail the job.

The planner reads an unknown model's config.json from the Hugging Face Hub (HF_ENDPOINT).
A timeout, a dropped connection, 429 or 5xx may pass: the job waits in phase Planning with
`Planned=False, reason HubUnavailable` and the pass runs again with backoff. An answer that
will not change (404, 401, a config that is not JSON) still fails it with
`ModelConfigUnavailable`, as before.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubetest import Kube, bound_pvc, condition, finetunejob_manifest, wait_for

from finetune_operator import requeue
from finetune_operator.planner.arch import HubUnavailable, UnknownArchitecture
from finetune_operator.planner.configsource import arch_for_model, fetch_hub_config
from finetune_operator.planning import PlanningFailed

CONFIG = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


class FlakyHub:
    """A local Hub: answers `failures` times with `status`, then serves config.json."""

    def __init__(self, failures: int, status: int = 503):
        self.failures, self.status, self.requests = failures, status, 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests += 1
                if hub.requests <= hub.failures:
                    self.send_response(hub.status)
                    self.end_headers()
                    return
                body = json.dumps(CONFIG).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hub_env(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return monkeypatch


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_passing_hub_error_is_hub_unavailable(hub_env, status):
    hub = FlakyHub(failures=1, status=status)
    try:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(HubUnavailable, match=str(status)):
            fetch_hub_config("acme/flaky")
        assert fetch_hub_config("acme/flaky")["hidden_size"] == 2048  # and then it answers
    finally:
        hub.close()


def test_a_hub_that_is_not_there_is_hub_unavailable_and_a_404_is_not(hub_env):
    hub = FlakyHub(failures=1, status=404)
    try:
        hub_env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(UnknownArchitecture) as caught:
            arch_for_model({"name": "acme/missing"}, allow_hub=True)
        assert not isinstance(caught.value, HubUnavailable)
    finally:
        hub.close()
    hub_env.setenv("HF_ENDPOINT", hub.url)  # closed: nothing listens there any more
    with pytest.raises(HubUnavailable, match="spec.model.architecture"):
        arch_for_model({"name": "acme/flaky"}, allow_hub=True)


def test_only_a_transient_planning_failure_is_run_again():
    assert requeue.retry_reason(PlanningFailed("HubUnavailable", "x", transient=True)) == (
        "upstream",
        None,
    )
    assert requeue.retry_reason(PlanningFailed("ModelConfigUnavailable", "x")) is None


@pytest.mark.cluster
def test_a_job_waits_for_the_hub_and_is_planned_when_it_answers(
    cluster, crds, kube: Kube, tmp_path
):
    """An operator of its own, allowed to use a local Hub that fails 3 times first."""
    from operator_harness import OperatorProcess

    hub = FlakyHub(failures=3, status=503)
    proc = OperatorProcess(
        cluster,
        tmp_path,
        namespaces=kube.namespace,
        extra_env={
            "FINETUNE_ALLOW_HUB": "true",
            "HF_ENDPOINT": hub.url,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        },
    )
    proc.start()
    try:
        bound_pvc(kube, "data")
        bound_pvc(kube, "adapters")
        kube.apply(
            finetunejob_manifest("flaky-hub", model={"name": "acme/flaky-1b"}, memory="24Gi")
        )
        waiting = wait_for(
            lambda: (
                (c := condition(kube.get("finetunejob", "flaky-hub"), "Planned"))
                and c["reason"] == "HubUnavailable"
                and kube.get("finetunejob", "flaky-hub")
            ),
            timeout=60,
            what="Planned=False, HubUnavailable",
        )
        assert waiting["status"]["phase"] == "Planning"
        assert "503" in condition(waiting, "Planned")["message"]
        planned = wait_for(
            lambda: (
                (o := kube.get("finetunejob", "flaky-hub"))
                and (c := condition(o, "Planned"))
                and c["status"] == "True"
                and o
            ),
            timeout=90,
            what="Planned=True once the Hub answers",
        )
        assert planned["status"]["phase"] != "Failed"
        wait_for(lambda: kube.get_or_none("job", "flaky-hub-train"), what="the training Job")
        assert hub.requests >= 4
    finally:
        proc.stop()
        hub.close()
