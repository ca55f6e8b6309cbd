"""What `--lora-rank` adapts: its `LoraConfig`, and on a mixture of experts the experts' fused weights too.

transformers 5.24 stacks a MoE layer's experts into 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]; gpt-oss [E, in, out]), which no `nn.Linear` holds. peft 0.21 adapts them
through `LoraConfig(target_parameters=[...])`: a `lora.ParamWrapper` around the experts module (nested, one per
parameter: the first-registered parameter, gate_up_proj, inside), with lora_A [E*r, in] and lora_B [out, E*r],
which adds `scaling * B_e @ A_e` to each expert's weight while the module runs (`torch.nn.utils.parametrize`), so
any `experts_implementation` (eager, batched_mm, grouped_mm) sees the adapted weights. It has no dropout, DoRA or
lora_bias. Its files' keys are the experts module's (`...mlp.experts.lora_A.weight` for down_proj,
`...mlp.experts.base_layer.lora_A.weight` for gate_up_proj).

The default, in every MoE family: the linear layers peft's "all-linear" matches (attention, shared experts, dense
MLPs) and every 3-D parameter of the decoder layers (the experts; their biases and the routers are 2-D: no
router is adapted, and no router is an `nn.Linear` in these families). The linear layers are handed to peft as a
list of names, not as "all-linear": in the families whose checkpoints transformers converts (qwen3_moe, olmoe,
mixtral, deepseek_v2/v3, glm4_moe), peft 0.21.2 (utils/transformers_weight_conversion.py) reads "all-linear" as
transformers 4 meant it, router (`gate.weight`) included, and rewrites the transformers-4 expert names
(`gate_proj`, `up_proj`, `down_proj`, `w1`-`w3`, `gate`) among target_modules into target_parameters; the names
of dense MLPs and shared experts that coincide are left out here, since peft would move them to the experts (and
do so again when it loads the adapter with `PeftModel.from_pretrained`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from models.architecture import Architecture, is_linear

if TYPE_CHECKING:
    from peft import LoraConfig

ALL_LINEAR = "all-linear"
NO_PARAMETERS = "none"  # `--lora-target-parameters none`: no adapters on the experts


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Without the warnings peft 0.21 gives, on every rank, about what it then handles itself: GPT-2's Conv1D sets
    fan_in_fan_out, "all-linear" on a tied model mentions `ensure_weight_tying` (the tied head takes no adapter
    here, as in peft's model), peft calls transformers 5.24's deprecated `is_gradient_checkpointing`, and target
    parameters that match nothing (a RuntimeWarning; `plan_adapters` refuses them in one line). They would break
    the preflight's one-line errors and fill every rank's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def lora_config(
    *,
    rank: int,
    alpha: float | None,
    dropout: float,
    target_modules: str | list[str] | None,
    base_model: str | None,
    target_parameters: list[str] | None = None,
) -> LoraConfig:
    """The `LoraConfig` of `--lora-rank` and its flags (alpha defaults to the rank: a scale of 1)."""
    from peft import LoraConfig

    targets = ALL_LINEAR if not target_modules or target_modules == [ALL_LINEAR] else target_modules
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=targets,
        target_parameters=target_parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def expert_parameters(arch: Architecture) -> list[str]:
    """The experts' fused weights, by their names inside a decoder layer (`mlp.experts.gate_up_proj`): every 3-D
    parameter of the decoder layers (peft matches target_parameters by such suffixes)."""
    meta = arch.meta_model()
    return sorted(
        {
            name
            for index in range(arch.num_layers)
            for name, param in meta.get_submodule(arch.layer_path(index)).named_parameters()
            if param.ndim == 3
        }
    )


def lora_targets(
    arch: Architecture, modules: list[str] | None, parameters: list[str] | None
) -> tuple[str | list[str], list[str] | None]:
    """(target_modules, target_parameters) of `--lora-target-modules` and `--lora-target-parameters` (None: the
    default; ["none"]: no expert adapters). On a dense model the default is "all-linear" and no parameters."""
    experts = expert_parameters(arch)
    if parameters is None:
        parameters = experts
    elif parameters == [NO_PARAMETERS]:
        parameters = []
    if modules and modules != [ALL_LINEAR]:
        return modules, parameters or None
    if not experts:
        return ALL_LINEAR, parameters or None
    return _linear_names_peft_keeps(arch), parameters or None


def _linear_names_peft_keeps(arch: Architecture) -> list[str]:
    """The leaf names of the linear layers "all-linear" matches (every one but the LM head), less those peft 0.21.2
    turns into expert parameters in this family: asked of peft itself, on the meta model."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(arch.meta_model())
    names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if n and n != arch.head and is_linear(m)})
    with torch.device("meta"), quiet_peft():
        peft_model = get_peft_model(model, LoraConfig(target_modules=names))
    return sorted(set(names) & set(peft_model.peft_config["default"].target_modules))


def wrapped_parameter(module_name: str, parameter_name: str) -> str:
    """The HF name of the parameter a `lora.ParamWrapper` named `module_name` adapts: nested wrappers add
    `.base_layer` to the experts module's name."""
    return module_name.replace(".base_layer", "") + "." + parameter_name


def parameter_adapter_size(shape: torch.Size, rank: int) -> int:
    """Adapter weights of a ParamWrapper on a parameter of `shape`: r per expert on both sides (E x r x (in + out));
    a 2-D parameter is one expert."""
    experts, *sides = shape if len(shape) == 3 else (1, *shape)
    return rank * experts * sum(sides)
