"""LoRA training over real CPU ranks equals a plain PyTorch loop on peft's model, in every layout.

For a Llama-style (untied, GQA) and a Qwen2-style (tied) model, runs start from the same PEFT adapter file
(`--peft-config`, lora_B off zero) on the same frozen base: pp=1, pp=2 and pp=2 with activation checkpointing
(Llama), pp=2 and pp=2 under DualPipeV (Qwen2).
The reference is `PeftModel.from_pretrained(AutoModelForCausalLM..., is_trainable=True)` trained by hand on the
blocks the pipeline's first stage recorded (`--trace-batches`), with the same AdamW, the same DeepSpeed
warm-up + cosine schedule (its own class) and clipping at 1.0: the per-step losses and the exported adapter agree.
A tiny Qwen3-MoE does the same on pp=2 with adapters on its experts' fused weights (peft's target_parameters).
"""

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from models.lora import WEIGHTS_FILE
from tests.cases import peft_reference
from tests.helpers import (
    kill_one_rank_after_first_checkpoint,
    launch,
    read_metrics,
    replay_by_hand,
    run_preflight,
    small_run_args,
    step_losses,
    tiny_llama,
    train_blocks,
    write_ds_config,
)
from train.checkpoint.manifest import latest_tag
from train.observe.quiet import FILTERED

STEPS, SEQ = 6, 32
_SHAPE = {k: v for k, v in tiny_llama().items() if k != "model_type"}  # also Qwen2's fields
MODELS = {"llama": dict(_SHAPE, tie_word_embeddings=False), "qwen2": dict(_SHAPE, tie_word_embeddings=True)}
# 8 experts, top-2, in every layer (no dense layer: both stages hold experts); experts stored one by one on disk
MOE = dict(
    {k: v for k, v in _SHAPE.items() if k != "intermediate_size"},
    num_hidden_layers=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    norm_topk_prob=True,
)
LAYOUTS = {
    "pp1": (1, []),
    "pp2": (2, []),
    "pp2_checkpointing": (2, ["--activation-checkpoint-interval", 1]),
    "pp2_dualpipev": (2, ["--schedule", "dualpipev"]),  # rank 0: the frozen embedding, and the frozen head
}
# Every layout is run by one family or both (5 launches, not 8); each family's first run also exports the merged
# model (--merge-adapter).
FAMILY_LAYOUTS = {"llama": ("pp1", "pp2", "pp2_checkpointing"), "qwen2": ("pp2", "pp2_dualpipev")}


@pytest.fixture(scope="module")
def lora_runs(corpus, tokenizer_dir, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """family -> (its folder: base/, adapter/, ds.json, cache/; the runs by layout)."""
    families = {}
    for family, settings in MODELS.items():
        tmp = tmp_path_factory.mktemp(f"lora_{family}")
        peft_reference(family, settings, tmp)
        ds_config = write_ds_config(tmp / "ds.json")
        runs = {}
        for name in FAMILY_LAYOUTS[family]:
            stages, extra = LAYOUTS[name]
            merge = ["--merge-adapter"] if name == FAMILY_LAYOUTS[family][0] else []
            args = lora_args(corpus, tokenizer_dir, tmp, ds_config)
            launch([*args, "--pipeline-stages", stages, *extra, *merge, "--output-dir", tmp / name], ranks=stages)
            runs[name] = tmp / name
        families[family] = tmp, runs
    return families


def lora_args(corpus: Path, tokenizer_dir: Path, tmp: Path, ds_config: Path, steps: int = STEPS) -> list:
    return small_run_args(
        corpus,
        tokenizer_dir,
        tmp,
        ds_config,
        None,
        steps,
        model=tmp / "base",
        peft_config=tmp / "adapter",
        trace_batches=True,
        save_interval=3,
    )


def plain_loop(
    tmp: Path, run: Path, corpus: Path, tokenizer_dir: Path, quantization: BitsAndBytesConfig | None = None
) -> tuple[list[float], dict]:
    """peft's model trained by hand on the blocks the pipeline's first stage fed, step by step (`quantization`:
    on transformers' 4-bit model)."""
    base = AutoModelForCausalLM.from_pretrained(
        tmp / "base",
        dtype=torch.float32,
        attn_implementation="sdpa",
        quantization_config=quantization,
        device_map="cpu" if quantization else None,
    )
    model = PeftModel.from_pretrained(base, tmp / "adapter", is_trainable=True).train()
    params = [p for p in model.parameters() if p.requires_grad]  # every LoRA matrix is 2-D: all decay
    losses = replay_by_hand(model, [{"params": params}], run, train_blocks(corpus, tokenizer_dir, tmp / "cache"), STEPS)
    return losses, get_peft_model_state_dict(model)


@pytest.mark.parametrize("family", list(MODELS))
def test_lora_in_every_layout_equals_a_plain_loop_on_peft(lora_runs, family, corpus, tokenizer_dir):
    tmp, runs = lora_runs[family]
    expected, adapter = plain_loop(tmp, runs["pp2"], corpus, tokenizer_dir)
    initial = load_file(tmp / "adapter" / WEIGHTS_FILE)
    assert max((adapter[k] - initial[k]).abs().max().item() for k in initial) > 1e-3, "the adapters did not train"
    for name, run in runs.items():
        losses = [m["loss"] for m in read_metrics(run)]
        assert len(losses) == STEPS
        for ours, reference in zip(losses, expected, strict=True):
            assert abs(ours - reference) <= 1e-5 * abs(reference), (family, name, losses, expected)
        exported = load_file(run / "adapter" / WEIGHTS_FILE)
        assert exported.keys() == adapter.keys(), (family, name)
        worst = max((exported[k] - adapter[k]).abs().max().item() for k in adapter)
        assert worst <= 1e-5, (family, name, worst)


@pytest.mark.parametrize("family", list(MODELS))
def test_lora_runs_train_adapters_only_and_report_them(lora_runs, family):
    tmp, runs = lora_runs[family]
    record = json.loads((runs["pp2"] / "run_config.json").read_text())
    stages = record["topology"]["stages"]
    assert all(0 < s["trainable_parameters"] < s["held_parameters"] / 5 for s in stages), stages
    adapter = load_file(tmp / "adapter" / WEIGHTS_FILE)
    assert record["trainable_parameters"] == sum(t.numel() for t in adapter.values())
    manifest = json.loads((runs["pp2"] / "checkpoints" / "step_6" / "pipegpt_manifest.json").read_text())
    assert manifest["base_model"] == str(tmp / "base") and len(manifest["base_model_fingerprint"]) == 32
    weights = [record["size"] for name, record in manifest["files"].items() if name.startswith("layer_")]
    assert sum(weights) < (tmp / "base" / "model.safetensors").stat().st_size / 5, "the base was saved"
    if family == "qwen2":
        assert read_metrics(runs["pp2"])[-1]["tied_embedding_max_diff"] == 0.0


def test_sigkilled_lora_run_resumes_bit_exactly(lora_runs, corpus, tokenizer_dir):
    tmp, runs = lora_runs["llama"]
    out = tmp / "killed"
    args = [*lora_args(corpus, tokenizer_dir, tmp, tmp / "ds.json"), "--pipeline-stages", 2]
    kill_one_rank_after_first_checkpoint(args, 2, out)
    resumed_at = int(latest_tag(out / "checkpoints").removeprefix("step_"))
    assert resumed_at < STEPS
    launch([*args, "--output-dir", out, "--load", out / "checkpoints"], ranks=2)
    after = step_losses(out)
    uninterrupted = step_losses(runs["pp2"])
    assert after == uninterrupted


def test_lora_checkpoint_refuses_another_base_model(lora_runs, corpus, tokenizer_dir, tmp_path, capsys):
    tmp, runs = lora_runs["llama"]
    other = AutoModelForCausalLM.from_pretrained(tmp / "base")
    with torch.no_grad():
        other.model.layers[2].mlp.down_proj.weight.add_(1e-3)  # one matrix fine-tuned: the same shapes
    other.save_pretrained(tmp_path / "other")
    args = lora_args(corpus, tokenizer_dir, tmp, tmp / "ds.json", steps=STEPS + 2)
    args[args.index("--model") + 1] = str(tmp_path / "other")
    flags = [*args, "--pipeline-stages", 1, "--load", runs["pp1"] / "checkpoints", "--output-dir", tmp_path / "r"]
    line = run_preflight(capsys, 1, *flags)  # launch.sh's check, before any rank starts
    assert line.startswith("error: --load names a LoRA checkpoint trained on another")


def test_qlora_on_two_stages_equals_a_plain_loop_on_transformers_4bit_model(lora_runs, corpus, tokenizer_dir):
    """QLoRA (NF4 base) on 2 stages against peft on `from_pretrained(quantization_config=BitsAndBytesConfig(...))`."""
    tmp, _ = lora_runs["llama"]
    out = tmp / "qlora_pp2"
    args = [*lora_args(corpus, tokenizer_dir, tmp, tmp / "ds.json"), "--pipeline-stages", 2, "--load-in-4bit"]
    proc = launch([*args, "--output-dir", out], ranks=2)
    assert "linear layers in 4 bits (nf4)" in proc.stdout
    # A LoRA run that imports bitsandbytes: none of the known-harmless messages (train/observe/quiet.py) shows.
    assert not [m for m in FILTERED if m in proc.stdout + proc.stderr], "a filtered library message was printed"
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    expected, adapter = plain_loop(tmp, out, corpus, tokenizer_dir, quantization=nf4)
    full_precision = [m["loss"] for m in read_metrics(tmp / "pp2")]
    losses = [m["loss"] for m in read_metrics(out)]
    assert losses != full_precision, "the 4-bit base should train other losses than the full-precision one"
    for ours, reference in zip(losses, expected, strict=True):
        assert abs(ours - reference) <= 1e-5 * abs(reference), (losses, expected)
    exported = load_file(out / "adapter" / WEIGHTS_FILE)
    assert max((exported[k] - adapter[k]).abs().max().item() for k in adapter) <= 1e-5
    manifest = json.loads((out / "checkpoints" / "step_6" / "pipegpt_manifest.json").read_text())
    assert manifest["quantization"] == {"quant_type": "nf4", "double_quant": False}


def test_merged_export_equals_the_base_with_the_adapter(lora_runs):
    """`--merge-adapter` (each family's first run): hf/ is the base with the adapters merged in; it loads with no
    missing or unexpected key and its logits equal `PeftModel.from_pretrained(base, adapter/)`'s (≤1e-5)."""
    ids = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(5))
    for family, (tmp, runs) in lora_runs.items():
        run = runs[FAMILY_LAYOUTS[family][0]]
        merged, info = AutoModelForCausalLM.from_pretrained(run / "hf", output_loading_info=True)
        assert not any(info.values()), (family, info)
        base = AutoModelForCausalLM.from_pretrained(tmp / "base")
        with_adapter = PeftModel.from_pretrained(base, run / "adapter").eval()
        with torch.no_grad():
            expected, got = with_adapter(ids).logits, merged.eval()(ids).logits
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (family, (got - expected).abs().max())


def test_lora_checkpoint_resumes_in_another_layout_through_a_universal_checkpoint(lora_runs, corpus, tokenizer_dir):
    """pp=2's step-3 checkpoint (adapters and their Adam moments) resumed on one stage trains pp=2's steps 4-6."""
    tmp, runs = lora_runs["llama"]
    out = tmp / "universal_pp1"
    args = [*lora_args(corpus, tokenizer_dir, tmp, tmp / "ds.json"), "--pipeline-stages", 1]
    proc = launch([*args, "--load", runs["pp2"] / "checkpoints" / "step_3", "--output-dir", out], ranks=1)
    assert "through a universal checkpoint" in proc.stdout
    resumed = step_losses(out)
    uninterrupted = step_losses(runs["pp2"])
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():
        assert abs(loss - uninterrupted[step]) <= 1e-5 * abs(loss), (step, resumed, uninterrupted)


def test_chat_lora_on_two_stages_trains_the_losses_of_one_stage(chat_corpus, chat_tokenizer_dir, tmp_path):
    """The main use: `--data-format chat --lora-rank 16` on a tied Qwen2-style checkpoint. Answer-only labels and
    the answer-token loss scale travel with LoRA as without; pp=2 trains pp=1's losses (≤1e-5 relative)."""
    from transformers import CONFIG_MAPPING

    torch.manual_seed(3)
    settings = {k: v for k, v in tiny_llama(vocab_size=514, max_position_embeddings=128).items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["qwen2"](**settings, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "base")
    args = small_run_args(
        chat_corpus,
        chat_tokenizer_dir,
        tmp_path,
        write_ds_config(tmp_path / "ds.json", 8, 2),
        None,
        STEPS,
        model=tmp_path / "base",
        lora_rank=16,
        lora_alpha=32,
        data_format="chat",
        seq_len=128,
        eval_blocks=8,
    )
    for stages in (1, 2):
        launch([*args, "--pipeline-stages", stages, "--output-dir", tmp_path / f"pp{stages}"], ranks=stages)
    pp1, pp2 = (read_metrics(tmp_path / f"pp{stages}") for stages in (1, 2))
    assert [m["answer_tokens"] for m in pp1] == [m["answer_tokens"] for m in pp2]
    assert all(0.5 < m["masked_fraction"] < 0.95 for m in pp1)
    for ours, reference in zip(pp2, pp1, strict=True):
        assert abs(ours["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"]), (pp2, pp1)
    assert (tmp_path / "pp2" / "adapter" / WEIGHTS_FILE).is_file()


def test_lora_on_moe_experts_on_two_stages_equals_a_plain_loop_on_peft(corpus, tokenizer_dir, tmp_path):
    """`--model` (a Qwen3-MoE checkpoint, its experts stored one by one) and `--peft-config` (attention and the fused
    expert weights, lora_B off zero, as `peft_reference` writes it) on 2 stages: the per-step losses and the
    exported adapter equal a plain loop on `PeftModel.from_pretrained` (<=1e-5), and the expert adapters train."""
    peft_reference("qwen3_moe", MOE, tmp_path)
    initial = load_file(tmp_path / "adapter" / WEIGHTS_FILE)
    experts = [key for key in initial if ".mlp.experts." in key]
    assert len(experts) == 4 * MOE["num_hidden_layers"], "lora_A and lora_B of gate_up_proj and down_proj per layer"
    args = lora_args(corpus, tokenizer_dir, tmp_path, write_ds_config(tmp_path / "ds.json"))
    proc = launch([*args, "--pipeline-stages", 2, "--output-dir", tmp_path / "pp2"], ranks=2)
    adapted = [int(n) for n in re.findall(r"LoRA on (\d+) modules", proc.stdout)]
    assert len(adapted) == 2 and sum(adapted) == 6 * MOE["num_hidden_layers"], "4 attention modules, 2 expert weights"
    expected, adapter = plain_loop(tmp_path, tmp_path / "pp2", corpus, tokenizer_dir)
    assert max((adapter[k] - initial[k]).abs().max().item() for k in experts) > 1e-3, "the experts did not train"
    losses = [m["loss"] for m in read_metrics(tmp_path / "pp2")]
    assert len(losses) == STEPS
    for ours, reference in zip(losses, expected, strict=True):
        assert abs(ours - reference) <= 1e-5 * abs(reference), (losses, expected)
    exported = load_file(tmp_path / "pp2" / "adapter" / WEIGHTS_FILE)
    assert exported.keys() == adapter.keys() == initial.keys()
    assert max((exported[k] - adapter[k]).abs().max().item() for k in adapter) <= 1e-5
