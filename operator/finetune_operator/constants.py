"""Names and paths the operator's builders, reconcilers and handlers agree on, and that only
the operator needs: default images, container names, GPU node labels, where secrets are
mounted.

What the worker or the CRDs must agree on too (labels, file names, reasons) is in
`finetune_api.constants`.
"""

from __future__ import annotations

# Default images; the operator's environment (Helm values) and each spec's `image` win.
DEFAULT_WORKER_IMAGE = "ghcr.io/finetune-dev/finetune-worker:0.1.0"
DEFAULT_SERVING_IMAGE = "vllm/vllm-openai:v0.11.0"
DEFAULT_FETCH_IMAGE = "amazon/aws-cli:2.22.35"
"""Copies s3:// adapters and base models into a server pod before vLLM starts."""

# Container names: the Job's pod failure policy and the status readers find containers by
# them.
WORKER_CONTAINER = "worker"
VLLM_CONTAINER = "vllm"
FETCH_CONTAINER = "fetch"
VERIFY_CONTAINER = "verify-adapters"

# Node labels of NVIDIA's GPU Feature Discovery: pods are placed by them.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
"""In MiB."""
GPU_COMPUTE_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
GPU_COMPUTE_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
"""The GPU's CUDA compute capability, major and minor: what says a node has FP8 tensor cores."""

SERVER_COMPONENT = "adapter-server"
"""`finetune.dev/component` of a vLLM server's objects: the operator watches its pods."""

# Secrets are mounted as files, never passed as environment variables.
SECRETS_DIR = "/var/run/secrets/finetune.dev"
HF_TOKEN_VOLUME = "hf-token"
HF_TOKEN_DIR = f"{SECRETS_DIR}/hf-token"
HF_TOKEN_PATH = f"{HF_TOKEN_DIR}/token"
STORAGE_CREDENTIALS_VOLUME = "storage-credentials"
STORAGE_CREDENTIALS_DIR = f"{SECRETS_DIR}/storage"
