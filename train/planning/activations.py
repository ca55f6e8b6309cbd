"""Activation memory: the bytes autograd keeps per token for each decoder layer's backward, counted on real layers.

Every tensor saved for backward is recorded once (by storage), parameters excluded. This is what the layer really
stores, e.g. the four 4h-wide tensors of GPT-2's tanh GELU or SwiGLU's three, which the usual 34 s b h estimate
(Korthikanti et al. 2022) leaves out; SDPA stores no s x s scores, eager attention (gpt-oss: its sinks) does.

Narrow copies instead of the real, possibly huge, layer. With the head and expert counts fixed, what a layer saves
for T tokens at width scale s is c0(s) + T (a + b s) + c2 T^2: every saved tensor is [T, some width] (widths scale
with s), [T, heads] or [T, experts] (softmax statistics, router logits, top-k), [heads, T, T] (eager attention's
probabilities), or one whatever T: a few [experts] sums (the router loss) and, with LoRA on a MoE's fused experts,
the whole adapted expert stack: peft 0.21's `ParamWrapper` forms W + scale B A ([experts, out, in], both sides
widths) in every forward and the experts' matmul keeps it for the backward. So c0(s) = alpha s^2 + beta s + gamma:
a constant per micro-batch, not per token, that grows with the width squared. Three token counts at the smallest
scale give c2 and the line at that scale, two at twice it the line's slope in s and c0 there, one at three times
it c0 there: six measurements for the six unknowns, exact (the weight-sized term is fitted, not recognised by its
shape, so any width-squared constant counts). The s x s term is kept for eager attention only: where MLA's
query-key (192) and value (128) head sizes differ, torch 2.13's CPU SDPA falls back to its math kernel, which keeps
[heads, s, s] probabilities, while on GPUs SDPA's memory-efficient and cuDNN kernels keep none (so a DeepSeek run on
CPU holds more than planned; the plan is for the GPUs). The narrow scales are the smallest at which every width of
the config (hidden, MLP, experts', MLA's ranks and head sizes) stays a whole even number and every attention head
keeps at least 8 channels (the sizes of the kernels the real layer runs), and two and three times it.

Mixtures of experts: the saved tensors of transformers 5.24's experts (`grouped_mm`, integrations/moe.py) are
the token x top-k rows sorted by expert, [T x top_k, width] whatever the routing, so a random layer's uneven
routing does not change the count. Layers that differ (DeepSeek's dense first layers, Qwen3-MoE's
`mlp_only_layers`, LoRA's `layers_to_transform`) are each measured: one copy per distinct layer.

Tensor parallelism (`tp` > 1): the narrow copies are cut to rank 0's part first (train/planning/tensor_parallel.py:
`cut_for_rank`), at the smallest scales whose widths still divide among the ranks.
"""

import functools
import json
import math
from dataclasses import dataclass
from fractions import Fraction

from models.architecture import DECODER, DECODER_ATTR, Architecture, discover
from models.lora import AdapterPlan
from models.pipeline import DecoderLayerPipe
from models.router_loss import empty_router_sums
from models.tensor_parallel import check_tensor_parallel
from train.planning.tensor_parallel import cut_for_rank

# Config fields that are widths (scaled in the narrow copies); transformers 5.24 names, every supported family.
WIDTHS = (
    "hidden_size",
    "intermediate_size",
    "n_inner",
    "head_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)
MIN_HEAD = 8  # channels per attention head in the narrowest copy
TOKENS = (32, 64, 128)  # the narrow copies' sequence lengths (three: the quadratic term of eager attention)


def _widths(config) -> dict[str, int]:
    """The config's widths by field name (its attribute map applied: GPT-2's n_embd is hidden_size)."""
    found = {name: getattr(config, name, None) for name in WIDTHS}
    found = {name: width for name, width in found.items() if isinstance(width, int) and width > 0}
    found.setdefault("head_dim", config.hidden_size // config.num_attention_heads)  # GPT-2: no head_dim field
    return found


def _head_sizes(widths: dict[str, int]) -> list[int]:
    """The channels per head of attention's products: MLA's query-key (nope + rope) and value sizes, else head_dim."""
    if "qk_nope_head_dim" in widths and "v_head_dim" in widths:
        return [widths["qk_nope_head_dim"] + widths.get("qk_rope_head_dim", 0), widths["v_head_dim"]]
    return [widths["head_dim"]]


def _narrow(settings: dict, scale: Fraction) -> dict | None:
    """`settings` with every width times `scale`, or None where that is not a valid narrow copy."""
    config = _config(settings, 1)
    scaled = {name: width * scale for name, width in _widths(config).items()}
    if any(w.denominator != 1 or w.numerator % 2 for w in scaled.values()):
        return None
    if min(_head_sizes({name: int(w) for name, w in scaled.items()})) < MIN_HEAD:
        return None
    fields = {
        config.attribute_map.get(n, n): int(w) for n, w in scaled.items() if isinstance(getattr(config, n, None), int)
    }
    narrow = {**settings, **fields}
    try:
        _config(narrow, 1)
    except (ValueError, TypeError):  # e.g. DeepSeek-V2 checks hidden_size % heads
        return None
    return narrow


def _cuttable(narrow: dict | None, tp: int) -> bool:
    """Whether a narrow copy's layers cut `tp` ways (every cut width divisible; the heads are not scaled)."""
    if narrow is None or tp <= 1:
        return narrow is not None
    from models.hf_weights import config_from_dict

    try:
        check_tensor_parallel(config_from_dict(narrow), tp)
    except ValueError:
        return False
    return True


def narrow_scales(settings: dict, tp: int = 1) -> tuple[Fraction, Fraction, Fraction]:
    """The three width scales of the narrow copies: the smallest valid one (whose layers cut `tp` ways), twice and
    three times it."""
    step = Fraction(1, math.gcd(*_widths(_config(settings, 1)).values()))
    for k in range(1, step.denominator + 1):
        scales = (k * step, 2 * k * step, 3 * k * step)
        if all(_cuttable(_narrow(settings, scale), tp) for scale in scales):
            return scales
    raise ValueError(f"{settings['model_type']}: no narrow copy of its decoder layer to count activations on")


def _config(settings: dict, layers: int):
    from models.hf_weights import config_from_dict

    config = config_from_dict(settings)
    config.num_hidden_layers = layers  # after construction: per-layer lists (layer_types) keep their length
    return config


def layer_lora(arch: Architecture, adapters: AdapterPlan, index: int) -> dict:
    """The LoRA settings of decoder layer `index`, with its modules' names inside the layer (the narrow copy gets
    the same adapters; with a frozen base, autograd keeps what the adapters need instead of what the weights'
    gradients would)."""
    layer = next(layer for layer in arch.pipeline_layers() if layer.decoder_index == index)
    names, params = (
        sorted(layer.local_name(n) for n in found if n.startswith(layer.modules[0] + "."))
        for found in (adapters.targets, adapters.parameters)
    )
    if not names and not params:
        return {"target_modules": [], "target_parameters": [], "r": 1, "lora_alpha": 1, "use_dora": False}
    rank, alpha = (adapters.targets | adapters.parameters)[layer.hf_key((names or params)[0])]
    return {
        "target_modules": names,
        "target_parameters": params,  # a MoE's experts (peft's ParamWrapper)
        "r": rank,
        "lora_alpha": alpha,
        "use_dora": adapters.config.use_dora,
    }


@dataclass(frozen=True)
class SavedBytes:
    """What a decoder layer keeps for its backward in one forward: `constant` bytes per micro-batch whatever its
    tokens (the adapted expert stacks, the router sums) and `per_token` bytes per token at the plan's sequence
    length (one sequence's s x s term spread over its tokens)."""

    constant: float
    per_token: float

    def micro_batch(self, tokens: int) -> float:
        """Bytes kept for a micro-batch of `tokens` tokens (micro-batch size x sequence length)."""
        return self.constant + self.per_token * tokens


def saved_bytes(
    arch: Architecture, dtype: str, adapters: AdapterPlan | None = None, seq_len: int = 64, index: int = 0, tp: int = 1
) -> SavedBytes:
    """What decoder layer `index` keeps for its backward, at sequences of `seq_len` tokens (module docstring), on one
    rank of `tp` cutting it (train/planning/tensor_parallel.py)."""
    settings = json.loads(arch.config.to_json_string(use_diff=False))
    lora = json.dumps(layer_lora(arch, adapters, index), sort_keys=True) if adapters is not None else None
    text = json.dumps(settings, sort_keys=True)
    scales = narrow_scales(settings, tp)

    def measure(scale: Fraction, tokens: int) -> int:
        return _saved_bytes(text, scale, tokens, dtype, lora, index, tp)

    t1, t2, t3 = TOKENS
    f1, f2, f3 = (measure(scales[0], tokens) for tokens in TOKENS)
    quadratic = ((f3 - f2) / (t3 - t2) - (f2 - f1) / (t2 - t1)) / (t3 - t1)  # [heads, T, T]: no width in it
    lines = [(f2 - f1) / (t2 - t1), (measure(scales[1], t2) - measure(scales[1], t1)) / (t2 - t1)]
    lines = [line - quadratic * (t1 + t2) for line in lines]
    slope = (lines[1] - lines[0]) / float(scales[1] - scales[0])  # per token and unit of scale

    def linear(scale: Fraction) -> float:
        return lines[0] + slope * float(scale - scales[0])

    constants = [measure(scale, t1) - linear(scale) * t1 - quadratic * t1 * t1 for scale in scales]
    if arch.config._attn_implementation != "eager":
        quadratic = 0.0  # a CPU artefact under SDPA (MLA's math kernel, above); GPU kernels keep no s x s
    return SavedBytes(_at_full_width(scales, constants), linear(Fraction(1)) + quadratic * seq_len)


def _at_full_width(scales: tuple[Fraction, ...], values: list[float]) -> float:
    """The parabola through (scale, value) at scale 1 (Lagrange's weights, exact in fractions)."""
    weights = [math.prod((1 - other) / (scale - other) for other in scales if other != scale) for scale in scales]
    return sum(float(weight) * value for weight, value in zip(weights, values, strict=True))


def decoder_saved_bytes(
    arch: Architecture, dtype: str, seq_len: int, adapters: AdapterPlan | None = None, tp: int = 1
) -> list[SavedBytes]:
    """`saved_bytes` of every decoder layer (on one rank of `tp`), counted once per distinct layer (parameter shapes
    and adapters)."""
    meta = arch.meta_model()
    counted: dict[str, SavedBytes] = {}
    result = []
    for layer in (layer for layer in arch.pipeline_layers() if layer.kind == DECODER):
        shapes = [(n, tuple(p.shape)) for n, p in meta.get_submodule(layer.modules[0]).named_parameters()]
        lora = layer_lora(arch, adapters, layer.decoder_index) if adapters is not None else None
        key = json.dumps([shapes, lora], sort_keys=True)
        if key not in counted:
            counted[key] = saved_bytes(arch, dtype, adapters, seq_len, layer.decoder_index, tp)
        result.append(counted[key])
    return result


@functools.lru_cache
def _saved_bytes(
    settings: str, scale: Fraction, tokens: int, dtype: str, lora_json: str | None, index: int, tp: int = 1
) -> int:
    """Bytes autograd saves in one forward of decoder layer `index` of the narrow copy at `scale`, `tokens` long (its
    rank 0's part of `tp`)."""
    import torch

    config = _config(_narrow(json.loads(settings), scale), index + 1)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    layer = DecoderLayerPipe(discover(config), index)
    cut_for_rank(getattr(layer, DECODER_ATTR), config, tp)
    if lora_json is not None:
        from peft import LoraConfig, inject_adapter_in_model

        lora = json.loads(lora_json)
        for param in layer.parameters():
            param.requires_grad_(False)
        if lora["target_modules"] or lora["target_parameters"]:
            lora["target_parameters"] = lora["target_parameters"] or None
            inject_adapter_in_model(LoraConfig(**lora), layer)
    layer = layer.to(torch_dtype).train()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, config.hidden_size, dtype=torch_dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = (hidden, torch.arange(tokens).unsqueeze(0))
        if layer.router_loss is not None:  # the router sums travel too; their softmax is kept for the backward
            probs, counts = empty_router_sums(layer.router_loss, hidden.device)
            inputs = (hidden, probs, inputs[1], counts)
        layer(inputs)
    return sum(seen.values())
