"""LoRA through the pipeline with `peft`'s own layers: which modules get adapters, the adapters on each stage, and
the adapter folder PEFT loads.

- **Which modules.** `plan_adapters` lets peft itself match a `LoraConfig` against the whole model, built on the meta
  device (`get_peft_model`: "all-linear", lists of names, regexes, `layers_to_transform`, `exclude_modules`,
  `rank_pattern`, `target_parameters`), so a target means here exactly what it means to peft. The result is every
  adapted module's HF name with its rank and alpha, and every adapted parameter's (a MoE's fused experts:
  `models/lora_targets.py`).
- **On each stage.** `add_adapters` gives each pipeline layer of a built stage the adapters of its own modules
  (`add_layer_adapters`, with `inject_adapter_in_model`), seeded per layer (the same adapters whatever the layout),
  after the base weights are loaded, and freezes everything else: only `lora_` parameters train.
- **Out.** `adapter_state` renames a layer's adapter tensors to PEFT's keys (`base_model.model.<HF name>.lora_A.weight`)
  and `save_adapter` writes `adapter_config.json` and `adapter_model.safetensors` as `PeftModel.save_pretrained` does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from models.architecture import TIED_HEAD, Architecture, PipelineLayer, is_conv1d, is_linear
from models.errors import first_line
from models.lora_targets import parameter_adapter_size, quiet_peft, wrapped_parameter

if TYPE_CHECKING:
    from peft import LoraConfig

    from models.pipeline import CausalLMPipeline

# peft is imported where it is used: importing peft 0.21 imports bitsandbytes and transformers' generation code
# (~4 s of CPU on a 2-core machine), which a run without adapters, and every preflight, does without.

ADAPTER = "default"  # peft's adapter name; PEFT's files drop it from the keys
PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the HF names in its adapter files
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# LoraConfig settings that cannot work through the pipeline (module wrappers the stages would have to share).
UNSUPPORTED = {
    "modules_to_save": "train those modules fully instead (without LoRA), or leave them frozen",
    "trainable_token_indices": "not supported through the pipeline",
    "layer_replication": "not supported through the pipeline",
}


@dataclass(frozen=True)
class AdapterPlan:
    """The LoRA adapters of a run: peft's config (targets expanded as peft expands them) and each adapted module's
    HF name with its (rank, alpha); `parameters`: each parameter peft adapts itself (`target_parameters`, a
    `lora.ParamWrapper`: the experts' fused weights), by HF name; `initial`: adapter weights to start from (a PEFT
    adapter folder's)."""

    config: LoraConfig
    targets: dict[str, tuple[int, float]]
    initial: Path | None = None
    parameters: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """What checkpoints record, to refuse a resume with other adapters."""
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in self.config.to_dict().items()}
        listed = {"targets": self.targets, "parameters": self.parameters}
        return {"config": config} | {key: {k: list(v) for k, v in d.items()} for key, d in listed.items()}


def lora_settings(settings: dict) -> dict:
    """The `LoraConfig` fields of a saved config dict (`LoraConfig.to_dict()` or an adapter_config.json)."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    return {k: v for k, v in settings.items() if k in fields}


def read_peft_config(path: Path) -> tuple[LoraConfig, Path | None]:
    """A `LoraConfig` from `adapter_config.json` (or a folder holding one), and the folder's adapter weights if it
    has them (training then starts from them). ValueError on anything that is not a LoRA config."""
    from peft import LoraConfig

    file = path / CONFIG_FILE if path.is_dir() else path
    try:
        settings = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--peft-config {path}: cannot read {file.name} ({e})") from None
    if settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"--peft-config {path}: a {settings['peft_type']} adapter; pipegpt trains LoRA adapters")
    try:
        config = LoraConfig(**lora_settings(settings))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--peft-config {path}: not a valid LoraConfig ({e})") from None
    # peft writes adapter_model.safetensors, and before 0.6 (or with safe_serialization=False) adapter_model.bin.
    weights = next((w for w in (file.parent / WEIGHTS_FILE, file.parent / "adapter_model.bin") if w.is_file()), None)
    return config, weights


def plan_adapters(arch: Architecture, config: LoraConfig, initial: Path | None = None) -> AdapterPlan:
    """Every module peft adapts under `config` in this model, found by peft on the meta model (no memory)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    for setting, fix in UNSUPPORTED.items():
        if getattr(config, setting, None):
            raise ValueError(f"LoRA setting {setting}={getattr(config, setting)!r}: {fix}")
    if config.bias != "none":
        raise ValueError(f"LoRA bias={config.bias!r}: only 'none' (biases stay frozen) works through the pipeline")
    if config.r < 1:
        raise ValueError(f"LoRA rank {config.r}: must be at least 1")
    if config.target_parameters and config.lora_dropout:  # peft's ParamWrapper cannot drop out its input
        raise ValueError(
            f"LoRA dropout {config.lora_dropout} with adapters on parameters (the experts: target_parameters "
            f"{sorted(config.target_parameters)}): peft 0.21 has no dropout there; use --lora-dropout 0 or "
            "--lora-target-parameters none"
        )
    model = copy.deepcopy(arch.meta_model())
    try:
        with torch.device("meta"), quiet_peft():
            peft_model = get_peft_model(model, dataclasses.replace(config, base_model_name_or_path=None))
    except ValueError as e:  # peft: "Target modules {...} not found in the base model", or another bad setting
        if "not found in the base model" not in str(e):
            raise ValueError(f"LoRA config: {first_line(e)}") from None
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if is_linear(m) and n})
        wanted = config.target_modules
        wanted = wanted if isinstance(wanted, str) else ", ".join(sorted(wanted))
        raise ValueError(
            f"LoRA target modules {wanted}: not found in this {arch.config.model_type} model; its linear layers: "
            f"{', '.join(linear)}"
        ) from None
    targets, parameters = {}, {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            parameters[wrapped_parameter(name, module.parameter_name)] = (module.r[ADAPTER], module.lora_alpha[ADAPTER])
        elif isinstance(module, LoraLayer):
            targets[name] = (module.r[ADAPTER], module.lora_alpha[ADAPTER])
    _check_parameters_found(arch, config, parameters)
    layers = arch.pipeline_layers()
    if arch.tied and arch.head in targets:
        raise ValueError(f"LoRA on {arch.head}: this model ties its LM head to the embedding; target other modules")
    if outside := [name for name in targets | parameters if _owner(layers, name) is None]:  # e.g. a rotary module
        raise ValueError(f"LoRA on {outside[0]}: not a module of any pipeline layer; target the decoder's modules")
    expanded = peft_model.peft_config[ADAPTER]  # "all-linear" replaced by the module names it matched
    return AdapterPlan(
        config=dataclasses.replace(expanded, base_model_name_or_path=config.base_model_name_or_path),
        targets=targets,
        initial=initial,
        parameters=parameters,
    )


def _check_parameters_found(arch: Architecture, config: LoraConfig, parameters: dict[str, tuple[int, float]]) -> None:
    """peft only warns about target_parameters that match nothing: here that is one error line."""
    for wanted in sorted(config.target_parameters or []):
        if not any(name == wanted or name.endswith("." + wanted) for name in parameters):
            found = sorted({n.split(".", 3)[-1] for n, p in arch.meta_model().named_parameters() if p.ndim == 3})
            raise ValueError(
                f"LoRA target parameter {wanted}: not found in this {arch.config.model_type} model; its expert "
                f"weights: {', '.join(found) or 'none (a dense model)'}"
            )


def _owner(layers: list[PipelineLayer], hf_name: str) -> PipelineLayer | None:
    """The pipeline layer holding the HF module `hf_name` (not the tied head: it holds the embedding again)."""
    return next((layer for layer in layers if layer.kind != TIED_HEAD and _inside(layer, hf_name)), None)


def add_adapters(pipe: CausalLMPipeline, plan: AdapterPlan, seed: int) -> int:
    """peft's LoRA layers on this stage's modules that `plan` targets, each layer's adapters initialised from
    (seed, layer index) so that every layout starts from the same ones; every other parameter is frozen.
    With `plan.initial`, the adapters start from that PEFT adapter file. Returns the adapted modules."""
    layers, adapted = pipe.arch.pipeline_layers(), 0
    for index, module in pipe.stage_modules():  # not the tied head: it calls the embedding's module
        adapted += add_layer_adapters(module, layers[index], plan, seed=seed * 1_000_003 + index)
        if plan.initial is not None:
            load_initial_adapters(module, layers[index], plan.initial)
    for name, param in pipe.named_parameters():  # the tied head's copy of the embedding too
        param.requires_grad_("lora_" in name)
    return adapted


def add_layer_adapters(layer_module: nn.Module, layer: PipelineLayer, plan: AdapterPlan, seed: int) -> int:
    """Inject this layer's adapters (peft's LoRA layers, initialised from `seed`) and freeze the rest of the layer.
    Returns the number of adapted modules."""
    mine, params = (
        {layer.local_name(n): ra for n, ra in found.items() if layer.kind != TIED_HEAD and _inside(layer, n)}
        for found in (plan.targets, plan.parameters)
    )  # (the tied head's module is the embedding's, which gets its adapters, if any, as layer 0)
    if mine or params:
        exact = {re.escape(name): ra for name, ra in (mine | params).items()}
        config = dataclasses.replace(
            plan.config,
            target_modules=sorted(mine),
            target_parameters=sorted(params) or None,
            layers_to_transform=None,
            layers_pattern=None,
            exclude_modules=None,
            rank_pattern={k: r for k, (r, _) in exact.items()},
            alpha_pattern={k: a for k, (_, a) in exact.items()},
        )
        from peft import inject_adapter_in_model

        with torch.random.fork_rng(devices=[]), quiet_peft():
            torch.manual_seed(seed)
            inject_adapter_in_model(config, layer_module, adapter_name=ADAPTER)
    for name, param in layer_module.named_parameters():
        param.requires_grad_("lora_" in name)
    return len(mine) + len(params)


def _inside(layer: PipelineLayer, hf_name: str) -> bool:
    return any(hf_name == m or hf_name.startswith(m + ".") for m in layer.modules)


def peft_key(layer: PipelineLayer, name: str) -> str:
    """PEFT's key, in an adapter file, of the adapter parameter `name` of the pipeline layer."""
    return PEFT_PREFIX + layer.hf_key(name).replace(f".{ADAPTER}.", ".")


def adapter_state(layer: PipelineLayer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's adapter tensors (from its module or its checkpoint file) under PEFT's keys."""
    return {peft_key(layer, name): tensor for name, tensor in state.items() if "lora_" in name}


def load_initial_adapters(layer_module: nn.Module, layer: PipelineLayer, weights: Path) -> int:
    """Copy a PEFT adapter file's tensors into this layer's adapters; returns how many. A tensor the layer expects
    but the file lacks (or of another shape) is a ValueError."""
    from peft.utils import load_peft_weights

    stored = load_peft_weights(str(weights.parent), device="cpu")  # either format, safetensors first as peft reads
    loaded = 0
    with torch.no_grad():
        for name, param in layer_module.named_parameters():
            if "lora_" not in name:
                continue
            key = peft_key(layer, name)
            if key not in stored or stored[key].shape != param.shape:
                found = "missing" if key not in stored else f"{tuple(stored[key].shape)}, expected {tuple(param.shape)}"
                raise ValueError(f"adapter file {weights}: {key} {found}; was it trained with this LoRA config?")
            param.copy_(stored[key])
            loaded += 1
    return loaded


def save_adapter(out_dir: Path, plan: AdapterPlan, tensors: dict[str, torch.Tensor], base_model: str | None) -> Path:
    """A PEFT adapter folder: `adapter_config.json` (peft's own writer) and `adapter_model.safetensors`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(plan.config, base_model_name_or_path=base_model, inference_mode=True)
    config.save_pretrained(str(out_dir))
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(out_dir / WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    return out_dir


def adapter_parameters(arch: Architecture, plan: AdapterPlan) -> list[int]:
    """Adapter parameters of every pipeline layer (in_features x r + r x out_features per module; DoRA adds a
    magnitude vector of out_features; an adapted parameter: `parameter_adapter_size`), from the meta model."""
    model = arch.meta_model()
    counts = [0] * len(arch.pipeline_layers())
    layers = arch.pipeline_layers()
    for name, (rank, _) in plan.parameters.items():
        counts[layers.index(_owner(layers, name))] += parameter_adapter_size(model.get_parameter(name).shape, rank)
    for name, (rank, _) in plan.targets.items():
        module = model.get_submodule(name)
        weight = module.weight
        if isinstance(module, nn.Embedding) or is_conv1d(module):
            fan_in, fan_out = weight.shape
        else:
            fan_out, fan_in = weight.shape
        count = rank * (fan_in + fan_out) + (fan_out if plan.config.use_dora else 0)
        counts[layers.index(_owner(layers, name))] += count
    return counts


def adapters_from_checkpoint(checkpoint_dir: Path, arch: Architecture) -> dict[str, torch.Tensor]:
    """Every adapter tensor of a LoRA pipeline checkpoint (its per-layer files), under PEFT's keys, fp32."""
    from models.hf_weights import layer_files

    layers, tensors = arch.pipeline_layers(), {}
    for index, paths in layer_files(checkpoint_dir).items():  # one file a layer: LoRA is refused with TP
        state = torch.load(paths[0], map_location="cpu", weights_only=True)
        tensors |= {k: v.float() for k, v in adapter_state(layers[index], state).items()}
    return tensors


def merged_model(base_dir: Path, adapter_dir: Path) -> nn.Module:
    """The base model with the adapters merged into its weights (peft's `merge_and_unload`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
