"""Tensor parallelism inside the stages over real ranks: TP 2 x PP 2 (4 CPU ranks) trains the per-step losses and
the gradient norms of TP 1 x PP 2 (2 ranks), clipping engaged, ZeRO-1, for a Llama-style model with GQA and a tied
Qwen2-style model; the exports (slices joined) equal; a SIGKILLed TP run resumes bit for bit; a TP 2 checkpoint
resumes as TP 1 and a TP 1 checkpoint as TP 2 through DeepSpeed's universal checkpoint, training the uninterrupted
losses; a TP 2 checkpoint's weights load into a TP 1 engine (in-process) joined exactly.

The gradient norm equal with clipping engaged is what fails without `param.model_parallel = True` on the cut
parameters: DeepSpeed 0.19.8 then counts them on slice rank 0 only (0.83-0.94 of the true norm in a probe)."""

import json

import deepspeed
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    kill_one_rank_after_first_checkpoint,
    launch,
    read_metrics,
    small_run_args,
    step_losses,
    tiny_llama,
    write_ds_config,
)
from train.checkpoint.manifest import latest_tag, read_manifest, verified_tag_dir

STEPS, CLIP = 6, 0.5
MODELS = {
    "llama": tiny_llama(tie_word_embeddings=False),  # GQA: 4 query and 2 key/value heads, 1 of each a rank
    "qwen2": tiny_llama(model_type="qwen2", tie_word_embeddings=True),  # q/k/v biases, tied head
}


@pytest.fixture(scope="module", params=list(MODELS))
def tp_runs(request, corpus, tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"tp_{request.param}")
    (tmp / "model.json").write_text(json.dumps(MODELS[request.param]))
    ds_config = write_ds_config(tmp / "ds.json", gradient_clipping=CLIP)
    args = small_run_args(corpus, tokenizer_dir, tmp, ds_config, tmp / "model.json", STEPS, save_interval=3)
    args += ["--pipeline-stages", 2]
    runs = {1: tmp / "tp1", 2: tmp / "tp2"}
    launch([*args, "--output-dir", runs[1]], ranks=2)
    proc = launch([*args, "--tensor-parallel", 2, "--output-dir", runs[2]], ranks=4)
    assert "decoder layers cut 2 ways" in proc.stdout
    return request.param, args, runs


def test_tp2_trains_the_losses_and_gradient_norms_of_tp1(tp_runs):
    family, _, runs = tp_runs
    one, two = read_metrics(runs[1]), read_metrics(runs[2])
    assert len(one) == len(two) == STEPS
    assert any(m["grad_norm"] > CLIP for m in one), "clipping never engaged"
    for mine, reference in zip(two, one, strict=True):
        for key in ("loss", "grad_norm"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-5), (family, key, two, one)
    record, reference = (json.loads((runs[n] / "run_config.json").read_text()) for n in (2, 1))
    assert record["topology"]["tensor_parallel"] == 2 and record["topology"]["world_size"] == 4
    assert record["parameters"] == reference["parameters"], "a cut parameter counts whole"
    held = [s["held_parameters"] for s in record["topology"]["stages"]]
    assert all(h < r["held_parameters"] for h, r in zip(held, reference["topology"]["stages"], strict=True))


def test_the_tp2_export_equals_tp1s(tp_runs):
    family, _, runs = tp_runs
    one, two = load_file(runs[1] / "hf" / "model.safetensors"), load_file(runs[2] / "hf" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert one[key].shape == two[key].shape, key
        assert (one[key] - two[key]).abs().max().item() <= 1e-5 * max(one[key].abs().max().item(), 1.0), key


@pytest.mark.parametrize("tp_runs", ["llama"], indirect=True)  # one family: the files are the same kind
def test_a_sigkilled_tp_run_resumes_bit_for_bit(tp_runs):
    _, args, runs = tp_runs
    killed = runs[2].parent / "killed"
    kill_one_rank_after_first_checkpoint([*args, "--tensor-parallel", 2], 4, killed)
    resumed_at = int(latest_tag(killed / "checkpoints").removeprefix("step_"))
    assert resumed_at < STEPS
    assert sorted(p.name for p in (killed / "checkpoints" / f"step_{resumed_at}").glob("layer_02-*")) == [
        "layer_02-model_00-model_states.pt",
        "layer_02-model_01-model_states.pt",
    ]
    launch([*args, "--tensor-parallel", 2, "--output-dir", killed, "--load", killed / "checkpoints"], ranks=4)
    before, after = step_losses(runs[2]), step_losses(killed)
    assert [after[s] for s in range(resumed_at + 1, STEPS + 1)] == [before[s] for s in range(resumed_at + 1, STEPS + 1)]


UNIVERSAL = "at step 3 (another layout: through a universal checkpoint)"


@pytest.mark.parametrize("tp_runs", ["llama"], indirect=True)  # GQA and a row-parallel o_proj/down_proj suffice
@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_in_another_tensor_parallel_size_through_the_universal_checkpoint(tp_runs, saved, resumed):
    """Step 3 of TP `saved` x PP 2 resumed as TP `resumed` x PP 2 (Adam's moments joined by DeepSpeed's converter
    along each slice's own dimension, cut again by the loading ranks) trains steps 4-6 with the uninterrupted run's
    losses. The reference is the TP 1 run: the TP 2 run equals it to 1e-5 (the test above)."""
    _, args, runs = tp_runs
    out = runs[saved].parent / f"tp{saved}_as_tp{resumed}"
    load = ["--load", runs[saved] / "checkpoints" / "step_3", "--output-dir", out]
    proc = launch([*args, "--tensor-parallel", resumed, *load], ranks=2 * resumed)
    assert UNIVERSAL in proc.stdout
    assert verified_tag_dir(runs[saved] / "checkpoints" / "step_3_universal")
    after, reference = step_losses(out), step_losses(runs[1])
    assert sorted(after) == [4, 5, 6]
    for step in after:
        assert after[step] == pytest.approx(reference[step], rel=1e-5), (step, after, reference)


@pytest.mark.parametrize("tp_runs", ["llama"], indirect=True)
def test_a_tp2_checkpoint_loads_its_weights_into_a_tp1_engine(tp_runs, one_rank_group):
    """--reset-optimizer's path, in one process: the TP 2 checkpoint's layer files (two per decoder layer) joined
    into a TP 1 x PP 1 engine, every weight equal to the slices joined (the export's `join_layer_files`)."""
    from models.architecture import discover
    from models.hf_weights import config_from_dict
    from models.pipeline import build_pipeline
    from models.tensor_parallel_stage import join_layer_files
    from tests.helpers import ds_config
    from train.checkpoint.checkpointer import load_checkpoint

    _, _, runs = tp_runs
    tag = runs[2] / "checkpoints" / "step_3"
    arch = discover(config_from_dict(read_manifest(tag)["model_config"]))
    pipe = build_pipeline(arch, 1, partition_method="parameters", seed=7, activation_checkpoint_interval=0, seq_len=32)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config(scheduler=None))
    assert load_checkpoint(engine, tag, "weights")["step"] == 3
    for index, module in pipe.stage_modules():
        files = sorted(tag.glob(f"layer_{index:02d}-*model_states.pt"))
        assert len(files) == 2, files
        for name, tensor in join_layer_files(files, arch, index).items():
            assert torch.equal(module.state_dict()[name], tensor), (index, name)
