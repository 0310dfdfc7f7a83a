"""CPU checks of the numerics choices in finetune_worker.modeling (tiny Llama, no downloads)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from finetune_worker import modeling

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}


def tiny_config(**kw):
    return transformers.LlamaConfig(**{**TINY, **kw})


def tiny_model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(), dtype=dtype)


SPEC = {"model": {"name": "unused"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def test_lora_targets_every_linear_projection_and_freezes_the_base():
    pm = modeling.prepare_for_training(tiny_model(), SPEC, {"method": "lora"})
    adapted = {name.split(".")[-1] for name, mod in pm.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == set(modeling.DEFAULT_TARGET_MODULES)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # adapters hold fp32 master weights; the frozen base stays bf16
    assert all(p.dtype == torch.float32 for n, p in pm.named_parameters() if p.requires_grad)
    assert pm.get_input_embeddings().weight.dtype == torch.bfloat16


def test_lora_settings_are_translated():
    spec = {
        "lora": {
            "r": 4,
            "alpha": 8,
            "dropout": 0.05,
            "targetModules": ["q_proj", "v_proj"],
            "useRSLoRA": True,
            "useDoRA": True,
        }
    }
    cfg = modeling.lora_config(spec)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.05)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.use_rslora and cfg.use_dora


def test_qlora_keeps_embeddings_and_lm_head_bf16_and_quantizes_the_projections():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = tiny_model()
    reference_ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=reference_ids).logits.float()
    modeling.quantize_in_place(model)
    pm = modeling.prepare_for_training(
        model, SPEC, {"method": "qlora", "gradientCheckpointing": True}
    )
    base = pm.base_model.model
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    q = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    assert all(p.dtype != torch.float32 for n, p in pm.named_parameters() if not p.requires_grad)
    # NF4 is a lossy copy of the same weights, not different weights
    pm.eval()
    with torch.no_grad():
        out = pm(input_ids=reference_ids).logits.float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.2, f"NF4 model drifted {rel:.3f} from its bf16 source"
    # and it trains: gradients reach the adapters through checkpointed, quantised layers
    pm.train()
    loss = pm(input_ids=reference_ids, labels=reference_ids).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_selective_checkpointing_recomputes_the_requested_share_of_layers():
    assert modeling.checkpointed_layers(32, 1.0) == list(range(32))
    assert modeling.checkpointed_layers(32, 0.5) == list(range(0, 32, 2))
    assert modeling.checkpointed_layers(32, 0.0) == []
    assert len(modeling.checkpointed_layers(32, 0.25)) == 8

    def recomputed(**plan):
        pm = modeling.prepare_for_training(
            tiny_model(), SPEC, {"method": "lora", "gradientCheckpointing": True, **plan}
        )
        return [layer.gradient_checkpointing for layer in pm.base_model.model.model.layers]

    assert recomputed(checkpointFraction=0.5) == [True, False, True, False]
    # The plan's checkpointedLayers is a count and wins over a fraction.
    twelve = [0, 2, 5, 8, 10, 13, 16, 18, 21, 24, 26, 29]
    assert modeling.checkpointed_layers(32, 1.0, count=12) == twelve
    assert recomputed(checkpointedLayers=1, checkpointFraction=0.5) == [True, False, False, False]


def test_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    grads = []
    for ckpt in (False, True):
        pm = modeling.prepare_for_training(
            tiny_model(torch.float32),
            {"lora": {"r": 4, "dropout": 0.0}},
            {"method": "lora", "gradient_checkpointing": ckpt},
        )
        for n, p in pm.named_parameters():  # lora_B starts at zero: give it a value so A gets grads
            if "lora_B" in n:
                torch.nn.init.normal_(
                    p, std=0.02, generator=torch.Generator().manual_seed(hash(n) % 1000)
                )
        pm.train()
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7), n


def test_load_base_model_from_a_local_directory(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    spec = {"model": {"uri": "pvc://models/m"}}
    model = modeling.load_base_model(
        spec, {"method": "lora"}, None, "cpu", local_path=str(tmp_path / "m")
    )
    assert model.dtype == torch.bfloat16
    assert model.config.use_cache is False
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="plan.method"):
        modeling.plan_method({"method": "full"})
    with pytest.raises(FileNotFoundError, match="/does/not/exist"):
        modeling.model_source({"model": {"name": "a/b"}}, "/does/not/exist")
    with pytest.raises(ValueError, match="spec.model.uri"):
        modeling.model_source({"model": {"uri": "s3://bucket/key"}})
    assert modeling.model_source({"model": {"uri": "hf://a/b", "revision": "abc"}}) == (
        "a/b",
        "abc",
    )
    with pytest.raises(ValueError, match="spec.model"):
        modeling.model_source({"model": {}})
    with pytest.raises(RuntimeError, match="CUDA"):
        modeling.load_base_model({"model": {"name": "x/y"}}, {"method": "qlora"}, None, "cpu")


def test_lean_lora_forward_matches_peft_under_bf16_autocast():
    """The lean path (no fp32 input round trip, addmm epilogue) computes what peft computes."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    results = []
    for lean in (False, True):
        pm = modeling.prepare_for_training(
            tiny_model(),
            {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            {"method": "lora", "leanLora": lean},
        )
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
        layer = pm.base_model.model.model.layers[0].mlp.down_proj
        assert hasattr(layer, "_peft_forward") == lean
        pm.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append(
            (
                loss.detach().float(),
                {n: p.grad.float().clone() for n, p in pm.named_parameters() if p.requires_grad},
            )
        )
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=2e-3), (l0, l1)
    for n in g0:
        rel = (g0[n] - g1[n]).norm() / (g0[n].norm() + 1e-12)
        assert rel < 3e-2, (n, float(rel))  # bf16 rounding of a different summation order
    # outside autocast the lean layer falls back to peft's forward (fp32 adapters need the cast)
    pm.eval()
    with torch.no_grad():
        assert torch.isfinite(pm(input_ids=ids).logits).all()


def test_lean_lora_calls_a_wrapped_lora_b_so_fsdp_can_gather_it():
    """Under FSDP each LoRA matrix is its own unit: only calling the module gathers its weight.
    Found on one GPU with several gloo ranks (bench/fsdp_ranks_on_one_gpu.py): reading
    `lora_B.weight` directly crashed every FSDP run with world size > 1."""

    class Unit(torch.nn.Module):
        """Stands in for an FSDP wrapper: forwards attributes, and counts forward calls (the
        pre-forward hook where FSDP all-gathers the weight)."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, h):
            self.calls += 1
            return self.inner(h)

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    outputs = []
    for wrap in (False, True):
        pm = modeling.prepare_for_training(
            tiny_model(),
            {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            {"method": "lora", "leanLora": True},
        )
        units = []
        for module in pm.modules():
            if hasattr(module, "_peft_forward"):
                with torch.no_grad():
                    module.lora_B["default"].weight.normal_(
                        std=0.05, generator=torch.Generator().manual_seed(1)
                    )
                if wrap:
                    module.lora_B["default"] = Unit(module.lora_B["default"])
                    units.append(module.lora_B["default"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(pm(input_ids=ids).logits.float())
        if wrap:
            assert units and all(u.calls == 1 for u in units)
    assert torch.allclose(outputs[0], outputs[1], rtol=2e-2, atol=2e-2)


def _with_lora_b(pm):
    """lora_B starts at zero; give it values so that lora_A gets gradients too."""
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    return pm


def test_compiled_decoder_layers_give_the_eager_loss_gradients_and_adapter_keys():
    # Dynamo's trace of each checkpointed layer, through AOT autograd's forward and backward
    # graphs (the "aot_eager" backend: the same graphs Inductor would turn into kernels, run
    # by PyTorch's ops so that the CPU can check them quickly), over rows of several lengths.
    from torch._dynamo.utils import counters

    counters.clear()
    plan = {"method": "lora", "gradient_checkpointing": True}
    runs = []
    for compiled in (False, True):
        pm = _with_lora_b(
            modeling.prepare_for_training(
                tiny_model(torch.float32), {"lora": {"r": 4, "dropout": 0.0}}, plan
            )
        )
        if compiled:
            assert modeling.compile_decoder_layers(pm, backend="aot_eager") == 4
        pm.train()
        losses, grads = [], {}
        for length in (16, 23, 9):
            ids = torch.randint(
                0, 256, (1, length), generator=torch.Generator().manual_seed(length)
            )
            loss = pm(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
        runs.append((losses, grads, sorted(pm.state_dict())))
    (eager_losses, eager_grads, eager_keys), (losses, grads, keys) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert grads.keys() == eager_grads.keys() and keys == eager_keys  # no _orig_mod prefix
    for n in grads:
        assert torch.allclose(grads[n], eager_grads[n], rtol=1e-4, atol=1e-6), n
    # compiled once (dynamic from the start: three row lengths, one graph), without breaks
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_a_plan_with_compiled_layers_compiles_them_on_the_gpu_only():
    plan = {"method": "lora", "gradient_checkpointing": True, "compiledLayers": True}
    pm = modeling.prepare_for_training(tiny_model(), SPEC, plan, device="cpu")
    assert pm.compiled_layers == 0
    assert all(layer._compiled_call_impl is None for layer in modeling.decoder_layers(pm))


FAMILIES = {
    "mistral": lambda kw: transformers.MistralConfig(**kw, sliding_window=32),
    "qwen2": lambda kw: transformers.Qwen2Config(**kw),
    "phi3": lambda kw: transformers.Phi3Config(**kw, pad_token_id=0),
    "gemma2": lambda kw: transformers.Gemma2Config(**kw, head_dim=16, sliding_window=32),
}


def _losses(config, compile_backend=None) -> list[float]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pm = modeling.prepare_for_training(
        model,
        {"lora": {"r": 4, "dropout": 0.0}},
        {"method": "lora", "gradient_checkpointing": True},
    )
    if compile_backend is not None:
        modeling.compile_decoder_layers(pm, backend=compile_backend)
    pm.train()
    losses = []
    for length in (17, 40):  # the second past the sliding windows
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_other_planned_families_compile_their_layers_whole(family):
    # The planner compiles the layers of every family it plans for; each traces as one graph
    # (a second for sliding-window attention past its window) with eager's losses.
    from torch._dynamo.utils import counters

    config = FAMILIES[family](dict(TINY))
    counters.clear()
    assert _losses(config, "aot_eager") == pytest.approx(_losses(config), rel=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_a_layer_that_fails_to_compile_runs_eager_instead_of_ending_the_job():
    calls = []

    def broken_backend(graph_module, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("this backend cannot compile anything")

    config = tiny_config()
    assert _losses(config, broken_backend) == pytest.approx(_losses(config), rel=1e-6)
    assert calls  # the backend was asked, failed, and the layers ran eager
