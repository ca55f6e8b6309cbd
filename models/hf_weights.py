"""Conversion between Hugging Face weights and pipeline layers: a renaming, for every family.

Pipeline parameter names are `<layer index>.<name inside the layer>` (and `tied_modules.embed.<name>`
for a tied embedding). Each pipeline layer keeps its HF pieces under their HF names, so the HF key is
a per-layer prefix plus that name (a decoder layer's `layer.` stands for `<prefix>.layers.<i>.`).
A checkpoint's stored keys become the model's HF keys as `from_pretrained` makes them, with transformers'
own conversion mapping (renamings, and the fusing of a mixture of experts' experts stored one by one):
the one place pipegpt uses those private transformers 5.24 modules.
"""

import copy
import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.pipe import PipelineModule
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig, Mxfp4Config, PretrainedConfig
from transformers.conversion_mapping import get_model_conversion_mapping  # private, transformers 5.24: see below
from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
from transformers.quantizers import AutoHfQuantizer, HfQuantizer

from models.architecture import TIED_EMBEDDING_KEY, TIED_HEAD, Architecture, discover
from models.errors import first_line
from models.portable import make_portable
from models.safetensors_files import SafetensorsFiles
from models.tensor_parallel_stage import join_layer_files

_TIED_PREFIX = f"tied_modules.{TIED_EMBEDDING_KEY}."


def hf_name(arch: Architecture, layer_idx: int, name: str) -> str:
    """HF state-dict key of parameter `name` of pipeline layer `layer_idx`."""
    return arch.pipeline_layers()[layer_idx].hf_key(name)


def pipeline_param_to_hf(arch: Architecture, pipe_name: str) -> str:
    """HF key of a `PipelineModule.named_parameters()` name."""
    if pipe_name.startswith(_TIED_PREFIX):
        return hf_name(arch, 0, pipe_name[len(_TIED_PREFIX) :])
    layer, name = pipe_name.split(".", 1)
    return hf_name(arch, int(layer), name)


def config_from_dict(settings: dict) -> PretrainedConfig:
    """The config class of `settings["model_type"]`, filled from a `to_dict()` (a checkpoint manifest)."""
    return CONFIG_MAPPING[settings["model_type"]].from_dict(settings)


@dataclass
class _Source:
    """The checkpoint tensors that make one or more of the model's tensors: one stored key renamed, or a
    transformers `WeightConverter` fed several (a mixture of experts' experts, one by one, fused on load)."""

    key: str  # the (first) model key they make
    converter: WeightConverter | None
    keys: list[tuple[str, str]] = field(default_factory=list)  # (converter's source pattern, stored key)


def _dequantizer(model_dir: Path) -> HfQuantizer | None:
    """transformers' own dequantizing loader for what the folder's config.json says its weights are stored as:
    gpt-oss's MXFP4 experts (`*_blocks`, `*_scales`), dequantized as `from_pretrained` does on a machine without
    triton kernels (`Mxfp4Config(dequantize=True)`; its ops are pure torch); None for full-precision weights."""
    config = model_dir / "config.json"
    stored = json.loads(config.read_text()).get("quantization_config") if config.exists() else None
    if stored is None:
        return None
    if stored.get("quant_method") != "mxfp4":
        raise ValueError(
            f"{model_dir} stores its weights quantized ({stored.get('quant_method')}): pipegpt reads full-precision "
            "or MXFP4 (gpt-oss) checkpoints; save a dequantized copy with from_pretrained(...).save_pretrained(...)"
        )
    return AutoHfQuantizer.from_config(Mxfp4Config(dequantize=True), pre_quantized=True)


def _checkpoint_sources(
    model: torch.nn.Module, stored_keys: Iterable[str], quantizer: HfQuantizer | None = None
) -> dict[str, _Source]:
    """Of every model key (parameters and persistent buffers), the stored tensors that make it, matched as
    `from_pretrained` matches them (transformers 5.24 `core_model_loading.convert_and_load_state_dict_in_model`, its
    first loop): every `WeightRenaming` of the family's conversion mapping (Pythia's `embed_out.` -> `lm_head.`, GPT-2
    keys without `transformer.`), then at most one `WeightConverter` (Mixtral's `experts.*.w1/w3` -> `gate_up_proj`).

    These are private transformers 5.24 functions (conversion_mapping, core_model_loading), used only in this file.
    Stored keys are taken in transformers' order (`dot_natural_key`: expert 2 before expert 10), which is the
    order its converters stack them in. `quantizer`: its dequantizing converters join the family's."""
    transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    model_keys = model.state_dict()  # meta tensors: transformers adds or strips the prefix where `.get` finds one
    prefix = model.base_model_prefix
    sources: dict[str, _Source] = {}
    for stored in sorted(stored_keys, key=dot_natural_key):
        key, pattern = rename_source_key(stored, renamings, converters, prefix, model_keys)
        if key not in model_keys and stored in model_keys:  # as transformers: keep a key the renamings broke
            key, pattern = rename_source_key(stored, [], [], prefix, model_keys)
        if key not in model_keys:
            continue  # not this model's (transformers reports it as unexpected)
        if pattern is None:
            sources[key] = _Source(key, None, [(stored, stored)])
            continue
        converter = by_pattern[pattern]
        source = sources.setdefault(key, _Source(key, converter))
        source.keys.append((pattern, stored))
        for target in converter.target_patterns[1:]:  # one stored tensor split in several (fused q/k/v)
            sources.setdefault(key.replace(converter.target_patterns[0], target), source)
    return sources


def _converted(source: _Source, read: Callable[[str], torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """The model tensors `source` makes (named by model key), through the converter's own operations; `read(stored
    key)` gives a stored tensor (or a meta tensor of its shape, for a header-only check)."""
    if source.converter is None:
        return {source.key: read(source.keys[0][1])}
    converter = copy.deepcopy(source.converter)
    for pattern, stored in source.keys:
        converter.add_tensor(source.key, stored, pattern, functools.partial(read, stored))  # read in `convert`
    try:
        made = converter.convert(source.key, model=arch.meta_model(), config=arch.config)
    except RuntimeError as e:  # e.g. torch.stack of experts of different shapes
        raise ValueError(
            f"the {len(source.keys)} stored tensors that make {source.key} ({source.keys[0][1]}, ...) do not fuse "
            f"({first_line(e)}); the weights and the config do not belong together"
        ) from None
    return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}


def _model_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s parameters (a tied weight once) and persistent buffers (DeepSeek-V3's `e_score_correction_bias`,
    which steers its routing), by state-dict name: everything a checkpoint must give it."""
    state = module.state_dict(keep_vars=True)
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


class SafetensorsCheckpoint(SafetensorsFiles):
    """A `save_pretrained` folder read by the model's HF keys, as `from_pretrained` reads it: renamed, and fused or
    split by transformers' own conversion operations where the family's checkpoints store tensors otherwise (a
    mixture of experts' experts one by one). A context (SafetensorsFiles): only the files holding what is read open."""

    def __init__(self, model_dir: Path, arch: Architecture):
        super().__init__(model_dir)
        self.arch = arch
        try:
            self.sources = _checkpoint_sources(arch.meta_model(), self.weight_map, _dequantizer(model_dir))
        except ValueError:
            self.close()  # a single file was opened to list its keys
            raise

    def _source(self, hf_key: str, flag: str = "") -> _Source:
        if hf_key not in self.sources:
            raise ValueError(
                f"{flag}{self.model_dir} has no tensor {hf_key}: not a {self.arch.config.model_type} checkpoint "
                "of this shape"
            )
        return self.sources[hf_key]

    def read(self, hf_keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF key, tensor) of each of `hf_keys`, reading only their stored tensors, each converter run once."""
        wanted = list(hf_keys)
        done: dict[int, dict[str, torch.Tensor]] = {}
        for key in wanted:
            source = self._source(key)
            if id(source) not in done:  # a split tensor's parts come from one conversion
                done = {id(source): _converted(source, self.tensor, self.arch)}
            yield key, done[id(source)][key]

    def shapes(self, hf_keys: Iterable[str], flag: str = "") -> dict[str, tuple[int, ...]]:
        """The shape of each of `hf_keys` as loading would make it, from the files' headers only: the converters run
        on meta tensors."""
        sources = {key: self._source(key, flag) for key in hf_keys}
        stored = dict(super().shapes({k for source in sources.values() for _, k in source.keys}))
        shapes = {}
        for key, source in sources.items():
            if key not in shapes:
                made = _converted(source, lambda k: torch.empty(stored[k], device="meta"), self.arch)
                shapes |= {k: tuple(t.shape) for k, t in made.items()}
        return {key: shapes[key] for key in sources}


def check_weights_fit(model_dir: Path, arch: Architecture) -> None:
    """Every tensor the pipeline will read is in the checkpoint, with the model's shape: read from the safetensors
    headers only (seconds for any size; fused experts are fused on meta tensors), so a mismatched folder fails before
    the ranks start."""
    expected = _model_tensors(arch.meta_model())  # a tied head's weight is listed once, as the embedding
    with SafetensorsCheckpoint(model_dir, arch) as checkpoint:
        shapes = checkpoint.shapes(expected, flag="--model ")
    for key, tensor in expected.items():
        if shapes[key] != tuple(tensor.shape):
            raise ValueError(
                f"--model {model_dir}: {key} is {shapes[key]} in the checkpoint but {tuple(tensor.shape)} in "
                "its config.json; the weights and the config do not belong together"
            )


@torch.no_grad()
def load_hf_weights(pipe: PipelineModule, model_dir: Path, arch: Architecture) -> int:
    """Copy pretrained weights into this stage's layers: every parameter and persistent buffer, reading only the
    files that hold this stage's tensors (fused from experts stored one by one where the family needs it).

    A tied head reads the token embedding, so checkpoints that store no `lm_head.weight` load.
    Returns the number of tensors loaded.
    """
    mine = {pipeline_param_to_hf(arch, name): tensor for name, tensor in _model_tensors(pipe).items()}
    with SafetensorsCheckpoint(model_dir, arch) as checkpoint:
        for key, tensor in checkpoint.read(mine):
            if tensor.shape != mine[key].shape:
                raise ValueError(
                    f"{model_dir}: {key} is {tuple(tensor.shape)} in the checkpoint but {tuple(mine[key].shape)} "
                    "in the model; the weights and the config do not belong together"
                )
            mine[key].copy_(tensor)
    return len(mine)


def layer_files(checkpoint_dir: Path) -> dict[int, list[Path]]:
    """DeepSpeed's per-layer weight files of one checkpoint tag, by layer index: one file a layer, or with tensor
    parallelism one a slice rank (`layer_NN-model_MM-model_states.pt`), in slice-rank order."""
    files: dict[int, list[Path]] = {}
    for path in sorted(checkpoint_dir.glob("layer_*-model_states.pt")):
        files.setdefault(int(path.name.split("-")[0].removeprefix("layer_")), []).append(path)
    return files


def hf_state_dict_from_pipeline_checkpoint(checkpoint_dir: Path, arch: Architecture) -> dict[str, torch.Tensor]:
    """Full state dict (HF names, fp32) from a DeepSpeed pipeline checkpoint tag folder.

    DeepSpeed's zero_to_fp32.py does not understand pipeline checkpoints; the per-layer
    files written by the first data-parallel replica of every stage hold the whole model.
    """
    files = layer_files(checkpoint_dir)
    layers = arch.pipeline_layers()
    expected = {i for i, layer in enumerate(layers) if layer.kind != TIED_HEAD}  # a tied head's file is the embedding's
    if missing := sorted(expected - files.keys()):
        raise FileNotFoundError(
            f"{checkpoint_dir} lacks layer files {missing}: incomplete or not a pipeline checkpoint of this model"
        )
    state = {}
    for layer_idx in sorted(expected):
        for name, tensor in join_layer_files(files[layer_idx], arch, layer_idx).items():
            state[layers[layer_idx].hf_key(name)] = tensor.float()
    if arch.tied:
        state[f"{arch.head}.weight"] = state[f"{arch.prefix}.{arch.token_embedding}.weight"]
    return state


def export_hf_model(
    checkpoint_dir: Path,
    config: PretrainedConfig,
    *,
    out_dir: Path,
    tokenizer=None,
    generation_config: dict | None = None,
) -> Path:
    """Write a `save_pretrained` folder (safetensors, config, tokenizer) from a pipeline checkpoint, readable by
    transformers 4.x as by 5.x (models/portable.py). `generation_config`: the pretrained model's (its stop tokens
    and sampling defaults: Llama-3-Instruct stops at <|eot_id|> only through it), else one from the config."""
    arch = discover(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.config)
    if hasattr(model.config, "quantization_config"):  # read dequantized (gpt-oss's MXFP4): the export is full precision
        del model.config.quantization_config
    state = hf_state_dict_from_pipeline_checkpoint(checkpoint_dir, arch)
    if generation_config is not None:
        model.generation_config = GenerationConfig.from_dict(generation_config)
    model.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return make_portable(out_dir)
