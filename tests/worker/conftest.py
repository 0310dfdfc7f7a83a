"""Fixtures of the worker's tests: the tiny model (made once per session) and a valid
WorkerConfig for it (tests/support/worker_configs.py)."""

from worker_configs import tiny_model_root, worker_config  # noqa: F401  (fixtures)
