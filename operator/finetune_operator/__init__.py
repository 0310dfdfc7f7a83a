"""finetune-operator: plans and runs LoRA / QLoRA fine-tuning on Kubernetes."""

__version__ = "0.1.0"
