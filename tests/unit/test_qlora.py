"""QLoRA: a 4-bit base (bitsandbytes NF4) with LoRA adapters computes, in the pipeline, what transformers' 4-bit
model (`from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))`) with peft's adapters computes.

bitsandbytes 0.50 runs its 4-bit layers on CPU, so this is tested here: each stage quantizes the decoder's linear
layers from the weights it loaded, bit for bit as transformers does, and peft wraps them in its `lora.bnb` layers.
"""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from models.architecture import discover
from models.lora import adapter_state
from models.quantize import Quantization, quantize_stage
from tests.cases import CASES, SEQ, VOCAB, peft_reference, pipeline_with_adapters

NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}  # compared in training mode
FAMILIES = ["llama", "qwen2", "gpt2"]  # untied GQA; tied with qkv bias; Conv1D (transposed when quantized)


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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", False), ("fp4", True)])
def test_4bit_pipeline_computes_what_transformers_4bit_model_with_peft_computes(
    family, quant_type, double_quant, tmp_path, one_rank_group
):
    _, _, settings = next(c for c in CASES if c[0] == family)
    settings = {**settings, **NO_DROPOUT.get(family, {})}
    full_precision = peft_reference(family, settings, tmp_path).train()
    reference = transformers_4bit(tmp_path, quant_type, double_quant)
    arch = discover(full_precision.base_model.model.config)

    def quantized(pipe):
        quantization = Quantization(quant_type=quant_type, double_quant=double_quant)
        return quantize_stage(pipe, quantization, torch.float32)

    pipe, plan, _ = pipeline_with_adapters(tmp_path, arch, before_adapters=quantized)
    pipe.train()
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
