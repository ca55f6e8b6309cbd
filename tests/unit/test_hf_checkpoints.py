"""Hugging Face checkpoints read per stage. Mixture-of-experts checkpoints as transformers 5.24's `save_pretrained`
writes them (experts one by one, sharded): each stage of a 2-stage pipeline gets exactly the HF model's tensors
(experts fused by transformers' own conversion operations, persistent buffers included), opening only the shards that
hold them; the header-only preflight check accepts such a folder and names a missing or misshapen expert in one line.
gpt-oss's MXFP4 experts are dequantized as transformers dequantizes them, and exported in full precision. Renamed
checkpoints (GPT-2 without `transformer.`) still load."""

import json

import deepspeed
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

import models.safetensors_files
from models.architecture import discover
from models.hf_weights import check_weights_fit, load_hf_weights, pipeline_param_to_hf
from models.pipeline import build_pipeline
from tests.cases import CASES, MOE_CASES, SEQ, VOCAB, hf_model, pipeline_stage
from tests.helpers import write_ds_config
from train.checkpoint.checkpointer import save_checkpoint
from train.export import export_checkpoint

TIED = [case for case in CASES if case[1] == "tied (Llama-3.2 style)"]  # the last stage reads the embedding's shard


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


def load_stages(
    arch, folder, opened_files: list[str], shards: bool = True
) -> tuple[dict[str, torch.Tensor], list[set[str]]]:
    """Each stage of a 2-stage pipeline loaded from `folder`: every tensor the stages hold (by HF key), and the files
    each stage opened, checked against the files its layers' stored keys are in (`shards`: a sharded folder)."""
    loaded, opened = {}, []
    for stage in range(2):
        pipe = pipeline_stage(arch, 2, stage)
        opened_files.clear()
        assert load_hf_weights(pipe, folder, arch) == len(pipe.state_dict())
        assert len(opened_files) == len(set(opened_files)), "a file was opened twice"
        loaded |= {pipeline_param_to_hf(arch, name): tensor for name, tensor in pipe.state_dict().items()}
        opened.append(set(opened_files))
        if not shards:
            continue
        start, stop = pipe.stage_layers()[0]
        modules = tuple(m for layer in arch.pipeline_layers()[start:stop] for m in layer.modules)
        assert opened[-1] == set(stored_keys_under(folder, modules).values()), f"stage {stage}"
    return loaded, opened


@pytest.mark.parametrize(
    ("family", "what", "settings"), MOE_CASES + TIED, ids=[family for family, _, _ in MOE_CASES + TIED]
)
def test_each_stage_reads_exactly_its_tensors_from_only_its_shards(
    family, what, settings, tmp_path, opened_files, one_rank_group
):
    hf = hf_model(family, settings)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")  # experts one by one, over ~20 shards
    all_files = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(all_files) > 5
    arch = discover(hf.config)
    loaded, opened = load_stages(arch, tmp_path, opened_files)
    assert all(files < all_files for files in opened)
    theirs = {key: t for key, t in hf.state_dict().items() if not (arch.tied and key == f"{arch.head}.weight")}
    assert loaded.keys() == theirs.keys()  # the two stages together: every parameter and persistent buffer
    assert all(torch.equal(loaded[key], theirs[key]) for key in theirs), [k for k in theirs if "experts" in k][:3]
    if family == "deepseek_v3":  # the buffer that steers routing is read, not left at its initial zeros
        assert any(key.endswith("e_score_correction_bias") for key in loaded)


def mxfp4_checkpoint(folder, hf) -> None:
    """`hf` saved as the Hub's gpt-oss checkpoints store it: each expert tensor [E, in, out] as MXFP4 `_blocks`
    (uint8 [E, out, in/32, 16], two 4-bit codes a byte) and `_scales` (uint8 exponents [E, out, in/32], 127 = 2^0),
    with `quantization_config: {"quant_method": "mxfp4"}`, a file per decoder layer. Random codes: every byte is a
    valid pair (transformers' quantizer needs triton kernels, which this machine lacks)."""
    hf.save_pretrained(folder)
    tensors, generator = load_file(folder / "model.safetensors"), torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = tensors.pop(key).shape
        blocks = (experts, outputs, inputs // 32, 16)
        tensors[f"{key}_blocks"] = torch.randint(0, 256, blocks, dtype=torch.uint8, generator=generator)
        tensors[f"{key}_scales"] = torch.randint(122, 131, blocks[:3], dtype=torch.uint8, generator=generator)
    (folder / "model.safetensors").unlink()
    weight_map = {key: f"{'-'.join(key.split('.')[1:3])}.safetensors" for key in tensors}  # layers-0, ..., embed_tokens
    for file in set(weight_map.values()):
        part = {key: tensor for key, tensor in tensors.items() if weight_map[key] == file}
        save_file(part, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}}))


def test_gpt_oss_mxfp4_experts_are_dequantized_as_transformers_does(tmp_path, opened_files, one_rank_group):
    family, _, settings = next(case for case in MOE_CASES if case[0] == "gpt_oss")
    mxfp4_checkpoint(tmp_path / "hf", hf_model(family, settings))
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    arch = discover(config)
    check_weights_fit(tmp_path / "hf", arch)
    loaded, _ = load_stages(arch, tmp_path / "hf", opened_files)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)
    assert reference["model.layers.1.mlp.experts.down_proj"].abs().max() > 0


def test_other_quantized_checkpoints_are_one_line(tmp_path):
    family, _, settings = next(case for case in MOE_CASES if case[0] == "qwen3_moe")
    hf = hf_model(family, settings)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match=r"quantized \(fp8\): pipegpt reads full-precision or MXFP4 \(gpt-oss\)"):
        check_weights_fit(tmp_path, discover(hf.config))


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


def test_a_bf16_run_keeps_the_routing_bias_fp32_through_checkpoint_and_export(tmp_path, one_rank_group):
    """DeepSpeed 0.19.8's bf16 engine casts the stage's parameters only: DeepSeek-V3's `e_score_correction_bias` stays
    fp32, as transformers 5.24 keeps it (`_keep_in_fp32_modules_strict`), so the layer files and the export carry the
    checkpoint's values (a bf16 copy would route differently)."""
    family, _, settings = next(case for case in MOE_CASES if case[0] == "deepseek_v3")
    hf = hf_model(family, settings)
    hf.save_pretrained(tmp_path / "hf")
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
        .model.layers[1]
        .mlp.gate.e_score_correction_bias.dtype
        == torch.float32
    )
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    ds_config = json.loads(write_ds_config(tmp_path / "ds.json").read_text().replace('"auto"', "10"))
    engine, *_ = deepspeed.initialize(
        model=pipe, model_parameters=pipe.parameters(), config=ds_config | {"bf16": {"enabled": True}}
    )
    assert next(pipe.parameters()).dtype == torch.bfloat16
    save_checkpoint(engine, tmp_path / "ckpt", 0, client_state={}, model_config=hf.config, keep_last=0)
    exported = load_file(export_checkpoint(tmp_path / "ckpt", tmp_path / "out") / "model.safetensors")
    biases = {key: tensor for key, tensor in hf.state_dict().items() if key.endswith("e_score_correction_bias")}
    assert len(biases) == 3  # layers 1-3; layer 0 is dense
    for key, bias in biases.items():
        assert torch.equal(exported[key], bias) and not torch.equal(bias, bias.bfloat16().float()), key


def test_a_run_on_mxfp4_experts_exports_full_precision_that_transformers_loads(tmp_path, opened_files, one_rank_group):
    """The real path (DeepSpeed's engine saves the checkpoint, `train.export` writes the folder): the export holds the
    dequantized experts and no `quantization_config`, loads with no missing or unexpected keys, and gives the
    pipeline's logits."""
    family, _, settings = next(case for case in MOE_CASES if case[0] == "gpt_oss")
    mxfp4_checkpoint(tmp_path / "hf", hf_model(family, settings))
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    arch = discover(config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    ds_config = json.loads(write_ds_config(tmp_path / "ds.json").read_text().replace('"auto"', "10"))
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config)
    save_checkpoint(engine, tmp_path / "ckpt", 0, client_state={}, model_config=config, keep_last=0)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in reloaded.state_dict().items())
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, pipe.eval()(ids))


def test_renamed_checkpoints_still_load(tmp_path, one_rank_group):
    """transformers' renamings run before its converters: the Hub's original GPT-2 stores its keys without
    `transformer.` (`h.0.attn.c_attn.weight`, `wte.weight`); such a folder loads every tensor unchanged."""
    family, _, settings = CASES[0]
    hf = hf_model(family, settings)
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    assert not any(k.startswith("transformer.") for k in load_file(tmp_path / "model.safetensors"))
    arch = discover(hf.config)
    check_weights_fit(tmp_path, arch)
    loaded, _ = load_stages(arch, tmp_path, [], shards=False)
    theirs = hf.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in loaded.items()) and len(loaded) == len(theirs) - 1
