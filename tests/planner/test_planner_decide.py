"""The planner's decision: method, micro-batch and checkpointing for a memory budget."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from finetune_operator.planner import (
    Budget,
    MethodNotSupported,
    PlanRequest,
    plan_training,
    preset,
)
from finetune_operator.planner.api_adapter import (
    NoFittingPlan,
    gpu_nodes_for_spec,
    needs_gpu_nodes,
    plan_for_spec,
    request_from_spec,
)
from finetune_operator.planner.gpus import NodeFp8
from finetune_operator.planner.memory import GiB, MiB

LLAMA3_8B = preset("meta-llama/Meta-Llama-3-8B")
REQUEST = PlanRequest(seq_len=2048, batch_size=16, packing=True)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def plan(memory_gib: float, request: PlanRequest = REQUEST, gpus: int = 1):
    return plan_training(LLAMA3_8B, request, Budget(int(memory_gib * GiB), gpu_count=gpus))


def test_large_budget_chooses_bf16_lora_without_checkpointing_and_a_big_micro_batch():
    decision = plan(80)
    assert decision.fits
    assert (decision.method, decision.gradient_checkpointing) == ("lora", False)
    assert decision.micro_batch >= 4
    assert decision.micro_batch * decision.gradient_accumulation == 16
    assert decision.estimate.with_context <= decision.budget.usable_bytes


def test_24gi_prefers_lora_with_checkpointing_over_any_qlora():
    # The H200 probe: at 24 GiB LoRA with checkpointing (8,185 tokens/s) beats every QLoRA
    # configuration that fits.
    decision = plan(24)
    assert (decision.method, decision.gradient_checkpointing) == ("lora", True)
    assert "Fastest of" in decision.reason


def test_a_large_micro_batch_with_checkpointing_beats_a_small_one_without():
    # Measured on the H200 (bench/data/speed-grid-h200.jsonl, dropout 0.05): Llama-3-8B
    # at 2,048 tokens without checkpointing 8,094 tokens/s, at 8,192 with it 10,700; the
    # product path at 40 GiB, seq 1024, batch 64 had picked the former (7,566 vs 9,867).
    request = PlanRequest(
        seq_len=1024, batch_size=64, packing=True, lora_dropout=0.05, method="lora"
    )
    decision = plan(40, request)
    assert decision.gradient_checkpointing is True
    assert decision.micro_batch * 1024 >= 4096
    # Llama-3.2-1B at 8 GiB, seq 2048, batch 32: the small model is host-bound far longer
    # (2,048 tokens without checkpointing 18,928 tokens/s; 16,384 with it 53,596).
    small = plan_training(
        preset("meta-llama/Llama-3.2-1B"),
        PlanRequest(seq_len=2048, batch_size=32, packing=True),
        Budget(8 * GiB),
    )
    assert (small.method, small.gradient_checkpointing, small.micro_batch) == ("lora", True, 8)


def test_a_budget_between_no_and_full_checkpointing_is_filled_by_recomputing_some_layers():
    # Llama-3-8B, packed seq 2048: at 36 GiB no micro-batch of 4,096 tokens or more fits
    # without checkpointing (43 GiB), and full checkpointing leaves 10 GiB unused. In between,
    # the planner recomputes only as many layers as it must, which the speed model predicts
    # faster than recomputing all.
    request = PlanRequest(seq_len=2048, batch_size=16, packing=True, method="lora")
    decision = plan(36, request)
    chosen = decision.chosen.shape
    assert chosen.gradient_checkpointing and 0 < chosen.checkpointed_layers < 32
    assert decision.estimate.with_context <= decision.budget.usable_bytes
    full = [
        c
        for c in decision.candidates
        if c.fits and c.shape.gradient_checkpointing and c.shape.checkpointed_layers is None
    ]
    assert decision.chosen.speed > max(c.speed for c in full)
    assert f"checkpointing of {chosen.checkpointed_layers} layers" in decision.reason
    # Told "on", every layer is recomputed; told "off", none.
    on = plan(36, PlanRequest(seq_len=2048, batch_size=16, gradient_checkpointing=True))
    assert on.chosen.shape.checkpointed_layers is None
    assert all(c.shape.checkpointed_layers is None for c in on.candidates)
    spec = _llama_spec(
        **{"resources.gpu.memory": "36Gi", "training.batchSize": 16, "method": "lora"}
    )
    spec_plan = plan_for_spec(spec, LLAMA3_8B)
    assert spec_plan.gradient_checkpointing and 0 < spec_plan.checkpointed_layers < 32


def test_12gi_falls_back_to_qlora():
    decision = plan(12)
    assert decision.fits and decision.method == "qlora"
    assert decision.gradient_checkpointing is True
    assert decision.estimate.with_context <= decision.budget.usable_bytes
    assert all(not c.fits for c in decision.candidates if c.shape.method == "lora")


def test_nothing_fits_reports_the_smallest_memory_that_works():
    decision = plan(6)
    assert not decision.fits and decision.chosen is None
    needed = decision.minimum_budget_bytes
    assert 6 * GiB < needed < 12 * GiB
    assert f"at least {needed / GiB:.1f}Gi" in decision.reason
    assert "spec.resources.gpu.memory" in decision.reason
    # The minimum really is enough, and 0.2 GiB less is not.
    assert plan(needed / GiB).fits
    assert not plan(needed / GiB - 0.2).fits


def test_forced_lora_checks_fit_and_chooses_micro_batch_and_checkpointing():
    forced = PlanRequest(method="lora", seq_len=2048, batch_size=16, packing=True)
    decision = plan(12, forced)
    assert not decision.fits
    assert "method qlora" in decision.reason
    decision = plan(40, forced)
    assert decision.method == "lora" and decision.fits


def test_forced_qlora_on_a_large_gpu_stays_qlora():
    decision = plan(80, PlanRequest(method="qlora", seq_len=2048, batch_size=16, packing=True))
    assert decision.method == "qlora"
    assert decision.gradient_checkpointing is False  # 80 GiB holds QLoRA's activations


def test_fixed_micro_batch_and_checkpointing_are_respected():
    decision = plan(
        80, PlanRequest(seq_len=2048, batch_size=16, micro_batch=2, gradient_checkpointing=True)
    )
    assert decision.micro_batch == 2 and decision.gradient_checkpointing is True
    assert decision.gradient_accumulation == 8


def test_effective_batch_is_kept_across_gpus_and_rounding_is_reported():
    decision = plan(80, PlanRequest(seq_len=512, batch_size=16), gpus=2)
    assert decision.micro_batch * decision.gradient_accumulation * 2 == 16
    assert "data-parallel (DDP)" in decision.reason
    odd = plan(80, PlanRequest(seq_len=512, batch_size=10, micro_batch=4, packing=True))
    assert odd.gradient_accumulation == 3
    assert "rounded from 10 to 12" in odd.reason
    # Unpacked, a step is its whole examples split into rows of the micro-batch's budget:
    # the batch stays exact and accumulation is the most rows a step can need.
    exact = plan(80, PlanRequest(seq_len=512, batch_size=10, micro_batch=4))
    assert exact.gradient_accumulation == 3 and exact.chosen.effective_batch == 10
    assert "rounded" not in exact.reason and "10 examples per step" in exact.reason


def test_micro_batch_is_capped_near_16k_tokens():
    decision = plan(
        141, PlanRequest(method="qlora", seq_len=512, batch_size=256, gradient_checkpointing=True)
    )
    assert decision.micro_batch * 512 <= 16384


def test_safety_margin_is_five_percent_or_half_a_gib():
    assert Budget(80 * GiB).margin_bytes == 4 * GiB
    assert Budget(8 * GiB).margin_bytes == 512 * MiB
    assert Budget(8 * GiB).required_for(7 * GiB) >= 7 * GiB + 512 * MiB


# --- the API adapter ---------------------------------------------------------------------


def load_spec(name: str, **overrides):
    from finetune_api import FineTuneJob

    manifest = yaml.safe_load((EXAMPLES / name).read_text())
    for dotted, value in overrides.items():
        node = manifest["spec"]
        *path, leaf = dotted.split(".")
        for key in path:
            node = node[key]
        node[leaf] = value
    return FineTuneJob.model_validate(manifest).spec


def test_plan_for_spec_fills_status_plan():
    from finetune_api import TrainingPlan, to_k8s

    spec = load_spec("finetunejob-llama3-8b.yaml")
    request, budget = request_from_spec(spec)
    assert budget.gpu_memory_bytes == 24 * GiB and request.packing
    plan_ = plan_for_spec(spec, LLAMA3_8B)
    assert isinstance(plan_, TrainingPlan)
    assert plan_.method == "lora" and plan_.gradient_checkpointing
    assert plan_.micro_batch_size * plan_.gradient_accumulation == spec.training.batch_size
    assert plan_.trainable_params == 41_943_040
    parts = plan_.breakdown
    assert (
        parts.base_weights
        + parts.adapter_weights
        + parts.gradients
        + parts.optimizer_state
        + parts.activations
        + parts.overhead
    ) == plan_.estimated_peak_bytes
    assert plan_.estimated_peak_bytes <= 24 * GiB
    assert to_k8s(plan_)["reason"] == plan_.reason


def test_plan_for_spec_raises_with_minimum_memory_when_nothing_fits():
    spec = load_spec("finetunejob-llama3-8b.yaml", **{"resources.gpu.memory": "6Gi"})
    with pytest.raises(NoFittingPlan) as caught:
        plan_for_spec(spec, LLAMA3_8B)
    assert caught.value.minimum_budget_bytes > 6 * GiB
    assert "must be at least" in str(caught.value)


# --- several GPUs: DDP when a replica fits, FSDP when it does not ---------------------------

LLAMA3_70B = preset("meta-llama/Meta-Llama-3-70B")


def test_one_gpu_is_a_single_process_and_several_are_ddp_when_a_replica_fits():
    single = plan(80, PlanRequest(seq_len=512, batch_size=16))
    assert single.chosen.strategy == "single"
    assert {c.shape.strategy for c in single.candidates} == {"single"}
    ddp = plan(80, PlanRequest(seq_len=512, batch_size=16), gpus=4)
    assert ddp.chosen.strategy == "ddp"
    assert ddp.micro_batch * ddp.gradient_accumulation * 4 == 16
    # the replica is whole on every GPU, plus DDP's gradient buckets
    same_shape = single.chosen.shape.but(gpu_count=4, strategy="ddp")
    from finetune_operator.planner.memory import estimate_memory

    assert (
        estimate_memory(LLAMA3_8B, same_shape).breakdown["gradients"]
        == 2 * single.chosen.estimate.breakdown["gradients"]
    )


def test_70b_qlora_on_two_40gi_gpus_is_sharded_because_no_replica_fits():
    request = PlanRequest(seq_len=2048, batch_size=16, packing=True, method="qlora")
    decision = plan_training(LLAMA3_70B, request, Budget(40 * GiB, gpu_count=2))
    assert decision.fits and decision.chosen.strategy == "fsdp"
    assert not any(c.fits for c in decision.candidates if c.shape.strategy == "ddp")
    assert "no data-parallel configuration fits" in decision.reason
    assert "not yet measured across GPUs" in decision.reason  # what is uncalibrated is said
    # Sharding divides the persistent terms by the world size; what is gathered stays whole.
    chosen = decision.chosen.estimate
    replica = next(
        c
        for c in decision.candidates
        if c.shape.strategy == "ddp"
        and c.shape.micro_batch == decision.micro_batch
        and c.shape.gradient_checkpointing == decision.gradient_checkpointing
        and c.shape.checkpointed_layers == decision.chosen.shape.checkpointed_layers
    )
    gathered = chosen.details["fsdp_gathered_bytes"]
    assert chosen.breakdown["weights"] == pytest.approx(
        replica.estimate.breakdown["weights"] / 2 + gathered, rel=1e-6
    )
    assert chosen.breakdown["optimizer_state"] == pytest.approx(
        replica.estimate.breakdown["optimizer_state"] / 2, rel=1e-3
    )
    assert chosen.breakdown["activations"] == replica.estimate.breakdown["activations"]
    # Two 24 GiB cards cannot hold it even sharded (no CPU offload): the answer says what would.
    small = plan_training(LLAMA3_70B, request, Budget(24 * GiB, gpu_count=2))
    assert not small.fits and "FSDP" in small.reason
    assert 24 * GiB < small.minimum_budget_bytes < 40 * GiB


def test_fsdp_loses_to_ddp_whenever_ddp_fits():
    decision = plan(80, PlanRequest(seq_len=1024, batch_size=16), gpus=2)
    fits = {c.shape.strategy for c in decision.candidates if c.fits}
    assert fits == {"ddp", "fsdp"}
    assert decision.chosen.strategy == "ddp"


def test_nodes_multiply_the_world_and_the_plan_says_so():
    budget = Budget(80 * GiB, gpu_count=8, nodes=2)
    assert budget.world_size == 16
    decision = plan_training(LLAMA3_8B, PlanRequest(seq_len=512, batch_size=64), budget)
    assert decision.micro_batch * decision.gradient_accumulation * 16 == 64
    assert "2 nodes x 8 GPUs" in decision.reason


def test_plan_for_spec_writes_the_strategy_and_world_the_worker_runs():
    spec = _llama_spec(
        **{
            "resources.gpu.count": 4,
            "resources.gpu.nodes": 2,
            "resources.gpu.memory": "80Gi",
            "training.batchSize": 64,
        }
    )
    status_plan = plan_for_spec(spec, LLAMA3_8B)
    dumped = status_plan.model_dump(by_alias=True)
    assert (
        dumped["strategy"],
        dumped["nodes"],
        dumped["processesPerNode"],
        dumped["worldSize"],
    ) == ("ddp", 2, 4, 8)
    assert dumped["microBatchSize"] * dumped["gradientAccumulation"] * 8 == 64


def test_a_batch_that_does_not_split_over_the_gpus_is_refused_naming_the_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"spec.training.batchSize must be a multiple"):
        _llama_spec(**{"resources.gpu.count": 3, "training.batchSize": 16})


def _llama_spec(**overrides):
    from finetune_api import FineTuneJobSpec

    doc = yaml.safe_load((EXAMPLES / "finetunejob-llama3-8b.yaml").read_text())["spec"]
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return FineTuneJobSpec.model_validate(doc)


def test_fp8_is_planned_when_named_and_never_sharded():
    request = PlanRequest(seq_len=2048, batch_size=16, packing=True, method="fp8")
    named = plan(24, request)
    assert named.fits and named.method == "fp8" and "FP8 e4m3 base" in named.reason
    lora = plan(24, PlanRequest(seq_len=2048, batch_size=16, packing=True, method="lora"))
    # the same shape needs 6.5 GiB less with the base's 7.0 billion projection weights in FP8
    same = next(
        c
        for c in lora.candidates
        # (the bf16 twin of a fully checkpointed shape runs compiled layers; FP8 does not)
        if c.shape.but(compiled_layers=False) == named.chosen.shape.but(method="lora")
        and c.gradient_accumulation
    )
    saved = same.estimate.breakdown["weights"] - named.estimate.breakdown["weights"]
    assert 6.3 * GiB < saved < 6.6 * GiB
    sharded = plan_training(LLAMA3_8B, request, Budget(24 * GiB, gpu_count=2))
    assert {c.strategy for c in sharded.candidates} == {"ddp"}


# --- fp8 under auto: only on a GPU product known to have FP8 tensor cores -------------------

H200 = "NVIDIA-H200"
A100 = "NVIDIA-A100-SXM4-80GB"


def plan_on(product: str | None, memory_gib: float, request: PlanRequest = REQUEST, gpus=1):
    budget = Budget(int(memory_gib * GiB), gpu_count=gpus, gpu_product=product)
    return plan_training(LLAMA3_8B, request, budget)


def fastest_fitting(decision, method: str) -> float:
    return max(c.speed for c in decision.candidates if c.fits and c.shape.method == method)


def test_auto_chooses_fp8_on_an_h200_where_the_speed_model_ranks_it_fastest():
    # 80 GiB: FP8 GEMMs beat bf16 LoRA at the large micro-batch both fit (perf-notes.md: +13 %).
    decision = plan_on(H200, 80)
    assert decision.method == "fp8"
    assert decision.chosen.speed > fastest_fitting(decision, "lora")
    assert "fp8 not considered" not in decision.reason
    # 24 GiB: the FP8 base leaves room that bf16 LoRA spends on weights, and needs no
    # dequantisation, so it beats both.
    middle = plan_on(H200, 24)
    assert middle.method == "fp8"
    assert middle.chosen.speed > max(
        fastest_fitting(middle, "lora"), fastest_fitting(middle, "qlora")
    )
    # 12 GiB: FP8 fits only with a small micro-batch; QLoRA stays the choice.
    assert plan_on(H200, 12).method == "qlora"
    # Several GPUs: FP8 is offered data-parallel only, never sharded.
    ddp = plan_on(H200, 80, gpus=2)
    assert {c.strategy for c in ddp.candidates if c.shape.method == "fp8"} == {"ddp"}


@pytest.mark.parametrize(
    "product, why",
    [
        (A100, f"spec.resources.gpu.product '{A100}' (compute capability 8.0) has no FP8"),
        ("Tesla-T4", "spec.resources.gpu.product 'Tesla-T4' (compute capability 7.5) has no FP8"),
        (None, "set spec.resources.gpu.product to a GPU with FP8 tensor cores"),
        ("LOCAL-CPU", "spec.resources.gpu.product 'LOCAL-CPU' is not a GPU the planner knows"),
    ],
)
def test_auto_never_chooses_fp8_where_the_gpu_is_not_known_to_have_it_and_says_why(product, why):
    for memory in (6, 12, 24, 80):
        decision = plan_on(product, memory)
        assert all(c.shape.method != "fp8" for c in decision.candidates)
        assert f"fp8 not considered: {why}" in decision.reason, decision.reason
    # Said only where auto would otherwise have considered fp8.
    for request in (
        replace(REQUEST, allowed_methods=("lora", "qlora")),
        replace(REQUEST, method="lora"),
    ):
        assert "fp8" not in plan_on(product, 80, request).reason


def test_allowed_methods_restrict_what_auto_may_choose():
    no_fp8 = replace(REQUEST, allowed_methods=("lora", "qlora"))
    for memory in (12, 24, 80):
        decision = plan_on(H200, memory, no_fp8)
        assert decision.method in ("lora", "qlora")
        assert {c.shape.method for c in decision.candidates} == {"lora", "qlora"}
        assert "fp8" not in decision.reason  # not even as "faster but not fitting"
    only_qlora = plan_on(H200, 80, replace(REQUEST, allowed_methods=("qlora",)))
    assert only_qlora.method == "qlora"
    assert plan_on(H200, 80, replace(REQUEST, method="lora")).fits  # where LoRA fits
    # When nothing allowed fits, the hint names the list, not spec.method.
    only_lora = plan_on(H200, 12, replace(REQUEST, allowed_methods=("lora",)))
    assert not only_lora.fits
    assert "Allowing qlora in spec.allowedMethods would need less" in only_lora.reason


def test_allowed_methods_are_for_auto_only():
    with pytest.raises(ValueError, match="spec.allowedMethods restricts method auto only"):
        PlanRequest(method="lora", allowed_methods=("lora",))
    with pytest.raises(ValueError, match="spec.allowedMethods"):
        PlanRequest(allowed_methods=())


def test_fp8_named_on_a_gpu_without_fp8_is_refused_naming_the_fields():
    named = replace(REQUEST, method="fp8")
    for product in (A100, "Tesla-T4"):
        with pytest.raises(MethodNotSupported) as caught:
            plan_on(product, 80, named)
        message = str(caught.value)
        assert message.startswith("spec.method is fp8, but spec.resources.gpu.product ")
        assert f"'{product}'" in message and "has no FP8 tensor cores" in message
    # A product the planner does not know, or none: planned, the worker checks the GPU at start.
    assert plan_on("LOCAL-CPU", 80, named).method == "fp8"
    assert plan_on(None, 80, named).method == "fp8"
    # Allowing only fp8 where it cannot be planned leaves nothing: refused the same way.
    with pytest.raises(MethodNotSupported, match="spec.allowedMethods allows only fp8"):
        plan_on(None, 80, replace(REQUEST, allowed_methods=("fp8",)))
    assert plan_on(H200, 80, replace(REQUEST, allowed_methods=("fp8",))).method == "fp8"


# --- fp8 under auto without a product: every GPU node that could take the job ---------------

ALL_FP8 = NodeFp8(
    True,
    "every node that could take the job (2 with at least 24576 MiB per GPU) has FP8 tensor cores",
)
MIXED = NodeFp8(
    False, "nodes without FP8 tensor cores could take the job (a100-0: compute capability 8.0)"
)
UNREAD = NodeFp8(False, "the operator could not list the cluster's nodes")
NO_NODE = NodeFp8(False, "no node labelled by GPU Feature Discovery has at least 24576 MiB per GPU")


def plan_on_nodes(
    nodes: NodeFp8, memory_gib: float = 24, request: PlanRequest = REQUEST, product=None
):
    budget = Budget(int(memory_gib * GiB), gpu_product=product, gpu_nodes=nodes)
    return plan_training(LLAMA3_8B, request, budget)


def test_auto_considers_fp8_without_a_product_where_every_node_that_could_take_the_job_has_it():
    for memory in (24, 80):
        decision = plan_on_nodes(ALL_FP8, memory)
        # As if the product were known: the same choice as on an H200.
        assert decision.method == "fp8"
        assert decision.chosen.shape == plan_on(H200, memory).chosen.shape
        # The plan depends on the cluster, not on the spec alone: the reason says so.
        assert (
            f"fp8 considered: {ALL_FP8.detail}; the pods of an fp8 plan require compute "
            "capability 8.9 or newer." in decision.reason
        ), decision.reason
    # Where fp8 does not win it is still considered, and still said.
    small = plan_on_nodes(ALL_FP8, 12)
    assert small.method == "qlora" and "fp8 considered" in small.reason
    assert plan_on_nodes(ALL_FP8, 80, replace(REQUEST, allowed_methods=("fp8",))).method == "fp8"


@pytest.mark.parametrize("nodes", [MIXED, UNREAD, NO_NODE], ids=["mixed", "unread", "none"])
def test_auto_leaves_fp8_out_where_the_nodes_do_not_all_have_it_and_says_why(nodes):
    for memory in (24, 80):
        decision = plan_on_nodes(nodes, memory)
        assert all(c.shape.method != "fp8" for c in decision.candidates)
        assert (
            f"fp8 not considered: {nodes.detail}; name a GPU with FP8 tensor cores (compute "
            "capability 8.9 or newer) in spec.resources.gpu.product, or select only such nodes "
            "with spec.resources.nodeSelector." in decision.reason
        ), decision.reason
    with pytest.raises(MethodNotSupported, match="spec.allowedMethods allows only fp8"):
        plan_on_nodes(nodes, 80, replace(REQUEST, allowed_methods=("fp8",)))
    # A named fp8 is planned as before (its pods then require FP8 nodes).
    assert plan_on_nodes(nodes, 80, replace(REQUEST, method="fp8")).method == "fp8"


def test_a_named_product_decides_whatever_the_nodes_say():
    on_a100 = plan_on_nodes(ALL_FP8, 80, product=A100)
    assert on_a100.method != "fp8" and f"'{A100}' (compute capability 8.0)" in on_a100.reason
    on_h200 = plan_on_nodes(MIXED, 80, product=H200)
    assert on_h200.method == "fp8" and "fp8 considered" not in on_h200.reason


def test_the_nodes_are_read_only_where_they_can_change_the_plan_and_judged_for_the_spec():
    assert needs_gpu_nodes(_llama_spec())
    for overrides in (
        {"resources.gpu.product": H200},
        {"allowedMethods": ["lora", "qlora"]},
        {"method": "fp8"},
        {"method": "lora"},
    ):
        assert not needs_gpu_nodes(_llama_spec(**overrides)), overrides
    assert needs_gpu_nodes(_llama_spec(allowedMethods=["qlora", "fp8"]))

    def labels(memory_mib: int, major: int, minor: int, **extra: str) -> dict[str, str]:
        return {
            "nvidia.com/gpu.memory": str(memory_mib),
            "nvidia.com/gpu.compute.major": str(major),
            "nvidia.com/gpu.compute.minor": str(minor),
            **extra,
        }

    nodes = {
        "h100-0": labels(81559, 9, 0, pool="h100"),
        "a100-0": labels(81920, 8, 0, pool="a100"),
        "a100-40": labels(40960, 8, 0),
    }
    pinned = _llama_spec(**{"resources.nodeSelector": {"pool": "h100"}})  # 24Gi per GPU
    verdict = gpu_nodes_for_spec(pinned, nodes)
    assert verdict.fp8
    assert plan_for_spec(pinned, LLAMA3_8B, gpu_nodes=verdict).method == "fp8"
    anywhere = _llama_spec()
    assert not gpu_nodes_for_spec(anywhere, nodes).fp8
    assert plan_for_spec(
        anywhere, LLAMA3_8B, gpu_nodes=gpu_nodes_for_spec(anywhere, nodes)
    ).method in (
        "lora",
        "qlora",
    )
    # 41 GiB: the 40 GB A100 is too small; the 80 GB one still could take it.
    big = _llama_spec(**{"resources.gpu.memory": "41Gi"})
    assert not gpu_nodes_for_spec(big, nodes).fp8
    del nodes["a100-0"]
    assert gpu_nodes_for_spec(big, nodes).fp8


def test_the_spec_reaches_the_planner_and_a_refusal_fails_planning_with_its_reason():
    from finetune_api import FineTuneJob
    from finetune_api.constants import Reason
    from finetune_operator.planning import PlanningFailed, plan_job
    from finetune_operator.reconcile.settings import OperatorSettings

    on_h200 = {"resources.gpu.product": H200, "resources.gpu.memory": "80Gi"}
    assert plan_for_spec(_llama_spec(**on_h200), LLAMA3_8B).method == "fp8"
    restricted = _llama_spec(**on_h200, allowedMethods=["lora", "qlora"])
    assert request_from_spec(restricted)[0].allowed_methods == ("lora", "qlora")
    assert plan_for_spec(restricted, LLAMA3_8B).method == "lora"

    spec = _llama_spec(
        **{"resources.gpu.product": A100, "resources.gpu.memory": "80Gi", "method": "fp8"}
    )
    job = FineTuneJob(spec=spec.model_copy(update={"hf_token_secret_ref": None}))
    settings = OperatorSettings.from_env({"FINETUNE_ALLOW_HUB": "false"})
    with pytest.raises(PlanningFailed) as caught:
        asyncio.run(plan_job(job, settings))
    assert caught.value.reason == Reason.METHOD_NOT_SUPPORTED == "MethodNotSupported"
    assert not caught.value.transient
    assert "spec.method is fp8" in str(caught.value) and A100 in str(caught.value)


# --- unpacked steps: a row budget between two micro-batch sizes ---

SEED_QLORA = PlanRequest(
    method="qlora", lora_r=64, lora_dropout=0.1, seq_len=512, batch_size=16, packing=False
)
"""The common recipe's QLoRA job: 12 GiB, r 64, dropout 0.1, seq 512, 16 examples per step."""


def test_an_unpacked_step_gets_the_largest_row_budget_that_fits_between_two_micro_batches():
    decision = plan(12, SEED_QLORA)
    chosen = decision.chosen.shape
    # 12 x 512 fits and 16 x 512 does not: the rows fill the memory in between (QLoRA's
    # adapters, their gradients and AdamW state are bf16 in the worker: WORKER_ADAPTER_BYTES)
    ladder = {
        c.shape.micro_batch: c.fits
        for c in decision.candidates
        if c.shape.row_tokens is None and c.shape.recomputed_layers(32) == 32
    }
    assert ladder[12] and not ladder[16]
    assert chosen.row_tokens is not None and 12 * 512 < chosen.row_tokens < 16 * 512
    assert chosen.row_tokens % 64 == 0 and chosen.micro_batch == chosen.row_tokens // 512
    assert decision.estimate.with_context <= decision.budget.usable_bytes
    assert f"rows of up to {chosen.row_tokens} tokens" in decision.reason
    # the largest: 64 tokens more would not fit
    from finetune_operator.planner.memory import estimate_memory

    wider = chosen.but(row_tokens=chosen.row_tokens + 64)
    assert estimate_memory(LLAMA3_8B, wider).with_context > decision.budget.usable_bytes
    # and it ranks above the ladder's 12 x 512 because it is predicted faster
    rung = max(
        (c for c in decision.candidates if c.fits and c.shape.row_tokens is None),
        key=lambda c: c.speed,
    )
    assert decision.chosen.speed > rung.speed


def test_row_budgets_stay_whole_micro_batches_with_packing_or_a_micro_batch_given():
    for request in (replace(SEED_QLORA, packing=True), replace(SEED_QLORA, micro_batch=4)):
        decision = plan(12, request)
        assert all(c.shape.row_tokens is None for c in decision.candidates)


def test_status_plan_carries_the_row_budget():
    spec = yaml.safe_load((EXAMPLES / "finetunejob-llama3-8b.yaml").read_text())["spec"]
    spec["method"] = "qlora"
    spec["lora"].update(r=64, dropout=0.1)
    spec["training"].update(seqLength=512, batchSize=16, packing=False)
    spec["resources"]["gpu"]["memory"] = "12Gi"
    from finetune_api import FineTuneJobSpec

    planned = plan_for_spec(FineTuneJobSpec.model_validate(spec), LLAMA3_8B)
    assert 12 * 512 < planned.row_tokens < 16 * 512
    assert planned.model_dump(by_alias=True)["rowTokens"] == planned.row_tokens


def test_qlora_plans_count_the_adapters_in_bf16_as_the_trainer_holds_them():
    """trl's SFTTrainer casts a quantised model's adapters to bf16, and their gradients and
    AdamW moments follow (measured: bench/data/tensor-bytes-h200.jsonl); LoRA keeps fp32."""
    for method, adapter_bytes in (("qlora", 2), ("lora", 4)):
        decision = plan(80, replace(SEED_QLORA, method=method))
        estimate, chosen = decision.estimate, decision.chosen
        params = decision.chosen.estimate.details["trainable_params"]
        assert chosen.shape.method == method and chosen.shape.adapter_bytes == adapter_bytes
        assert estimate.breakdown["adapter_weights"] == adapter_bytes * params
        assert estimate.breakdown["gradients"] == adapter_bytes * params
        # torch AdamW: two moments in the parameters' dtype
        assert estimate.breakdown["optimizer_state"] == 2 * adapter_bytes * params


def test_an_unpacked_plan_says_its_predicted_rate_is_for_full_rows():
    # Unpacked rows hold a step's whole examples, usually fewer tokens than the row allows;
    # the figure in the reason is what full rows would reach, and it says so.
    unpacked = plan(24, PlanRequest(seq_len=2048, batch_size=16, packing=False))
    packed = plan(24, PlanRequest(seq_len=2048, batch_size=16, packing=True))
    assert "tokens/s on an H200 with full rows)" in unpacked.reason
    assert "tokens/s on an H200)" in packed.reason and "full rows" not in packed.reason
