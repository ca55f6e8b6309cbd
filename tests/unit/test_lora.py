"""LoRA in the pipeline computes what `peft`'s model computes, for every family (in-process, real DeepSpeed).

Each family's tiny random model gets peft's adapters twice: once as `get_peft_model(AutoModelForCausalLM)` (the
reference, its lora_B moved off zero so that the adapters change the output), once on the pipeline's layers from
the same adapter file. Logits, loss and every adapter gradient agree; only adapters train; the exported adapter
loads with `PeftModel.from_pretrained`; bad LoRA settings are one line. Mixtures of experts (one with a shared
expert, gpt-oss with expert biases, DeepSeek-V3 with a dense first layer and shared experts) take `--lora-rank`'s
default: the linear layers and the experts' fused 3-D weights (peft's `target_parameters`), not the routers.
"""

import json

import deepspeed
import pytest
import torch
from peft import PeftModel

from models.architecture import discover
from models.lora import WEIGHTS_FILE, adapter_parameters, adapter_state, plan_adapters, save_adapter
from models.lora_targets import lora_config, lora_targets
from tests.cases import CASES, IDS, MOE_CASES, SEQ, VOCAB, hf_model, peft_reference, pipeline_with_adapters
from tests.helpers import write_ds_config

LORA_MOE = [case for case in MOE_CASES if case[0] in ("qwen2_moe", "gpt_oss", "deepseek_v3")]


@pytest.mark.parametrize("case", CASES + LORA_MOE, ids=IDS + [family for family, _, _ in LORA_MOE])
def test_pipeline_with_adapters_computes_what_peft_computes(case, tmp_path, one_rank_group):
    family, _, settings = case
    reference = peft_reference(family, settings, tmp_path)
    arch = discover(reference.base_model.model.config)
    pipe, plan, adapted = pipeline_with_adapters(tmp_path, arch)
    assert adapted == len(plan.targets) + len(plan.parameters) > 0
    lora = sum(p.numel() for n, p in pipe.named_parameters() if "lora_" in n)
    assert sum(adapter_parameters(arch, plan)) == lora, "the planner counts other adapters"
    if case in LORA_MOE:  # every MoE layer's two fused expert weights, no router
        moe_layers = {n.rpartition(".mlp.")[0] for n, p in arch.meta_model().named_parameters() if p.ndim == 3}
        assert {n.rpartition(".")[2] for n in plan.parameters} == {"gate_up_proj", "down_proj"}
        assert len(plan.parameters) == 2 * len(moe_layers) > 0
        routers = [n for n, m in arch.meta_model().named_modules() if type(m).__name__.lower().endswith("topkrouter")]
        adapted_names = plan.targets | plan.parameters
        assert routers and not [n for n in adapted_names if n in routers or n.rpartition(".")[0] in routers]
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    expected = reference(ids, labels=ids)
    with reference.disable_adapter():
        base_logits = reference(ids).logits
    logits = pipe(ids)
    loss = pipe.loss_fn(logits, ids)
    assert (expected.logits - base_logits).abs().max() > 1e-3, "the adapters should change the output"
    assert torch.allclose(logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(loss, expected.loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    expected.loss.backward()
    theirs = {k: p.grad for k, p in reference.named_parameters() if p.requires_grad}
    layers = arch.pipeline_layers()
    ours = {}
    for name, param in pipe.named_parameters():
        if param.requires_grad:
            index, inner = name.split(".", 1)
            ours |= adapter_state(layers[int(index)], {inner: param.grad})
    theirs = {k.replace(".default.", "."): g for k, g in theirs.items()}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5, rtol=1e-4), key
    assert all(p.grad is None for n, p in pipe.named_parameters() if "lora_" not in n), "a base weight got a gradient"


def test_an_adapter_folder_in_peft_older_format_starts_from_its_weights(tmp_path, one_rank_group):
    """`--peft-config DIR` holding adapter_model.bin (peft before 0.6, or safe_serialization=False): the pipeline
    starts from those adapters, computing what peft's model computes, not from fresh ones."""
    family, _, settings = CASES[0]
    reference = peft_reference(family, settings, tmp_path / "new")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "base").symlink_to(tmp_path / "new" / "base")
    reference.save_pretrained(tmp_path / "old" / "adapter", safe_serialization=False)
    assert (tmp_path / "old" / "adapter" / "adapter_model.bin").is_file()
    assert not (tmp_path / "old" / "adapter" / WEIGHTS_FILE).exists()
    pipe, plan, _ = pipeline_with_adapters(tmp_path / "old", discover(reference.base_model.model.config))
    assert plan.initial == tmp_path / "old" / "adapter" / "adapter_model.bin"
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, logits = reference(ids).logits, pipe(ids)
        with reference.disable_adapter():
            assert (expected - reference(ids).logits).abs().max() > 1e-3, "the adapters should change the output"
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_only_adapters_train_in_a_deepspeed_engine_and_the_base_stays_bit_identical(family, tmp_path, one_rank_group):
    """Real `train_batch` steps (ZeRO-1, AdamW with weight decay, clipping) on a tied model and on a MoE (adapters on
    the fused experts): the optimizer holds the adapters only, the frozen base (the tied embedding, the experts) is
    bit-identical after 4 steps, the adapters moved."""
    _, _, settings = next(c for c in CASES + MOE_CASES if c[0] == family)
    peft_reference(family, settings, tmp_path)
    arch = discover(hf_model(family, settings).config)
    pipe, plan, _ = pipeline_with_adapters(tmp_path, arch)
    pipe.train()
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    ds_config = json.loads(write_ds_config(tmp_path / "ds.json", 4, 2).read_text().replace('"auto"', "10"))
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=pipe, model_parameters=trainable, config=ds_config)
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) <= sum(
        p.numel() for p in trainable
    )
    step_batch = [(ids, ids) for ids in torch.randint(0, VOCAB, (2, 2, SEQ)).unbind()]
    losses = [engine.train_batch(data_iter=iter(step_batch)).item() for _ in range(4)]
    assert losses[-1] < losses[0]  # the same batch every step: the adapters learn it
    after = dict(engine.module.named_parameters())
    frozen = [n for n in before if "lora_" not in n]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    moved = [n for n in before if ".experts." in n and "lora_" in n and not torch.equal(before[n], after[n])]
    assert len(moved) == (4 * len(plan.parameters) // 2 if family == "deepseek_v3" else 0), moved
    assert engine.module.tied_weight_max_diff() == 0.0


@pytest.mark.parametrize("family", ["llama", "deepseek_v3", "gpt_oss"])
def test_exported_adapter_loads_in_peft_and_equals_the_merged_model(family, tmp_path, one_rank_group):
    """The adapter folder written from the pipeline's tensors loads with `PeftModel.from_pretrained` with exactly
    its keys, and its logits equal those of the base with the adapters merged in (`--merge-adapter`: peft's
    `merge_and_unload`, which adds each expert's delta to the fused weights; gpt-oss stores them [E, in, out]).
    DeepSeek-V3's adapter goes through peft 0.21.2's transformers-v5 config conversion on loading, unchanged."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from models.lora import merged_model

    _, _, settings = next(c for c in CASES + MOE_CASES if c[0] == family)
    peft_reference(family, settings, tmp_path)
    arch = discover(hf_model(family, settings).config)
    pipe, plan, _ = pipeline_with_adapters(tmp_path, arch)
    with torch.no_grad():  # as training would: the adapters move away from the file they started from
        for name, param in pipe.named_parameters():
            if "lora_" in name:
                param.add_(0.01)
    layers, tensors = arch.pipeline_layers(), {}
    for name, param in pipe.named_parameters():
        index, inner = name.split(".", 1)
        tensors |= adapter_state(layers[int(index)], {inner: param.detach()})
    out = save_adapter(tmp_path / "export", plan, tensors, base_model=str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(base, out)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pipe(ids), atol=1e-5, rtol=1e-5)
        merged = merged_model(tmp_path / "base", out).eval()
        assert torch.allclose(merged(ids).logits, loaded(ids).logits, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["peft_type"] == "LORA"
    stored, held = load_file(out / WEIGHTS_FILE), get_peft_model_state_dict(loaded)
    assert stored.keys() == tensors.keys() == held.keys()
    assert all(torch.equal(held[key], stored[key]) for key in stored), "an adapter tensor did not load"
    assert any(".experts." in key for key in stored) == (family != "llama")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(target_modules=["no_such_proj"]), "LoRA target modules no_such_proj: not found in this llama model"),
        (dict(modules_to_save=["lm_head"]), "LoRA setting modules_to_save"),
        (dict(bias="all"), "LoRA bias='all'"),
    ],
)
def test_bad_lora_settings_are_one_line(change, message):
    family, _, settings = next(c for c in CASES if c[0] == "llama")
    arch = discover(hf_model(family, settings).config)
    config = lora_config(rank=4, alpha=None, dropout=0.0, target_modules=None, base_model=None)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message) as raised:
        plan_adapters(arch, config)
    assert "\n" not in str(raised.value)


def test_lora_on_a_tied_head_is_refused_and_targets_follow_peft():
    family, _, settings = next(c for c in CASES if c[0] == "qwen2")  # tied
    arch = discover(hf_model(family, settings).config)
    tied = lora_config(rank=4, alpha=None, dropout=0.0, target_modules=["q_proj", "lm_head"], base_model=None)
    with pytest.raises(ValueError, match="ties its LM head"):
        plan_adapters(arch, tied)
    some = lora_config(rank=4, alpha=None, dropout=0.0, target_modules=["q_proj", "v_proj"], base_model=None)
    some.layers_to_transform = [0, 2]
    plan = plan_adapters(arch, some)
    assert sorted(plan.targets) == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 2) for m in "qv"]
    everything = plan_adapters(arch, lora_config(rank=8, alpha=16, dropout=0.0, target_modules=None, base_model=None))
    assert len(everything.targets) == 7 * arch.num_layers and set(everything.targets.values()) == {(8, 16)}


def test_expert_adapters_follow_the_flags_and_bad_ones_are_one_line():
    """`--lora-target-parameters`: the default (every fused expert weight, rank r), `none`, a list; dropout (which
    peft's ParamWrapper lacks) and a parameter the model lacks are one line each. qwen3_moe is a family whose
    "all-linear" peft 0.21.2 reads as transformers 4 did (router included): the default leaves it out."""
    family, _, settings = next(c for c in MOE_CASES if c[0] == "qwen3_moe")  # MoE layers 1 and 3
    arch = discover(hf_model(family, settings).config)

    def plan(parameters=None, dropout=0.0):
        modules, params = lora_targets(arch, None, parameters)
        config = lora_config(
            rank=4, alpha=None, dropout=dropout, target_modules=modules, target_parameters=params, base_model=None
        )
        return plan_adapters(arch, config)

    default = plan()
    fused = [f"model.layers.{i}.mlp.experts.{p}" for i in (1, 3) for p in ("down_proj", "gate_up_proj")]
    assert sorted(default.parameters) == fused and set(default.parameters.values()) == {(4, 4)}
    assert sorted({n.split(".", 3)[3] for n in default.targets}) == [f"self_attn.{m}_proj" for m in "koqv"]
    assert not plan(["none"]).parameters and plan(["none"]).targets == default.targets
    assert sorted(plan(["mlp.experts.down_proj"]).parameters) == fused[::2]
    for parameters, dropout, message in (
        (None, 0.1, "LoRA dropout 0.1 with adapters on parameters .*use --lora-dropout 0 or --lora-target-parameters"),
        (["experts.w9"], 0.0, "LoRA target parameter experts.w9: not found in this qwen3_moe model; its expert "),
    ):
        with pytest.raises(ValueError, match=message) as raised:
            plan(parameters, dropout)
        assert "\n" not in str(raised.value)
