"""The memory planner: predict a fine-tuning run's peak GPU memory and choose how to run it.

Pure core (no I/O, no pydantic, no torch): `arch` (model shapes), `memory` (the peak-memory
model), `gpus` (GPU product names to compute capability), `decide` (method / micro-batch /
checkpointing for a budget). Around it: `configsource` reads config.json files (the only
I/O), `api_adapter` maps a FineTuneJob spec to a plan, `cli` is `finetune-operator plan`.
docs/memory-model.md explains the formulas.
"""

from .arch import (
    PRESETS,
    ModelArch,
    UnknownArchitecture,
    arch_from_config_json,
    arch_from_hints,
    preset,
    preset_names,
)
from .decide import (
    Budget,
    Candidate,
    MethodNotSupported,
    PlanDecision,
    PlanRequest,
    plan_training,
    speed_score,
)
from .memory import (
    DEFAULT_CONSTANTS,
    MemoryConstants,
    MemoryEstimate,
    TrainingShape,
    UnknownTargetModule,
    estimate_memory,
    trainable_params,
)

__all__ = [
    "DEFAULT_CONSTANTS",
    "PRESETS",
    "Budget",
    "Candidate",
    "MemoryConstants",
    "MemoryEstimate",
    "MethodNotSupported",
    "ModelArch",
    "PlanDecision",
    "PlanRequest",
    "TrainingShape",
    "UnknownArchitecture",
    "UnknownTargetModule",
    "arch_from_config_json",
    "arch_from_hints",
    "estimate_memory",
    "plan_training",
    "preset",
    "preset_names",
    "speed_score",
    "trainable_params",
]
