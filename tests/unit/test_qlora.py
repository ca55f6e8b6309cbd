"""QLoRA: a 4-bit base (bitsandbytes NF4) with LoRA adapters computes, in the pipeline, what transformers' 4-bit
model (`from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`) with peft's adapters computes.

bitsandbytes 0.50 runs its 4-bit layers on CPU, so this is tested here: each stage quantizes the decoder's linear
layers from the weights it loaded, bit for bit as transformers does, and peft wraps them in its `lora.bnb` layers.
On a mixture of experts (DeepSeek-V3: shared experts, a dense first layer) transformers 5.24 quantizes the linear
layers only: the fused 3-D expert weights and the routers stay in the compute dtype, here as there, with the
experts' adapters (peft's ParamWrapper) on them.
"""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from models.architecture import discover
from models.lora import adapter_state
from models.quantize import Quantization, expert_weights, parameter_count, quantize_stage
from tests.cases import CASES, MOE_CASES, SEQ, VOCAB, peft_reference, pipeline_with_adapters
from train.planning.memory_model import quantized_layer_parameters

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}  # compared in training mode
# untied GQA; tied with qkv bias; Conv1D (transposed when quantized); experts kept in the compute dtype
FAMILIES = ["llama", "qwen2", "gpt2", "deepseek_v3"]


def transformers_4bit(folder, quant_type: str = "nf4", double_quant: bool = False) -> PeftModel:
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        folder / "base", quantization_config=config, device_map="cpu", attn_implementation="sdpa"
    )
    return PeftModel.from_pretrained(base, folder / "adapter", is_trainable=True).train()


def held_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(weights held in 4 bits, base weights kept in the compute dtype), adapters not counted."""
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    quantized = sum(parameter_count(p) for p in base if getattr(p, "quant_state", None) is not None)
    return quantized, sum(p.numel() for p in base if getattr(p, "quant_state", None) is None)


def experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The fused experts modules (a 3-D `gate_up_proj`), under peft's ParamWrappers."""
    return [m for m in model.modules() if getattr(getattr(m, "gate_up_proj", None), "ndim", 0) == 3]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("fp4", True)])
def test_4bit_pipeline_computes_what_transformers_4bit_model_with_peft_computes(
    family, quant_type, double_quant, tmp_path, one_rank_group
):
    _, _, settings = next(c for c in CASES + MOE_CASES if c[0] == family)
    settings = {**settings, **NO_DROPOUT.get(family, {})}
    full_precision = peft_reference(family, settings, tmp_path).train()
    reference = transformers_4bit(tmp_path, quant_type, double_quant)
    arch = discover(full_precision.base_model.model.config)

    def quantized(pipe):
        quantization = Quantization(quant_type=quant_type, double_quant=double_quant)
        return quantize_stage(pipe, quantization, torch.float32)

    pipe, plan, _ = pipeline_with_adapters(tmp_path, arch, before_adapters=quantized)
    pipe.train()
    assert held_weights(pipe) == held_weights(reference)  # (4-bit, kept): what transformers quantizes and keeps
    assert held_weights(pipe)[0] == sum(quantized_layer_parameters(arch)), "the planner counts other 4-bit weights"
    assert expert_weights(pipe) == expert_weights(reference) == sum(expert_weights(m) for m in experts(reference))
    assert (expert_weights(pipe) > 0) == (family == "deepseek_v3")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    expected = reference(ids, labels=ids)
    logits = pipe(ids)
    assert (logits - full_precision(ids).logits).abs().max() > 1e-3, "4 bits should differ from full precision"
    assert torch.allclose(logits, expected.logits, atol=1e-5, rtol=1e-5), (logits - expected.logits).abs().max()
    loss = pipe.loss_fn(logits, ids)
    assert torch.allclose(loss, expected.loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    expected.loss.backward()
    theirs = {k.replace(".default.", "."): p.grad for k, p in reference.named_parameters() if p.requires_grad}
    layers, ours = arch.pipeline_layers(), {}
    for name, param in pipe.named_parameters():
        if param.requires_grad:
            index, inner = name.split(".", 1)
            ours |= adapter_state(layers[int(index)], {inner: param.grad})
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5, rtol=1e-4), key
    pipe.eval()  # evaluation computes what training computes (no CPU inference repacking)
    with torch.no_grad():
        assert torch.equal(pipe(ids), logits.detach())
    saved = {k for layer in pipe.forward_funcs if hasattr(layer, "state_dict") for k in layer.state_dict()}
    assert not any(".weight.absmax" in k or "quant_state" in k for k in saved), "block scales in a checkpoint"
