"""Conversion between Hugging Face weights and pipeline layers: a renaming, for every family.

Pipeline parameter names are `<layer index>.<name inside the layer>` (and `tied_modules.embed.<name>`
for a tied embedding). Each pipeline layer keeps its HF pieces under their HF names, so the HF key is
a per-layer prefix plus that name (a decoder layer's `layer.` stands for `<prefix>.layers.<i>.`).
"""

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from deepspeed.pipe import PipelineModule
from safetensors import SafetensorError
from safetensors import safe_open as _safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from models.architecture import TIED_EMBEDDING_KEY, TIED_HEAD, Architecture, discover
from models.errors import first_line
from models.portable import make_portable

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


def _checkpoint_key_renamer(arch: Architecture):
    """transformers' own load-time renaming of checkpoint keys onto the model's (e.g. Pythia's `embed_out.` ->
    `lm_head.`, OpenAI GPT-2 keys without `transformer.`), as `from_pretrained` applies it.

    These are private transformers 5.24 functions (conversion_mapping, core_model_loading), used only here.
    Families whose checkpoints need tensor surgery (fused or split weights: WeightConverter) are refused.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    model = arch.meta_model()
    transforms = get_model_conversion_mapping(model)
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        raise ValueError(
            f"{arch.config.model_type} checkpoints store tensors that transformers fuses or splits on load (a mixture "
            "of experts' experts, one by one): reading them is not supported yet; start from --model-config instead"
        )
    model_keys = dict.fromkeys(model.state_dict())

    def rename(key: str) -> str:
        renamed, _ = rename_source_key(
            key, transforms, weight_converters=[], base_model_prefix=model.base_model_prefix, meta_state_dict=model_keys
        )
        return renamed

    return rename


class SafetensorsCheckpoint:
    """Reads single tensors by the model's HF key from one or several (sharded) safetensors files."""

    def __init__(self, model_dir: Path, arch: Architecture):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (model_dir / "model.safetensors").exists():
            with safe_open(model_dir / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{model_dir} has no model.safetensors: re-save it with save_pretrained(safe_serialization=True)"
            )
        self.model_dir, self.model_type = model_dir, arch.config.model_type
        rename = _checkpoint_key_renamer(arch)
        self.files = {rename(k): (v, k) for k, v in weight_map.items()}

    def get(self, hf_key: str) -> torch.Tensor:
        if hf_key not in self.files:
            raise ValueError(
                f"{self.model_dir} has no tensor {hf_key}: not a {self.model_type} checkpoint of this shape"
            )
        filename, stored_key = self.files[hf_key]
        with safe_open(self.model_dir / filename, framework="pt") as f:
            return f.get_tensor(stored_key)


@contextlib.contextmanager
def safe_open(path: Path, framework: str):
    """safetensors' `safe_open`, its errors (a truncated or damaged file) as a ValueError naming the file."""
    try:
        with _safe_open(path, framework=framework) as f:
            yield f
    except SafetensorError as e:
        raise ValueError(
            f"{path} cannot be read ({first_line(e)}): the file is truncated or damaged; copy or download it again"
        ) from None


def check_weights_fit(model_dir: Path, arch: Architecture) -> None:
    """Every tensor the pipeline will read is in the checkpoint, with the model's shape: read from the safetensors
    headers only (seconds for any size), so a mismatched folder fails before the ranks start."""
    checkpoint = SafetensorsCheckpoint(model_dir, arch)
    for key, param in arch.meta_model().named_parameters():  # a tied head's weight is listed once, as the embedding
        if key not in checkpoint.files:
            raise ValueError(
                f"--model {model_dir} has no tensor {key}: not a {arch.config.model_type} checkpoint of this shape"
            )
        filename, stored_key = checkpoint.files[key]
        with safe_open(model_dir / filename, framework="pt") as f:
            shape = tuple(f.get_slice(stored_key).get_shape())
        if shape != tuple(param.shape):
            raise ValueError(
                f"--model {model_dir}: {key} is {shape} in the checkpoint but {tuple(param.shape)} in "
                "its config.json; the weights and the config do not belong together"
            )


@torch.no_grad()
def load_hf_weights(pipe: PipelineModule, model_dir: Path, arch: Architecture) -> int:
    """Copy pretrained weights into this stage's layers, reading only this stage's tensors.

    A tied head reads the token embedding, so checkpoints that store no `lm_head.weight` load.
    Returns the number of tensors loaded.
    """
    checkpoint = SafetensorsCheckpoint(model_dir, arch)
    loaded = 0
    for pipe_name, param in pipe.named_parameters():
        tensor = checkpoint.get(pipeline_param_to_hf(arch, pipe_name))
        if tensor.shape != param.shape:
            raise ValueError(f"{pipe_name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        param.copy_(tensor)
        loaded += 1
    return loaded


def layer_files(checkpoint_dir: Path) -> dict[int, Path]:
    """DeepSpeed's per-layer weight files of one checkpoint tag, by layer index."""
    files = {}
    for path in sorted(checkpoint_dir.glob("layer_*-model_states.pt")):
        files[int(path.name.split("-")[0].removeprefix("layer_"))] = path
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
        layer_state = torch.load(files[layer_idx], map_location="cpu", weights_only=True)
        for name, tensor in layer_state.items():
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
    state = hf_state_dict_from_pipeline_checkpoint(checkpoint_dir, arch)
    if generation_config is not None:
        model.generation_config = GenerationConfig.from_dict(generation_config)
    model.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return make_portable(out_dir)


def weights_fingerprint(model_dir: Path) -> str:
    """A digest that tells pretrained models apart in seconds, whatever their size: every safetensors file's header
    (names, shapes, dtypes, offsets) and, of every tensor, 4 KiB from the start, the middle and the end of its
    data (~12 KiB per tensor: seconds for 70B). Two fine-tunes of one architecture share headers but not the data
    of any tensor they trained, so a LoRA checkpoint is not resumed on the wrong base unnoticed. (A change of a
    few weights outside the sampled bytes would go unseen: a full hash of 140 GB would cost minutes per launch.)"""
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = f.read(header_size)
            digest.update(header)
            for name, entry in sorted(json.loads(header).items()):
                if name == "__metadata__":
                    continue
                start, stop = entry["data_offsets"]
                for offset in sorted({start, (start + stop) // 2, max(start, stop - 4096)}):
                    f.seek(8 + header_size + offset)
                    digest.update(f.read(min(4096, stop - offset)))
    return digest.hexdigest()[:32]
