"""LoRA from the flags: `--lora-rank` and its flags or `--peft-config`, resolved once into an `AdapterPlan`, with
the checks that need the layout (every stage must train something) and the checkpoint (the same adapters on the
same base).
"""

import dataclasses
import json

from transformers import PretrainedConfig

from models.architecture import discover, ranges_text
from models.lora import AdapterPlan, adapter_parameters, plan_adapters, read_peft_config
from models.lora_targets import lora_config, lora_targets
from models.quantize import Quantization, check_4bit_available
from train.config.args import Flags
from train.errors import ConfigError, first_line

LORA_FLAGS = ("lora_alpha", "lora_target_modules", "lora_target_parameters")


def adapters_from_flags(flags: Flags, model_config: PretrainedConfig, need_base: bool = True) -> AdapterPlan | None:
    """The run's adapters, or None for full training (every weight trains). `need_base=False`: the planner, which
    plans a preset's shape without its weights."""
    given = [f"--{name.replace('_', '-')}" for name in LORA_FLAGS if getattr(flags, name) is not None]
    if flags.lora_dropout:
        given.append("--lora-dropout")
    if getattr(flags, "merge_adapter", False):  # a trainer flag (the planner has none)
        given.append("--merge-adapter")
    if flags.lora_rank is None and flags.peft_config is None:
        if flags.load_in_4bit:
            given.append("--load-in-4bit")
        if given:
            raise ConfigError(f"{' '.join(given)} without --lora-rank: pass --lora-rank R to train LoRA adapters")
        return None
    if flags.lora_rank is not None and flags.peft_config is not None:
        raise ConfigError("--lora-rank and --peft-config both given: the LoRA config comes from one of them")
    given = [flag for flag in given if flag != "--merge-adapter"]
    if flags.peft_config is not None and given:
        raise ConfigError(f"{' '.join(given)} with --peft-config: set them in its adapter_config.json instead")
    if flags.model is None and need_base:
        raise ConfigError("LoRA trains adapters on a pretrained base model: pass --model (a folder or a hub name)")
    initial = None
    try:
        arch = discover(model_config)
        if flags.peft_config is not None:
            config, initial = read_peft_config(flags.peft_config)
            config.base_model_name_or_path = flags.model
        else:
            modules, parameters = lora_targets(arch, flags.lora_target_modules, flags.lora_target_parameters)
            config = lora_config(
                rank=flags.lora_rank,
                alpha=flags.lora_alpha,
                dropout=flags.lora_dropout,
                target_modules=modules,
                target_parameters=parameters,
                base_model=flags.model,
            )
        return plan_adapters(arch, config, initial)
    except ValueError as e:
        raise ConfigError(first_line(e)) from None


def check_every_stage_trains(
    plan: AdapterPlan, model_config: PretrainedConfig, ranks: list[list[tuple[int, int]]]
) -> None:
    """DeepSpeed 0.19.8 needs a trainable parameter on every pipeline rank (an empty optimizer, ZeRO's partitioning
    and clipping fail otherwise): each rank (`ranks`: the [start, stop) of its stages) must hold an adapter."""
    counts = adapter_parameters(discover(model_config), plan)
    for rank, ranges in enumerate(ranks):
        if sum(sum(counts[start:stop]) for start, stop in ranges) == 0:
            raise ConfigError(
                f"pipeline stage {rank} (layers {ranges_text(ranges)}) holds no LoRA adapter, and DeepSpeed needs "
                "a trainable parameter on every stage: use fewer stages, --partition-method flops, or target "
                "modules on every stage"
            )


# LoraConfig settings that change the function the adapters compute, not their shapes: a checkpoint's adapters
# still load under others (--reset-optimizer), but an exact resume with them would change the maths (use_rslora
# scales by alpha / sqrt(r) instead of alpha / r: x2 at r = 4).
SCALE_SETTINGS = ("lora_alpha", "alpha_pattern", "use_rslora", "lora_dropout")
# Those that change which tensors exist: a checkpoint's adapters cannot load under others.
SHAPE_SETTINGS = ("r", "rank_pattern", "use_dora", "target_modules", "exclude_modules", "layers_to_transform")


def _as_saved(value: object) -> object:
    return json.loads(json.dumps(value, sort_keys=True, default=str))  # sets as sorted lists, tuples as lists


def _differences(saved: dict, ours: dict, keys: tuple[str, ...]) -> list[str]:
    return [f"{key} {saved.get(key)!r} vs {ours.get(key)!r}" for key in keys if saved.get(key) != ours.get(key)]


def check_same_adapters(saved: dict, plan: AdapterPlan, reset_optimizer: bool) -> None:
    """The adapters of the flags are the checkpoint's: the same modules and ranks (else they cannot load), and the
    same scale and dropout (else only with --reset-optimizer, which says so by starting a new optimizer)."""
    ours, saved = _as_saved(plan.to_dict()), _as_saved(saved)
    shapes = _differences(saved["config"], ours["config"], SHAPE_SETTINGS)
    ranks = [  # adapted modules, and a mixture of experts' adapted parameters (peft's target_parameters)
        {k: v[0] for k, v in adapters.get(kind, {}).items()}
        for adapters in (saved, ours)
        for kind in ("targets", "parameters")
    ]
    if shapes or ranks[:2] != ranks[2:]:
        raise ConfigError(
            f"--load names a LoRA checkpoint with other adapters (modules or ranks) than these flags give "
            f"({'; '.join(shapes) or 'adapted modules or parameters differ'}; checkpoint vs flags): pass the LoRA "
            "flags or --peft-config it was trained with"
        )
    scales = _differences(saved["config"], ours["config"], SCALE_SETTINGS)
    if scales and not reset_optimizer:
        raise ConfigError(
            f"--load names a LoRA checkpoint trained with other LoRA settings ({'; '.join(scales)}; checkpoint vs "
            "flags), which change what its adapters compute: pass the settings it was trained with, or "
            "--reset-optimizer to go on from its adapters under these"
        )


def check_checkpoint_adapters(
    manifest: dict,
    plan: AdapterPlan | None,
    base_fingerprint: str | None,
    quantization: Quantization | None,
    reset_optimizer: bool = False,
) -> None:
    """A checkpoint resumes only with the adapters, the base model and the base's precision it was trained with."""
    saved = manifest.get("adapters")
    if saved is None and plan is not None:
        raise ConfigError(
            "--load names a checkpoint of full training, which holds every weight, not LoRA adapters: resume it "
            "without --lora-rank/--peft-config, or export it (python -m train.export) and pass that as --model"
        )
    if saved is not None and plan is None:
        raise ConfigError(
            "--load names a LoRA checkpoint (adapters only): resume it with the same --model and "
            "--lora-rank/--peft-config as the run that saved it"
        )
    if plan is None:
        return
    check_same_adapters(saved, plan, reset_optimizer)
    saved_quantization = manifest.get("quantization")
    if saved_quantization != (dataclasses.asdict(quantization) if quantization is not None else None):
        saved_text = (
            "a 4-bit base ({quant_type}, double_quant={double_quant})".format(**saved_quantization)
            if (saved_quantization)
            else "a full-precision base"
        )
        raise ConfigError(
            f"--load names a LoRA checkpoint trained on {saved_text}: resume it with the same --load-in-4bit "
            "and --bnb-4bit-* flags"
        )
    if base_fingerprint is not None and manifest.get("base_model_fingerprint") not in (None, base_fingerprint):
        raise ConfigError(
            f"--load names a LoRA checkpoint trained on another base model (it was {manifest.get('base_model')}, "
            f"whose weights' fingerprint was {manifest.get('base_model_fingerprint')}; --model's is {base_fingerprint})"
            ": adapters only fit the weights they were trained on; pass that model as --model"
        )


def quantization_from_flags(flags: Flags, adapters: AdapterPlan | None) -> Quantization | None:
    """QLoRA's 4-bit base (`--load-in-4bit`), or None; checked to run on this device."""
    if not flags.load_in_4bit:
        return None
    if adapters is None:  # adapters_from_flags has refused --load-in-4bit without LoRA already
        raise ConfigError("--load-in-4bit without --lora-rank: a 4-bit base can only be frozen (QLoRA)")
    try:
        check_4bit_available()
    except ValueError as e:
        raise ConfigError(first_line(e)) from None
    return Quantization(quant_type=flags.bnb_4bit_quant_type, double_quant=flags.bnb_4bit_double_quant)
