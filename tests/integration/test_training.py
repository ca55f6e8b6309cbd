"""Real CPU ranks through launch.sh: layouts agree, the tie holds, the export is the trained model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import read_metrics
from tests.integration.conftest import LAYOUT_STEPS as STEPS
from train.data.examples import TEXT
from train.data.sources import resolve_sources
from train.data.splits import packed_dataset
from train.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def layout_runs(gpt2_layouts):
    return gpt2_layouts.folder, gpt2_layouts.runs


def test_layouts_train_the_same_losses(layout_runs):
    _, runs = layout_runs
    losses = {name: [m["loss"] for m in read_metrics(out)] for name, out in runs.items()}
    assert len(losses["pp1"]) == STEPS
    assert losses["pp1"][-1] < losses["pp1"][0], "loss did not fall"
    for name in ("pp2", "pp2_dp2", "pp2_flops_ac"):
        for ours, reference in zip(losses[name], losses["pp1"], strict=True):
            assert abs(ours - reference) <= 1e-4 * abs(reference), (name, losses[name], losses["pp1"])


def test_dualpipev_trains_the_losses_of_1f1b_and_of_one_stage(layout_runs):
    """fp32, the same seeded weights and batches: DualPipeV only moves the layers and reorders the micro-batches."""
    _, runs = layout_runs
    losses = {name: [m["loss"] for m in read_metrics(out)] for name, out in runs.items()}
    for name in ("pp2_dualpipev", "pp2_dp2_dualpipev"):
        assert len(losses[name]) == STEPS
        for reference in ("pp1", "pp2"):
            for ours, theirs in zip(losses[name], losses[reference], strict=True):
                assert abs(ours - theirs) <= 1e-5 * abs(theirs), (name, reference, losses[name], losses[reference])
    assert read_metrics(runs["pp2_dualpipev"])[-1]["tied_embedding_max_diff"] == 0.0


def test_dualpipev_puts_embedding_and_head_on_rank_0_and_exports_the_1f1b_model(layout_runs):
    import json

    from safetensors.torch import load_file

    _, runs = layout_runs
    topology = json.loads((runs["pp2_dualpipev"] / "run_config.json").read_text())["topology"]
    assert topology["schedule"] == "dualpipev" and len(topology["stage_layer_bounds"]) == 2 * 2 + 1
    rank0, rank1 = topology["stages"]
    bounds = topology["stage_layer_bounds"]
    assert rank0["layer_bounds"] == [bounds[0:2], bounds[3:5]] and rank1["layer_bounds"] == [bounds[1:3], bounds[2:4]]
    assert rank0["layers"][0] == "EmbeddingPipe" and rank0["layers"][-1] == "EmbeddingPipe"  # the tied head
    pp1, dualpipev = (load_file(runs[name] / "hf" / "model.safetensors") for name in ("pp1", "pp2_dualpipev"))
    assert pp1.keys() == dualpipev.keys()
    assert max((pp1[k] - dualpipev[k]).abs().max().item() for k in pp1) <= 1e-5


def test_document_attention_trains_the_same_losses_on_two_stages(layout_runs):
    """The per-document positions cross the stage boundary beside the hidden states (and through recomputed
    blocks): pp=2 is pp=1, step by step and in evaluation, and both differ from causal attention over the same
    blocks (the mask is applied)."""
    _, runs = layout_runs
    one, two, causal = (read_metrics(runs[name]) for name in ("pp1_document", "pp2_document", "pp1"))
    assert len(one) == len(two) == STEPS
    for ours, reference in zip(two, one, strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    assert all(abs(d["loss"] - c["loss"]) > 1e-4 for d, c in zip(one, causal, strict=True))


def test_tied_embedding_stays_identical_across_stages(layout_runs):
    _, runs = layout_runs
    for name in ("pp2", "pp2_dp2"):
        assert read_metrics(runs[name])[-1]["tied_embedding_max_diff"] == 0.0


def test_hf_export_perplexity_matches_last_eval(layout_runs, corpus, tokenizer_dir):
    tmp, runs = layout_runs
    run = runs["pp2"]
    last_eval_ppl = [m for m in read_metrics(run) if "eval_ppl" in m][-1]["eval_ppl"]
    tokenizer = load_tokenizer(str(run / "hf"))
    validation = packed_dataset(
        resolve_sources([str(corpus)]), TEXT, tokenizer, seq_len=32, val_fraction=0.05, cache_dir=tmp / "cache"
    )["validation"]
    model = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    blocks = validation["input_ids"][:32].long()
    with torch.no_grad():
        losses = [model(batch, labels=batch).loss.item() for batch in blocks.split(8)]
    assert math.exp(sum(losses) / len(losses)) == pytest.approx(last_eval_ppl, rel=1e-4)


def test_run_folder_holds_config_tokenizer_and_metrics(layout_runs):
    import json

    _, runs = layout_runs
    run = runs["pp2_dp2"]
    config = json.loads((run / "run_config.json").read_text())
    topology = config["topology"]
    assert (topology["world_size"], topology["pipeline_stages"], topology["data_parallel"]) == (4, 2, 2)
    assert topology["micro_batches_per_step"] == 2
    stages = topology["stages"]
    assert [s["layers"][0] for s in stages] == ["EmbeddingPipe", "DecoderLayerPipe"]
    assert stages[1]["layers"][-2:] == ["FinalNormPipe", "EmbeddingPipe"]  # the tied head closes the last stage
    hf_params = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(run / "hf").parameters())
    assert config["parameters"] == sum(s["parameters"] for s in stages) == hf_params
    assert config["deepspeed"]["train_batch_size"] == 8
    assert (run / "tokenizer" / "tokenizer.json").exists()
    metrics = read_metrics(run)
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_sec", "samples_per_sec"} <= m.keys() for m in metrics)
    assert [m["step"] for m in metrics if "eval_ppl" in m] == [3, 6]


def test_exports_of_pp2_and_pp1_runs_agree(layout_runs):
    from safetensors.torch import load_file

    _, runs = layout_runs
    pp1, pp2 = (load_file(runs[name] / "hf" / "model.safetensors") for name in ("pp1", "pp2"))
    assert pp1.keys() == pp2.keys()
    assert max((pp1[k] - pp2[k]).abs().max().item() for k in pp1) <= 1e-5


def test_pipeline_stages_see_identical_batches_and_replicas_disjoint_ones(layout_runs):
    """What the engines of real ranks actually pulled from their data iterators."""
    import json

    _, runs = layout_runs

    def trace(run, name):
        return [json.loads(line) for line in (run / "batches" / name).read_text().splitlines()]

    (single,) = [trace(runs["pp1"], "stage0_dp0.jsonl")]
    for run, replicas in ((runs["pp2"], 1), (runs["pp2_dp2"], 2)):
        for dp in range(replicas):  # the first and the last stage of a replica consume the same micro-batches
            assert trace(run, f"stage0_dp{dp}.jsonl") == trace(run, f"stage1_dp{dp}.jsonl")
        for step in range(1, STEPS + 1):
            shares = [
                [b for r in trace(run, f"stage0_dp{dp}.jsonl") if r["step"] == step for b in r["blocks"]]
                for dp in range(replicas)
            ]
            assert not set(shares[0]) & set(shares[-1]) or replicas == 1
            assert sorted(sum(shares, [])) == sorted(b for r in single if r["step"] == step for b in r["blocks"])


def test_timeline_shows_1f1b_on_every_stage(layout_runs):
    import json

    _, runs = layout_runs
    for name, stages, micro_batches in (("pp2", 2, 4), ("pp2_dp2", 2, 2)):
        timeline = runs[name] / "timeline"
        assert (timeline / "step_2.png").stat().st_size > 10_000
        events = json.loads((timeline / "step_2.trace.json").read_text())["traceEvents"]
        bubble = json.loads((timeline / "step_2.bubble.json").read_text())
        assert bubble["theory"] == (stages - 1) / (micro_batches + stages - 1)
        for stage in range(stages):
            for dp in {e["tid"] for e in events if e["ph"] == "X"}:
                order = "".join(
                    e["name"][0]
                    for e in events
                    if e["ph"] == "X"
                    and e["pid"] == stage
                    and e["tid"] == dp
                    and e["name"] in ("ForwardPass", "BackwardPass")
                )
                warmup = min(stages - stage, micro_batches)  # micro-batches in flight, never all m as in GPipe
                assert order == "F" * warmup + "BF" * (micro_batches - warmup) + "B" * warmup, (name, stage, order)
                names = {e["name"] for e in events if e["pid"] == stage and e.get("tid") == dp}
                assert {"LoadMicroBatch", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep"} <= names or stage > 0


def test_timeline_shows_dualpipev_as_deepspeed_schedules_it(layout_runs):
    """Each rank's forwards and backwards, with their phases, in the order of DeepSpeed's DualPipeV instructions,
    and its bubble beside the theory replayed from them."""
    import json

    from train.planning.schedules import bubble_theory, compute_streams

    _, runs = layout_runs
    for name, micro_batches in (("pp2_dualpipev", 8), ("pp2_dp2_dualpipev", 4)):
        timeline = runs[name] / "timeline"
        events = json.loads((timeline / "step_2.trace.json").read_text())["traceEvents"]
        bubble = json.loads((timeline / "step_2.bubble.json").read_text())
        assert bubble["schedule"] == "dualpipev"
        assert bubble["theory"] == bubble_theory("dualpipev", 2, micro_batches) < (2 - 1) / (micro_batches + 2 - 1)
        expected = compute_streams("dualpipev", 2, micro_batches)
        for rank in range(2):
            for dp in {e["tid"] for e in events if e["ph"] == "X"}:
                order = [
                    (e["name"][0], e["args"]["phase"])
                    for e in events
                    if e["ph"] == "X"
                    and e["pid"] == rank
                    and e["tid"] == dp
                    and e["name"] in ("ForwardPass", "BackwardPass")
                ]
                assert order == expected[rank], (name, rank, order)
                assert {p for _, p in order} == {0, 1}


def test_flops_partition_is_the_balanced_split_of_layer_costs(layout_runs):
    import json

    from models.architecture import discover
    from models.flops import flops_partition
    from models.hf_weights import config_from_dict

    _, runs = layout_runs
    config = json.loads((runs["pp2_flops_ac"] / "run_config.json").read_text())
    expected = flops_partition(discover(config_from_dict(config["model"])), 32, 2)
    assert config["topology"]["stage_layer_bounds"] == expected


def test_flops_partition_unloads_the_head_stage_of_the_default_model():
    """gpt2-tiny: the tied head (8192 x 128) costs ~4.5 blocks; parameters put 2 blocks beside it."""
    from models.architecture import discover
    from models.flops import flops_partition, layer_flops
    from models.presets import resolve_model_config

    config = discover(resolve_model_config("gpt2-tiny", None, 8192))
    costs = layer_flops(config, 128)
    bounds = flops_partition(config, 128, 2)
    assert bounds == [0, 5, 7]  # embedding and 4 blocks | final norm, head and loss
    assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) < sum(costs[3:])  # beats [0, 3, 7]


def test_planner_partition_and_parameters_equal_what_the_pipeline_built(layout_runs):
    import json

    from models.architecture import discover
    from models.hf_weights import config_from_dict
    from train.planning.memory_model import plan_stages, stage_bounds

    _, runs = layout_runs
    for name in runs:
        config = json.loads((runs[name] / "run_config.json").read_text())
        method = config["args"]["partition_method"]
        topology, model = config["topology"], discover(config_from_dict(config["model"]))
        stages, dp, schedule = topology["pipeline_stages"], topology["data_parallel"], topology["schedule"]
        all_stages = stages * (2 if schedule == "dualpipev" else 1)
        assert stage_bounds(model, all_stages, method, 32) == topology["stage_layer_bounds"], name
        plans = plan_stages(
            model, config["deepspeed"], stages=stages, data_parallel=dp, seq_len=32, method=method, schedule=schedule
        )
        assert [p.parameters for p in plans] == [s["held_parameters"] for s in topology["stages"]], name
        assert [p.layers for p in plans] == [s["layers"] for s in topology["stages"]], name
        assert [[list(b) for b in p.bounds] for p in plans] == [s["layer_bounds"] for s in topology["stages"]], name
