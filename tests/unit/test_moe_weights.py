"""Mixture-of-experts checkpoints as transformers 5.24's `save_pretrained` writes them (experts one by one, sharded)
read per stage: each stage of a 2-stage pipeline gets exactly the HF model's tensors (experts fused by transformers'
own conversion operations, persistent buffers included), opening only the shards that hold them; the header-only
preflight check accepts such a folder and names a missing or misshapen expert in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import models.safetensors_files
from models.architecture import discover
from models.hf_weights import check_weights_fit, load_hf_weights, pipeline_param_to_hf
from tests.cases import MOE_CASES, hf_model, pipeline_stage

MOE_IDS = [family for family, _, _ in MOE_CASES]


@pytest.fixture
def opened_files(monkeypatch) -> list[str]:
    """The names of the safetensors files opened, in order (safetensors' own `safe_open`, recorded)."""
    opened, real = [], models.safetensors_files._safe_open

    def recording(path, framework):
        opened.append(path.name)
        return real(path, framework=framework)

    monkeypatch.setattr(models.safetensors_files, "_safe_open", recording)
    return opened


def stored_keys_under(folder, modules: tuple[str, ...]) -> dict[str, str]:
    """The stored keys of the checkpoint below any of `modules` (HF module paths), with their files."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {key: file for key, file in weight_map.items() if key.startswith(tuple(f"{m}." for m in modules))}


@pytest.mark.parametrize(("family", "what", "settings"), MOE_CASES, ids=MOE_IDS)
def test_each_stage_reads_exactly_its_tensors_from_only_its_shards(
    family, what, settings, tmp_path, opened_files, one_rank_group
):
    hf = hf_model(family, settings)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")  # experts one by one, over ~20 shards
    all_files = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(all_files) > 5
    arch, theirs = discover(hf.config), hf.state_dict()
    loaded = set()
    for stage in range(2):
        pipe = pipeline_stage(arch, 2, stage)
        opened_files.clear()
        state = pipe.state_dict()
        assert load_hf_weights(pipe, tmp_path, arch) == len(state)
        for name, tensor in pipe.state_dict().items():
            key = pipeline_param_to_hf(arch, name)
            assert torch.equal(tensor, theirs[key]), key
            loaded.add(key)
        layers = arch.pipeline_layers()[pipe.stage_layers()[0][0] : pipe.stage_layers()[0][1]]
        mine = stored_keys_under(tmp_path, tuple(m for layer in layers for m in layer.modules))
        assert len(opened_files) == len(set(opened_files)), "a file was opened twice"
        assert set(opened_files) == set(mine.values()) < all_files, f"stage {stage}"
    assert loaded == set(theirs)  # the two stages together: every parameter and persistent buffer
    if family == "deepseek_v3":  # the buffer that steers routing is read, not left at its initial zeros
        assert any(key.endswith("e_score_correction_bias") for key in loaded)


def resaved(folder, out, drop: str = "", change: str = ""):
    """The checkpoint in `folder` as one file, without the stored keys containing `drop`, or with the tensors of
    keys containing `change` one row short."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(path)
    tensors = {k: v[:-1] if change and change in k else v for k, v in tensors.items() if not (drop and drop in k)}
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_the_header_check_fuses_experts_and_names_a_missing_or_misshapen_one(tmp_path):
    """Mixtral's checkpoints store `block_sparse_moe.experts.<e>.w1/w2/w3`: they pass; one expert missing or one
    expert's matrix of another shape is one line naming the fused tensor, read from the headers alone."""
    family, _, settings = next(case for case in MOE_CASES if case[0] == "mixtral")
    hf = hf_model(family, settings)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    arch = discover(hf.config)
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in stored_keys_under(tmp_path / "hf", ("model",)))
    check_weights_fit(tmp_path / "hf", arch)
    experts, hidden, inner = settings["num_local_experts"], settings["hidden_size"], settings["intermediate_size"]

    no_expert = resaved(tmp_path / "hf", tmp_path / "no_expert", drop="layers.1.block_sparse_moe.experts.3.w2")
    with pytest.raises(ValueError) as error:
        check_weights_fit(no_expert, arch)
    assert str(error.value) == (
        f"--model {no_expert}: model.layers.1.mlp.experts.down_proj is {(experts - 1, hidden, inner)} in the "
        f"checkpoint but {(experts, hidden, inner)} in its config.json; the weights and the config do not belong "
        "together"
    )
    no_layer = resaved(tmp_path / "hf", tmp_path / "no_layer", drop="layers.2.block_sparse_moe.experts")
    with pytest.raises(ValueError, match=r"has no tensor model\.layers\.2\.mlp\.experts\.(gate_up|down)_proj: not a"):
        check_weights_fit(no_layer, arch)
    short = resaved(tmp_path / "hf", tmp_path / "short", change="layers.0.block_sparse_moe.experts.2.w1")
    with pytest.raises(ValueError, match=r"that make model\.layers\.0\.mlp\.experts\.gate_up_proj .* do not fuse"):
        check_weights_fit(short, arch)
