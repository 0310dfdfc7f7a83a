"""Prometheus metrics the operator exports (served by `main.py` on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_BY_PHASE = Gauge(
    "finetune_operator_finetunejobs",
    "FineTuneJobs by phase, as last reconciled",
    ["namespace", "phase"],
)
RECONCILE_SECONDS = Histogram(
    "finetune_operator_reconcile_seconds",
    "Duration of one reconcile pass",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "finetune_operator_reconcile_errors_total", "Reconcile passes that raised", ["kind", "error"]
)
RECONCILE_REQUEUES = Counter(
    "finetune_operator_reconcile_requeues_total",
    "Reconcile passes that failed for now (429, 5xx, a lost connection, repeated write "
    "conflicts) and were scheduled to run again with backoff",
    ["kind", "code"],
)
RECONCILE_FAILURES = Counter(
    "finetune_operator_reconcile_failures_total",
    "Reconcile passes that failed for a reason a prompt retry would not fix; the next event "
    "or resync runs them again",
    ["kind", "error"],
)
API_ERRORS = Counter(
    "finetune_operator_api_errors_total",
    "Kubernetes API calls that returned an error status",
    ["method", "code"],
)
API_REQUESTS = Counter(
    "finetune_operator_api_requests_total",
    "Kubernetes API requests sent (each attempt of a repeated call counts), by method and "
    "resource (plural, /subresource)",
    ["method", "resource"],
)
API_LATENCY = Histogram(
    "finetune_operator_api_request_seconds", "Kubernetes API request latency", ["method"]
)
API_RETRIES = Counter(
    "finetune_operator_api_retries_total", "Reconciles retried after a write conflict", ["kind"]
)
API_TRANSIENT_RETRIES = Counter(
    "finetune_operator_api_transient_retries_total",
    "Kubernetes API calls repeated after a 429, a 5xx or a lost connection",
    ["method", "code"],
)
TRANSITIONS = Counter(
    "finetune_operator_phase_transitions_total", "FineTuneJob phase transitions", ["phase"]
)
