"""The shape of a base model, as far as memory is concerned.

A `ModelArch` is read from a transformers `config.json` (already parsed: this module does no
I/O), from the `spec.model.architecture` hints of a FineTuneJob, or from a built-in preset for
the common families. Everything the memory model needs derives from it: parameter counts,
the linear projections LoRA can adapt (name, input and output width) and which of them
bitsandbytes quantises for QLoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


class UnknownArchitecture(ValueError):
    """The planner cannot tell the model's shape, so it cannot predict its memory."""


class HubUnavailable(UnknownArchitecture):
    """The Hub did not answer (no connection, a timeout, 429 or 5xx): the same request may
    succeed later, so a job that needs it waits instead of failing."""


# Families whose decoder block is Llama-like: separate q/k/v/o projections and a gated MLP
# with gate/up/down projections. Their memory behaves alike; the differences that matter
# (norms per block, fused projections, head_dim != hidden/heads) are carried by ModelArch.
LLAMA_LIKE = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "granite",
    "olmo",
    "olmo2",
    "cohere",
    "starcoder2",
    "internlm2",
    "mixtral",
}
FUSED_PROJECTIONS = {"phi3"}  # qkv_proj and gate_up_proj are single Linear layers
QKV_BIAS = {"qwen2"}
FOUR_NORMS = {"gemma2", "gemma3_text"}  # pre- and post-norm around attention and MLP


@dataclass(frozen=True)
class ModelArch:
    """Decoder-only transformer shape (one entry per config.json field that costs memory)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    model_type: str = "llama"
    qkv_bias: bool = False
    fused_projections: bool = False
    norms_per_layer: int = 2

    def __post_init__(self) -> None:
        for field_name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
        ):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise UnknownArchitecture(
                    f"model {self.name!r}: {field_name} is {value!r}; expected a positive integer"
                )

    # -- widths --------------------------------------------------------------------------
    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_width

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_width

    def projections(self) -> dict[str, tuple[int, int]]:
        """Linear projections of one decoder block: name -> (in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.fused_projections:
            return {
                "qkv_proj": (h, self.q_dim + 2 * self.kv_dim),
                "o_proj": (self.q_dim, h),
                "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h),
            }
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    # -- parameter counts ----------------------------------------------------------------
    def layer_linear_params(self) -> int:
        """Weights of one block's linear projections (what QLoRA quantises)."""
        return sum(fan_in * fan_out for fan_in, fan_out in self.projections().values())

    def layer_other_params(self) -> int:
        """Norm weights and biases of one block (never quantised)."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.norms_per_layer * self.hidden_size + bias

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """0 when tied: the output head reuses the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def quantizable_params(self) -> int:
        return self.num_layers * self.layer_linear_params()

    def unquantized_params(self) -> int:
        """Embeddings, lm_head, norms and biases: kept in 16 bits under QLoRA."""
        return (
            self.embedding_params()
            + self.lm_head_params()
            + self.num_layers * self.layer_other_params()
            + self.hidden_size
        )

    def total_params(self) -> int:
        return self.quantizable_params() + self.unquantized_params()

    def with_name(self, name: str) -> ModelArch:
        return replace(self, name=name)


def _family_traits(model_type: str) -> dict[str, Any]:
    return {
        "fused_projections": model_type in FUSED_PROJECTIONS,
        "qkv_bias": model_type in QKV_BIAS,
        "norms_per_layer": 4 if model_type in FOUR_NORMS else 2,
    }


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def arch_from_config_json(config: Mapping[str, Any], name: str | None = None) -> ModelArch:
    """Build a ModelArch from a parsed transformers config.json.

    Multimodal configs that nest the language model under `text_config` are unwrapped.
    Raises UnknownArchitecture naming the missing fields.
    """
    if isinstance(config.get("text_config"), Mapping) and "hidden_size" not in config:
        config = {
            **config["text_config"],
            "model_type": config["text_config"].get("model_type", config.get("model_type")),
        }
    model_type = str(config.get("model_type") or "llama")
    fields = {
        "hidden_size": _first(config, "hidden_size", "n_embd", "d_model"),
        "intermediate_size": _first(config, "intermediate_size", "ffn_dim", "n_inner"),
        "num_layers": _first(config, "num_hidden_layers", "n_layer", "num_layers"),
        "num_heads": _first(config, "num_attention_heads", "n_head"),
        "vocab_size": _first(config, "vocab_size"),
    }
    missing = [key for key, value in fields.items() if value is None]
    label = name or config.get("_name_or_path") or model_type
    if missing:
        raise UnknownArchitecture(
            f"config.json of {label!r} lacks {', '.join(missing)}; the planner needs the hidden "
            "size, intermediate size, layer count, attention heads and vocabulary. Set "
            "spec.model.architecture (hiddenSize, intermediateSize, numHiddenLayers, "
            "numAttentionHeads, numKeyValueHeads, vocabSize, tieWordEmbeddings) to plan anyway."
        )
    kv = _first(config, "num_key_value_heads") or fields["num_heads"]
    return ModelArch(
        name=str(label),
        num_kv_heads=int(kv),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
        model_type=model_type,
        **{key: int(value) for key, value in fields.items()},
        **_family_traits(model_type),
    )


HINT_FIELDS = (
    "hiddenSize",
    "intermediateSize",
    "numHiddenLayers",
    "numAttentionHeads",
    "vocabSize",
)


def arch_from_hints(hints: Mapping[str, Any] | Any, name: str) -> ModelArch:
    """Build a ModelArch from `spec.model.architecture` (a dict or the pydantic model).

    Accepts snake_case (pydantic attributes) or camelCase (CRD) names. numKeyValueHeads
    defaults to numAttentionHeads (no grouped-query attention) and tieWordEmbeddings to false.
    """

    def get(snake: str, camel: str) -> Any:
        if isinstance(hints, Mapping):
            return hints.get(camel, hints.get(snake))
        return getattr(hints, snake, None)

    values = {
        "hidden_size": get("hidden_size", "hiddenSize"),
        "intermediate_size": get("intermediate_size", "intermediateSize"),
        "num_layers": get("num_hidden_layers", "numHiddenLayers"),
        "num_heads": get("num_attention_heads", "numAttentionHeads"),
        "vocab_size": get("vocab_size", "vocabSize"),
    }
    missing = [
        camel for camel, value in zip(HINT_FIELDS, values.values(), strict=True) if value is None
    ]
    if missing:
        raise UnknownArchitecture(
            f"spec.model.architecture for {name!r} is missing {', '.join(missing)}; the planner "
            f"needs all of {', '.join(HINT_FIELDS)} (numKeyValueHeads and tieWordEmbeddings "
            "are optional) when the model's config.json cannot be read."
        )
    model_type = str(get("model_type", "modelType") or "llama")
    kv = get("num_key_value_heads", "numKeyValueHeads") or values["num_heads"]
    return ModelArch(
        name=name,
        num_kv_heads=int(kv),
        tie_word_embeddings=bool(get("tie_word_embeddings", "tieWordEmbeddings") or False),
        model_type=model_type,
        **{key: int(value) for key, value in values.items()},
        **_family_traits(model_type),
    )


def _preset(
    name: str,
    model_type: str,
    h: int,
    i: int,
    layers: int,
    heads: int,
    kv: int,
    vocab: int,
    tied: bool = False,
    head_dim: int | None = None,
) -> ModelArch:
    return ModelArch(
        name=name,
        hidden_size=h,
        intermediate_size=i,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        head_dim=head_dim,
        model_type=model_type,
        **_family_traits(model_type),
    )


# Shapes copied from the families' published config.json files. Keys are lower-case hub ids;
# several ids share one shape (base and instruct, 3 and 3.1).
_LLAMA3_8B = _preset("llama-3-8b", "llama", 4096, 14336, 32, 32, 8, 128256)
_LLAMA3_70B = _preset("llama-3-70b", "llama", 8192, 28672, 80, 64, 8, 128256)
_LLAMA32_1B = _preset("llama-3.2-1b", "llama", 2048, 8192, 16, 32, 8, 128256, True)
_LLAMA32_3B = _preset("llama-3.2-3b", "llama", 3072, 8192, 28, 24, 8, 128256, True)
_MISTRAL_7B = _preset("mistral-7b", "mistral", 4096, 14336, 32, 32, 8, 32000)
_MISTRAL_7B_V03 = _preset("mistral-7b-v0.3", "mistral", 4096, 14336, 32, 32, 8, 32768)
_QWEN25_7B = _preset("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 152064)
_QWEN25_14B = _preset("qwen2.5-14b", "qwen2", 5120, 13824, 48, 40, 8, 152064)
_QWEN25_32B = _preset("qwen2.5-32b", "qwen2", 5120, 27648, 64, 40, 8, 152064)
_QWEN25_72B = _preset("qwen2.5-72b", "qwen2", 8192, 29568, 80, 64, 8, 152064)
_GEMMA2_9B = _preset("gemma-2-9b", "gemma2", 3584, 14336, 42, 16, 8, 256000, True, 256)
_GEMMA2_27B = _preset("gemma-2-27b", "gemma2", 4608, 36864, 46, 32, 16, 256000, True, 128)
_PHI3_MINI = _preset("phi-3-mini", "phi3", 3072, 8192, 32, 32, 32, 32064)
_PHI3_MEDIUM = _preset("phi-3-medium", "phi3", 5120, 17920, 40, 40, 10, 32064)

PRESETS: dict[str, ModelArch] = {}
_PRESET_NAMES: list[str] = []


def _register(arch: ModelArch, *hub_ids: str) -> None:
    PRESETS[arch.name] = arch
    _PRESET_NAMES.append(arch.name)
    for hub_id in hub_ids:
        PRESETS[hub_id.lower()] = arch.with_name(hub_id)


_register(
    _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3-8B-Instruct",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Meta-Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
)
_register(
    _LLAMA3_70B,
    "meta-llama/Meta-Llama-3-70B",
    "meta-llama/Meta-Llama-3-70B-Instruct",
    "meta-llama/Llama-3.1-70B",
    "meta-llama/Llama-3.1-70B-Instruct",
    "meta-llama/Meta-Llama-3.1-70B",
    "meta-llama/Meta-Llama-3.1-70B-Instruct",
)
_register(_LLAMA32_1B, "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct")
_register(_LLAMA32_3B, "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct")
_register(
    _MISTRAL_7B,
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.2",
)
_register(_MISTRAL_7B_V03, "mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3")
_register(_QWEN25_7B, "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct")
_register(_QWEN25_14B, "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct")
_register(_QWEN25_32B, "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct")
_register(_QWEN25_72B, "Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct")
_register(_GEMMA2_9B, "google/gemma-2-9b", "google/gemma-2-9b-it")
_register(_GEMMA2_27B, "google/gemma-2-27b", "google/gemma-2-27b-it")
_register(_PHI3_MINI, "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-128k-instruct")
_register(
    _PHI3_MEDIUM, "microsoft/Phi-3-medium-4k-instruct", "microsoft/Phi-3-medium-128k-instruct"
)


def preset(name: str) -> ModelArch | None:
    """The built-in shape for a hub id or preset name (case-insensitive), or None."""
    return PRESETS.get(name.strip().lower().removeprefix("hf://"))


def preset_names() -> list[str]:
    return list(_PRESET_NAMES)
