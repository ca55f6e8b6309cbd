"""Checkpoints survive a killed rank and a crash mid-save, resume exactly, change layout, export losslessly."""

import re
import shutil
import subprocess
import sys

import deepspeed
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from tests.helpers import (
    kill_one_rank_after_first_checkpoint,
    launch,
    read_metrics,
    step_losses,
    tiny_gpt2,
    tiny_llama,
    write_ds_config,
)
from train.checkpoint.manifest import latest_tag, verified_tag_dir
from train.errors import ConfigError
from train.export import export_checkpoint

STEPS = 40
MODEL = tiny_gpt2()


@pytest.fixture(scope="module")
def setup(gpt2_reference):
    """(the reference run's folder, its flags): see tests/integration/conftest.py."""
    return gpt2_reference.folder, gpt2_reference.args


@pytest.fixture(scope="module")
def reference(gpt2_reference):
    return gpt2_reference.losses, gpt2_reference.out


def test_sigkilled_rank_then_resume_equals_uninterrupted_run(setup, reference):
    """pp=2 x dp=2 (same samples, another reduction order across replicas: ≤1e-4). The pp=2 case, bit-exact, is
    test_scale_out.py::test_sigkilled_run_with_dropout_resumes_bit_exactly[1f1b] (with dropout on top)."""
    tmp, args = setup
    losses, _ = reference
    ranks = 4
    out = tmp / f"killed_{ranks}"
    kill_one_rank_after_first_checkpoint(args, ranks, out)
    resumed_at = int(latest_tag(out / "checkpoints").removeprefix("step_"))
    assert resumed_at < STEPS, "the rank was killed only after the run had finished"
    proc = launch([*args, "--output-dir", out, "--load", out / "checkpoints"], ranks=ranks)
    assert f"at step {resumed_at}" in proc.stdout
    after = step_losses(out)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(resumed_at + 1, STEPS + 1):
        assert after[step] == pytest.approx(losses[step], rel=1e-4), step


def test_crash_during_save_keeps_the_previous_checkpoint(setup, reference):
    tmp, args = setup
    losses, _ = reference
    out = tmp / "crash_in_save"
    proc = launch(
        [*args, "--output-dir", out], ranks=2, check=False, env={"PIPEGPT_FAULT": "save:step_10"}, preflight=False
    )
    assert proc.returncode != 0
    assert latest_tag(out / "checkpoints") == "step_5"
    assert list((out / "checkpoints" / "step_10").glob("layer_*")), "the crash came before any file was written"
    with pytest.raises(ConfigError, match="incomplete"):
        verified_tag_dir(out / "checkpoints" / "step_10")
    proc = launch([*args, "--output-dir", out, "--load", out / "checkpoints"], ranks=2)
    assert "at step 5" in proc.stdout
    assert step_losses(out)[6] == losses[6]


def test_1f1b_checkpoint_resumes_under_dualpipev_and_back(setup, reference):
    """The same two ranks hold other layers under DualPipeV (rank 0 both ends), so the optimizer shards come through
    DeepSpeed's universal checkpoint; the losses stay the uninterrupted 1F1B run's (fp32, 1e-5 relative)."""
    tmp, args = setup
    losses, ref_dir = reference
    there, back = tmp / "as_dualpipev", tmp / "back_to_1f1b"
    load = ["--load", ref_dir / "checkpoints" / "step_5", "--output-dir", there]
    proc = launch([*args, *load, "--schedule", "dualpipev"], ranks=2)
    assert "at step 5 (another layout: through a universal checkpoint)" in proc.stdout
    proc = launch([*args, "--load", there / "checkpoints" / "step_20", "--output-dir", back], ranks=2)
    assert "at step 20 (another layout: through a universal checkpoint)" in proc.stdout
    for out, steps in ((there, range(6, 21)), (back, range(21, STEPS + 1))):
        after = step_losses(out)
        assert sorted(after) == list(steps) if out == back else set(steps) <= set(after)
        for step in steps:
            assert after[step] == pytest.approx(losses[step], rel=1e-5), (out.name, step)


@pytest.mark.parametrize("stages,ranks", [(1, 1), (2, 4)], ids=["as_pp1", "as_pp2_dp2"])
def test_resume_pp2_checkpoint_in_another_layout(setup, reference, stages, ranks):
    """Through DeepSpeed's universal checkpoint (converted on demand): the Adam state comes along, so the
    resumed run trains the uninterrupted run's losses; with --reset-optimizer (on one rank) only the first step
    agrees."""
    tmp, args = setup
    losses, ref_dir = reference
    out = tmp / f"relayout_{stages}_{ranks}"
    load = ["--load", ref_dir / "checkpoints" / "step_5", "--pipeline-stages", stages, "--output-dir", out]
    proc = launch([*args, *load], ranks=ranks)
    assert "at step 5 (another layout: through a universal checkpoint)" in proc.stdout
    assert verified_tag_dir(ref_dir / "checkpoints" / "step_5_universal")  # complete, with its manifest
    after = step_losses(out)
    for step in range(6, STEPS + 1):
        assert after[step] == pytest.approx(losses[step], rel=1e-4), step
    if ranks > 1:
        return  # --reset-optimizer does not depend on the layout: one rank shows it
    launch([*args, *load, "--reset-optimizer", "--output-dir", tmp / f"weights_only_{stages}_{ranks}"], ranks=ranks)
    weights_only = step_losses(tmp / f"weights_only_{stages}_{ranks}")
    # Step 6's loss is computed with the weights after step 5, before the fresh optimizer acts.
    assert weights_only[6] == pytest.approx(losses[6], rel=1e-4)
    assert max(abs(weights_only[s] - losses[s]) / losses[s] for s in range(7, STEPS + 1)) > 1e-3


def test_universal_checkpoint_loads_every_adam_moment_and_weight(reference, one_rank_group):
    """The universal form of the pp=2 step 5 (made by the test above, or here) loaded into one in-process
    pp=1 engine: every parameter's fp32 weight and both Adam moments equal the converted files."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from models.architecture import discover
    from models.hf_weights import config_from_dict
    from models.pipeline import build_pipeline
    from tests.helpers import ds_config
    from train.checkpoint.manifest import read_manifest
    from train.checkpoint.universal import convert_to_universal

    _, ref_dir = reference
    universal = convert_to_universal(verified_tag_dir(ref_dir / "checkpoints" / "step_5"))
    arch = discover(config_from_dict(read_manifest(universal)["model_config"]))
    pipe = build_pipeline(
        arch, 1, partition_method="parameters", seed=1234, activation_checkpoint_interval=0, seq_len=32
    )
    config = ds_config(checkpoint={"load_universal": True}, scheduler=None)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=config)
    engine.load_checkpoint(str(universal.parent), tag=universal.name)
    names = [name for name, _ in pipe.named_parameters()]
    assert sorted(names) == sorted(p.name for p in (universal / "zero").iterdir() if p.is_dir())
    for name, param in pipe.named_parameters():
        saved = {
            k: torch.load(universal / "zero" / name / f"{k}.pt", weights_only=False)["param"]
            for k in ("fp32", "exp_avg", "exp_avg_sq")
        }
        assert torch.equal(safe_get_full_fp32_param(param), saved["fp32"]), name
        assert torch.equal(safe_get_full_optimizer_state(param, "exp_avg"), saved["exp_avg"]), name
        assert torch.equal(safe_get_full_optimizer_state(param, "exp_avg_sq"), saved["exp_avg_sq"]), name
        assert saved["exp_avg_sq"].abs().sum() > 0, name


def test_export_cli_output_loads_without_key_warnings(reference, tmp_path):
    _, ref_dir = reference
    hf_dir = export_checkpoint(ref_dir / "checkpoints", tmp_path / "hf")
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf_dir / "tokenizer.json").exists() and (hf_dir / "generation_config.json").exists()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_corrupt_or_missing_files_are_named(reference, tmp_path):
    _, ref_dir = reference
    tag = tmp_path / "step_5"
    shutil.copytree(ref_dir / "checkpoints" / "step_5", tag)
    with open(tag / "layer_02-model_states.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ConfigError, match="layer_02-model_states.pt is corrupt"):
        verified_tag_dir(tag)
    (tag / "layer_02-model_states.pt").unlink()
    with pytest.raises(ConfigError, match="missing layer_02-model_states.pt"):
        verified_tag_dir(tag)


def test_a_damaged_file_of_the_same_size_stops_resume_and_export(setup, reference, tmp_path):
    """4 KiB zeroed inside the optimizer state of the latest checkpoint (its size unchanged): the content checksum
    names the file and an earlier checkpoint; nothing resumes, nothing is exported, exit 2."""
    tmp, args = setup
    _, ref_dir = reference
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    tag = tmp_path / "checkpoints" / latest_tag(tmp_path / "checkpoints")
    (damaged,) = tag.glob("zero_pp_rank_0_mp_rank_01_optim_states.pt")
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(4096))
    assert damaged.stat().st_size == size and verified_tag_dir(tag) == tag  # sizes alone see nothing
    out = tmp_path / "resumed"
    proc = launch([*args, "--output-dir", out, "--load", tmp_path / "checkpoints"], ranks=2, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert lines and all(line == lines[0] for line in lines), lines
    assert f"{damaged.name} differs from what was saved" in lines[0] and "--load" in lines[0] and "step_35" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and not (out / "metrics.jsonl").exists()
    export = subprocess.run(
        [sys.executable, "-m", "train.export", tmp_path / "checkpoints", "--out", tmp_path / "hf"],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 2 and f"{damaged.name} differs" in export.stderr + export.stdout
    assert not (tmp_path / "hf").exists()


def test_diverging_run_stops_without_saving(setup, tmp_path):
    _, args = setup
    ds = write_ds_config(
        tmp_path / "diverge.json",
        gradient_clipping=0.0,
        optimizer={"type": "AdamW", "params": {"lr": 1e5, "torch_adam": True}},
    )
    args = [*args, "--deepspeed_config", ds, "--save-interval", 2, "--output-dir", tmp_path / "run"]
    proc = launch(args, ranks=2, check=False, preflight=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: loss") and "stopped without saving" in error
    step = int(error.split(" at step ")[1].split(":")[0])
    assert latest_tag(tmp_path / "run" / "checkpoints") == f"step_{(step - 1) // 2 * 2}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_start_from_sharded_hf_model_each_stage_reading_its_own_tensors(setup, corpus, tokenizer_dir, tmp_path, family):
    """Step 1 of a pp=2 run from a sharded save_pretrained folder has the HF model's loss on that batch
    (GPT-2: tied head; Llama: untied head, GQA)."""
    from transformers import LlamaConfig

    from train.data.batches import TrainMicroBatches
    from train.data.examples import TEXT
    from train.data.sources import resolve_sources
    from train.data.splits import packed_dataset
    from train.data.tokenizer import load_tokenizer

    tmp, args = setup
    config = (
        GPT2Config(**{k: v for k, v in MODEL.items() if k != "model_type"}, vocab_size=512)
        if family == "gpt2"
        else LlamaConfig(**{k: v for k, v in tiny_llama(bos_token_id=0, eos_token_id=0).items() if k != "model_type"})
    )
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "pretrained", max_shard_size="100KB")
    assert (tmp_path / "pretrained" / "model.safetensors.index.json").exists()
    out = tmp_path / "finetune"
    argv = [a for a in args if a != str(tmp / "model.json") and a != "--model-config"]
    proc = launch([*argv, "--model", tmp_path / "pretrained", "--train-steps", 1, "--output-dir", out], ranks=2)
    # Ranks share stdout: find the reports anywhere, not line by line.
    loaded = sorted(int(n) for n in re.findall(r"rank \d+: loaded (\d+) pretrained tensors", proc.stdout))
    parameters = len(dict(model.named_parameters()))  # a tied head's weight once
    assert len(loaded) == 2 and max(loaded) < parameters <= sum(loaded)  # no stage read the whole model
    tokenizer = load_tokenizer(str(tokenizer_dir))
    blocks = packed_dataset(
        resolve_sources([str(corpus)]), TEXT, tokenizer, seq_len=32, val_fraction=0.05, cache_dir=tmp / "cache"
    )["train"]  # as `setup`
    micro_batches = TrainMicroBatches(
        blocks=blocks,
        micro_batch_size=2,
        num_micro_batches=4,
        dp_rank=0,
        dp_size=1,
        seed=1234,
        document_attention=False,
    ).step_indices(0)
    with torch.no_grad():
        first = [model(ids, labels=ids).loss.item() for ids in (blocks[i]["input_ids"].long() for i in micro_batches)]
    assert read_metrics(out)[0]["loss"] == pytest.approx(sum(first) / len(first), rel=1e-5)
