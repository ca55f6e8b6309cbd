"""Conversion between Hugging Face GPT-2 weights and pipeline layers: a renaming.

Pipeline parameter names are `<layer index>.<name inside the layer>` (and
`tied_modules.embed.<name>` for the tied embedding); `GPT2LMHeadModel` names them
`transformer.<...>`. `hf_name` is the whole mapping.
"""

import json
from pathlib import Path

import torch
from deepspeed.pipe import PipelineModule
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel

from models.gpt2_pipe import TIED_EMBEDDING_KEY

_TIED_PREFIX = f"tied_modules.{TIED_EMBEDDING_KEY}."


def hf_name(layer_idx: int, name: str, n_layer: int) -> str:
    """HF state-dict key of parameter `name` of pipeline layer `layer_idx`."""
    if layer_idx == 0 or layer_idx == n_layer + 1:  # embedding or final LayerNorm
        return f"transformer.{name}"
    if 1 <= layer_idx <= n_layer:
        return f"transformer.h.{layer_idx - 1}.{name}"
    raise ValueError(f"pipeline layer {layer_idx} has no parameters of its own (the tied LM head)")


def pipeline_param_to_hf(pipe_name: str, n_layer: int) -> str:
    """HF key of a `PipelineModule.named_parameters()` name."""
    if pipe_name.startswith(_TIED_PREFIX):
        return hf_name(0, pipe_name[len(_TIED_PREFIX) :], n_layer)
    layer, name = pipe_name.split(".", 1)
    return hf_name(int(layer), name, n_layer)


def resolve_model_dir(model: str) -> Path:
    """A local `save_pretrained` folder, or a hub name downloaded (safetensors and config only)."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


class SafetensorsCheckpoint:
    """Reads single tensors by HF name from one or several (sharded) safetensors files."""

    def __init__(self, model_dir: Path):
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
        self.model_dir = model_dir
        # Original OpenAI checkpoints name tensors without the "transformer." prefix.
        self.files = {
            (k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): (v, k)
            for k, v in weight_map.items()
        }

    def get(self, hf_key: str) -> torch.Tensor:
        if hf_key not in self.files:
            raise KeyError(f"{self.model_dir} has no tensor {hf_key}: not a GPT-2 checkpoint of this shape")
        filename, stored_key = self.files[hf_key]
        with safe_open(self.model_dir / filename, framework="pt") as f:
            return f.get_tensor(stored_key)


@torch.no_grad()
def load_hf_weights(pipe: PipelineModule, model_dir: Path, n_layer: int) -> int:
    """Copy pretrained weights into this stage's layers, reading only this stage's tensors.

    Returns the number of tensors loaded.
    """
    checkpoint = SafetensorsCheckpoint(model_dir)
    loaded = 0
    for pipe_name, param in pipe.named_parameters():
        tensor = checkpoint.get(pipeline_param_to_hf(pipe_name, n_layer))
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


def hf_state_dict_from_pipeline_checkpoint(checkpoint_dir: Path, config: GPT2Config) -> dict[str, torch.Tensor]:
    """Full GPT-2 state dict (HF names, fp32) from a DeepSpeed pipeline checkpoint tag folder.

    DeepSpeed's zero_to_fp32.py does not understand pipeline checkpoints; the per-layer
    files written by the first data-parallel replica of every stage hold the whole model.
    """
    files = layer_files(checkpoint_dir)
    expected = set(range(config.n_layer + 2))
    if missing := sorted(expected - files.keys()):
        raise FileNotFoundError(
            f"{checkpoint_dir} lacks layer files {missing}: incomplete or not a GPT-2 pipeline checkpoint"
        )
    state = {}
    for layer_idx in sorted(expected):
        layer_state = torch.load(files[layer_idx], map_location="cpu", weights_only=True)
        for name, tensor in layer_state.items():
            state[hf_name(layer_idx, name, config.n_layer)] = tensor.float()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def export_hf_model(checkpoint_dir: Path, config: GPT2Config, out_dir: Path, tokenizer=None) -> Path:
    """Write a `save_pretrained` folder (safetensors, config, tokenizer) from a pipeline checkpoint."""
    config = GPT2Config.from_dict(config.to_dict())
    config.tie_word_embeddings = True
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model.load_state_dict(hf_state_dict_from_pipeline_checkpoint(checkpoint_dir, config), strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
