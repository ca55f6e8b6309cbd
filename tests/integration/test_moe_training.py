"""Mixtures of experts with their router loss over real ranks: every layout trains one stage's losses, and one stage
trains what a plain PyTorch loop on `AutoModelForCausalLM` trains.

Two tiny families, each started from a folder transformers' `save_pretrained` wrote (experts one by one, fused per
stage on load), with `--router-aux-loss-coef 0.3`: the running router sums cross every stage boundary beside the
hidden states (models/router_loss.py).
- Qwen2-MoE: a shared expert with its gate; 8 experts, top-2; layers 0-2 dense, so a first stage may hold no router.
- gpt-oss: attention sinks (eager attention), sliding and full layers alternating, router and expert biases.
3 stages and pp=2 x dp=2 (Qwen2-MoE), pp=2 and DualPipeV (gpt-oss) train pp=1's per-step `loss` and `aux_loss` (the
load-balancing term before its coefficient) and export pp=1's weights; pp=1 trains the losses and weights of the
transformers model trained by hand on the same blocks (`output_router_logits=True`: its `.loss` is cross-entropy +
coef x aux).
Every layout also logs pp=1's expert load, exactly: the same integer picks over the same global batches, counted on
the stage that holds each layer and summed over the replicas; 3 stages checkpoint every layer's activations (the
recompute does not count).
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.cases import hf_model
from tests.helpers import (
    launch,
    read_metrics,
    replay_by_hand,
    small_run_args,
    train_blocks,
    write_ds_config,
)
from train.build import parameter_groups

STEPS, COEF = 6, 0.3
_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    num_experts_per_tok=2,
)
MODELS = {
    "qwen2_moe": dict(
        _SHAPE,
        intermediate_size=96,
        num_hidden_layers=6,
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[0, 1, 2],
    ),
    "gpt_oss": dict(
        _SHAPE, intermediate_size=32, num_hidden_layers=4, num_local_experts=8, head_dim=16, sliding_window=9
    ),
}
LAYOUTS = {  # name: (pipeline stages, ranks, extra flags)
    "pp1": (1, 1, []),
    "pp2": (2, 2, []),
    "pp3": (3, 3, ["--activation-checkpoint-interval", 1]),
    "pp2_dp2": (2, 4, []),
    "pp2_dualpipev": (2, 2, ["--schedule", "dualpipev"]),
}
# Each family trains pp=1 and two of the other layouts (every layout is run by one family; 6 launches, not 10):
# Qwen2-MoE's dense first layers leave 3 stages' first one without a router.
OTHER_LAYOUTS = {"qwen2_moe": ("pp3", "pp2_dp2"), "gpt_oss": ("pp2", "pp2_dualpipev")}
CASES = [(family, layout) for family, layouts in OTHER_LAYOUTS.items() for layout in layouts]
MOE_LAYERS = {"qwen2_moe": [3, 4, 5], "gpt_oss": [0, 1, 2, 3]}  # Qwen2-MoE's mlp_only_layers 0-2 are dense
EXPERT_LOAD = ("expert_load_max", "expert_load_max_layer", "expert_load_mean", "expert_load_idle")


@pytest.fixture(scope="module")
def moe_runs(corpus, tokenizer_dir, tmp_path_factory) -> dict:
    """family -> (its folder: base/, ds.json, cache/; the runs by layout)."""
    families = {}
    for family, settings in MODELS.items():
        tmp = tmp_path_factory.mktemp(f"moe_{family}")
        hf_model(family, settings).save_pretrained(tmp / "base")
        args = small_run_args(
            corpus,
            tokenizer_dir,
            tmp,
            write_ds_config(tmp / "ds.json"),
            None,
            STEPS,
            model=tmp / "base",
            router_aux_loss_coef=COEF,
            trace_batches=True,
        )
        runs = {}
        for name in ("pp1", *OTHER_LAYOUTS[family]):
            stages, ranks, extra = LAYOUTS[name]
            runs[name] = tmp / name
            launch([*args, "--pipeline-stages", stages, *extra, "--output-dir", runs[name]], ranks)
        families[family] = tmp, runs
    return families


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_every_layout_trains_the_loss_and_router_loss_of_one_stage(moe_runs, family, layout):
    _, runs = moe_runs[family]
    one, other = read_metrics(runs["pp1"]), read_metrics(runs[layout])
    assert len(one) == len(other) == STEPS and one[-1]["loss"] < one[0]["loss"]
    assert all(m["aux_loss"] > 0 for m in one)
    for ours, reference in zip(other, one, strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5), (layout, ours, reference)
        assert ours["aux_loss"] == pytest.approx(reference["aux_loss"], rel=1e-5), (layout, ours, reference)
    pp1, theirs = (load_file(runs[name] / "hf" / "model.safetensors") for name in ("pp1", layout))
    assert pp1.keys() == theirs.keys()
    assert max((pp1[k] - theirs[k]).abs().max().item() for k in pp1) <= 1e-5


@pytest.mark.parametrize("family", list(MODELS))
def test_one_stage_trains_what_a_plain_loop_on_the_transformers_model_trains(moe_runs, family, corpus, tokenizer_dir):
    tmp, runs = moe_runs[family]
    model = AutoModelForCausalLM.from_pretrained(
        tmp / "base", dtype=torch.float32, output_router_logits=True, router_aux_loss_coef=COEF
    ).train()
    blocks = train_blocks(corpus, tokenizer_dir, tmp / "cache")
    expected = replay_by_hand(model, parameter_groups(model), runs["pp1"], blocks, STEPS)
    losses = [m["loss"] for m in read_metrics(runs["pp1"])]
    for ours, reference in zip(losses, expected, strict=True):
        assert abs(ours - reference) <= 1e-5 * abs(reference), (family, losses, expected)
    # The export stores experts one by one, as transformers writes them: compare the models it loads into.
    exported = AutoModelForCausalLM.from_pretrained(runs["pp1"] / "hf", dtype=torch.float32).state_dict()
    by_hand = model.state_dict()
    assert exported.keys() == by_hand.keys()
    assert max((exported[k] - by_hand[k]).abs().max().item() for k in exported) <= 1e-5


def read_expert_load(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "expert_load.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("family", "layout"), CASES, ids=[f"{f}-{layout}" for f, layout in CASES])
def test_every_layout_logs_the_expert_load_of_one_stage(moe_runs, family, layout):
    _, runs = moe_runs[family]
    one, other = read_metrics(runs["pp1"]), read_metrics(runs[layout])
    settings = MODELS[family]
    experts = settings.get("num_experts") or settings["num_local_experts"]
    top_k = settings["num_experts_per_tok"]
    for ours, reference in zip(other, one, strict=True):
        assert {k: ours[k] for k in EXPERT_LOAD} == {k: reference[k] for k in EXPERT_LOAD}, (layout, ours)
        assert reference["expert_load_max_layer"] in MOE_LAYERS[family]
        assert 1.0 < reference["expert_load_max"] <= experts / top_k
    table, theirs = read_expert_load(runs["pp1"]), read_expert_load(runs[layout])
    assert theirs == table
    # An evaluation every 3 steps; the MoE layers only; each layer's picks: 3 steps of the global batch (8 blocks of
    # 32 tokens, tests/helpers.py) x top-k.
    assert [(line["step"], line["first_step"]) for line in table] == [(3, 1), (6, 4)]
    for line in table:
        assert [row["layer"] for row in line["layers"]] == MOE_LAYERS[family]
        assert all(len(row["counts"]) == experts and sum(row["counts"]) == 3 * 8 * 32 * top_k for row in line["layers"])
