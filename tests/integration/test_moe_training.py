"""A mixture of experts with its router loss over real ranks: every layout trains one stage's losses.

A tiny Qwen2-MoE (shared expert with its gate; 8 experts, top-2; layers 0-2 dense, so a first stage may hold no
router) with `--router-aux-loss-coef 0.3`: the running router sums cross every stage boundary beside the hidden
states (models/router_loss.py). pp=2, 3 stages, pp=2 x dp=2 and DualPipeV train pp=1's per-step `loss` and
`aux_loss` (the load-balancing term before its coefficient), and export pp=1's weights. They log pp=1's expert
load too, exactly: the same integer picks over the same global batches, counted on the stage that holds each
layer and summed over the replicas; 3 stages checkpoint every layer's activations (the recompute does not count).
"""

import json

import pytest
from safetensors.torch import load_file

from tests.helpers import launch, read_metrics, small_run_args, write_ds_config, write_json

STEPS = 6
MODEL = {
    "model_type": "qwen2_moe",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "mlp_only_layers": [0, 1, 2],
}
LAYOUTS = {  # name: (pipeline stages, ranks, extra flags)
    "pp1": (1, 1, []),
    "pp2": (2, 2, []),
    "pp3": (3, 3, ["--activation-checkpoint-interval", 1]),
    "pp2_dp2": (2, 4, []),
    "pp2_dualpipev": (2, 2, ["--schedule", "dualpipev"]),
}


@pytest.fixture(scope="module")
def moe_runs(corpus, tokenizer_dir, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("moe")
    model, ds = write_json(tmp / "model.json", MODEL), write_ds_config(tmp / "ds.json")
    args = small_run_args(corpus, tokenizer_dir, tmp, ds, model, STEPS, router_aux_loss_coef=0.3)
    runs = {}
    for name, (stages, ranks, extra) in LAYOUTS.items():
        runs[name] = tmp / name
        launch([*args, "--pipeline-stages", stages, *extra, "--output-dir", runs[name]], ranks)
    return runs


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "pp1"])
def test_every_layout_trains_the_loss_and_router_loss_of_one_stage(moe_runs, layout):
    one, other = read_metrics(moe_runs["pp1"]), read_metrics(moe_runs[layout])
    assert len(one) == len(other) == STEPS and one[-1]["loss"] < one[0]["loss"]
    assert all(m["aux_loss"] > 0 for m in one)
    for ours, reference in zip(other, one, strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5), (layout, ours, reference)
        assert ours["aux_loss"] == pytest.approx(reference["aux_loss"], rel=1e-5), (layout, ours, reference)
    pp1, theirs = (load_file(moe_runs[name] / "hf" / "model.safetensors") for name in ("pp1", layout))
    assert pp1.keys() == theirs.keys()
    assert max((pp1[k] - theirs[k]).abs().max().item() for k in pp1) <= 1e-5


EXPERT_LOAD = ("expert_load_max", "expert_load_max_layer", "expert_load_mean", "expert_load_idle")


def read_expert_load(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "expert_load.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "pp1"])
def test_every_layout_logs_the_expert_load_of_one_stage(moe_runs, layout):
    one, other = read_metrics(moe_runs["pp1"]), read_metrics(moe_runs[layout])
    experts, top_k = MODEL["num_experts"], MODEL["num_experts_per_tok"]
    for ours, reference in zip(other, one, strict=True):
        assert {k: ours[k] for k in EXPERT_LOAD} == {k: reference[k] for k in EXPERT_LOAD}, (layout, ours)
        assert reference["expert_load_max_layer"] in (3, 4, 5) and 1.0 < reference["expert_load_max"] <= experts / top_k
    table, theirs = read_expert_load(moe_runs["pp1"]), read_expert_load(moe_runs[layout])
    assert theirs == table
    # An evaluation every 3 steps; the MoE layers only (mlp_only_layers 0-2 are dense); each layer's picks: 3 steps
    # of the global batch (8 blocks of 32 tokens, tests/helpers.py) x top-k.
    assert [(line["step"], line["first_step"]) for line in table] == [(3, 1), (6, 4)]
    for line in table:
        assert [row["layer"] for row in line["layers"]] == [3, 4, 5]
        assert all(len(row["counts"]) == experts and sum(row["counts"]) == 3 * 8 * 32 * top_k for row in line["layers"])
