"""The training worker that runs inside FineTuneJob pods: `finetune-worker train | merge`.

Heavy libraries (torch, transformers, peft, trl) are imported inside functions, so the
CLI starts instantly and `--help` works without them.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
