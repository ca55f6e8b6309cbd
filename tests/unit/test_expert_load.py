"""The expert load counted by the pipeline is the picks the HF model's routers make, once per training forward.

The reference is each HF router's own third output, the top-k indices it hands the experts (for DeepSeek-V3 the
group-limited pick steered by `e_score_correction_bias`), counted per decoder layer. The pipeline reads what its
experts modules receive instead (models/expert_load.py).
"""

import json
from types import SimpleNamespace

import deepspeed
import pytest
import torch

from models.architecture import discover
from models.hf_weights import pipeline_param_to_hf
from models.pipeline import build_pipeline
from tests.cases import CASES, MOE_CASES, SEQ, VOCAB, hf_model
from tests.helpers import write_ds_config
from train.observe.evaluate import sample_through_pipeline
from train.observe.expert_load import EXPERT_LOAD_FILE, ExpertLoad, expert_load_of, layer_rows, load_summary
from train.observe.metrics import MetricsLog, WandbSettings

# DeepSeek-V3: group-limited sigmoid routing, dense layer 0; gpt-oss: its experts take `router_indices`; Qwen2-MoE
# with its router loss on: the layers carry the router sums as well.
FAMILIES = {"deepseek_v3": {}, "gpt_oss": {}, "qwen2_moe": {"output_router_logits": True}}
COUNTED = [(family, dict(settings, **FAMILIES[family])) for family, _, settings in MOE_CASES if family in FAMILIES]


def pair(family: str, settings: dict, **pipeline):
    hf = hf_model(family, settings)
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ, **pipeline)
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, tensor in pipe.state_dict(keep_vars=True).items():
            tensor.copy_(theirs[pipeline_param_to_hf(arch, name)])
    return hf, pipe, arch


def hf_picks(hf, arch, batches: list[torch.Tensor]) -> torch.Tensor:
    """[MoE layers, E]: how often each layer's router picked each expert over `batches` (its indices output)."""
    table = torch.zeros(len(arch.experts.layers), arch.experts.num_experts, dtype=torch.int64)
    hooks = []
    for row, index in enumerate(arch.experts.layers):
        (router,) = [m for m in hf.model.layers[index].modules() if type(m).__name__.lower().endswith("topkrouter")]

        def count(_module, _inputs, out, row=row):
            table[row] += torch.bincount(out[2].reshape(-1), minlength=table.shape[1])

        hooks.append(router.register_forward_hook(count))
    with torch.no_grad():
        for ids in batches:
            hf(ids)
    for hook in hooks:
        hook.remove()
    return table


@pytest.mark.parametrize("case", COUNTED, ids=[family for family, _ in COUNTED])
def test_the_pipeline_counts_the_picks_of_the_hf_routers(case, one_rank_group):
    family, settings = case
    hf, pipe, arch = pair(family, settings)
    assert (arch.router_loss is not None) == settings.get("output_router_logits", False)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    expected = hf_picks(hf, arch, [ids])
    pipe.train()(ids)
    counted = pipe.expert_picks.take("cpu")
    assert torch.equal(counted, expected), (counted, expected)
    # Every token goes to top_k experts in every MoE layer; the dense layers (DeepSeek's layer 0) have no row.
    assert counted.sum(dim=1).tolist() == [ids.numel() * hf.config.num_experts_per_tok] * len(arch.experts.layers)
    assert len(arch.experts.layers) == sum(1 for m in hf.modules() if type(m).__name__.lower().endswith("topkrouter"))
    pipe.eval()(ids)  # evaluation and sampling forwards do not count, nor does the take leave anything behind
    assert not pipe.expert_picks.take("cpu").any()


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_step_counts_each_micro_batch_once_under_activation_checkpointing(reentrant, tmp_path, one_rank_group):
    """Every decoder layer checkpointed: the recompute in backward (reentrant or not) does not count again, and an
    evaluation and sampling after the step do not count into it; the evaluation table holds the steps since the last."""
    family, settings = next(case for case in COUNTED if case[0] == "deepseek_v3")
    hf, pipe, arch = pair(family, settings, activation_checkpoint_interval=1)
    ds = json.loads(write_ds_config(tmp_path / "ds.json", 6, 2).read_text().replace('"auto"', "10"))
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, model_parameters=list(pipe.parameters()), config={**ds, "pipeline": {"use_reentrant": reentrant}}
    )
    batches = list(torch.randint(0, VOCAB, (3, 2, SEQ), generator=torch.Generator().manual_seed(4)).unbind())
    expected = hf_picks(hf, arch, batches)  # steps 1-2 train at lr 0 (warm-up): the same weights twice
    load = ExpertLoad(pipe.expert_picks, output_dir=tmp_path, writes=True)
    for _ in range(2):
        load.begin_step()
        engine.train_batch(data_iter=iter([(ids, ids) for ids in batches]))
        engine.eval_batch(iter([(ids, ids) for ids in batches]))
        tokenizer = SimpleNamespace(eos_token_id=0, decode=lambda ids: ids.tolist())
        sample_through_pipeline(engine, tokenizer, [[5, 6, 7]] * 2, new_tokens=2, seq_len=SEQ, seed=0)
        assert load.step_metrics() == load_summary(expected.tolist(), arch.experts.layers)
    load.evaluation(step=2)
    (line,) = (tmp_path / EXPERT_LOAD_FILE).read_text().splitlines()
    record = json.loads(line)
    assert (record["step"], record["first_step"]) == (2, 1)
    assert [row["layer"] for row in record["layers"]] == list(arch.experts.layers) == [1, 2, 3]
    assert [row["counts"] for row in record["layers"]] == (2 * expected).tolist()


def test_the_compact_metrics_and_the_table():
    """4 experts, top-2, 8 tokens: 16 picks a layer, a mean of 4 per expert."""
    balanced, skewed, collapsed = [4, 4, 4, 4], [6, 2, 8, 0], [8, 8, 0, 0]
    summary = load_summary([balanced, collapsed, skewed], (3, 5, 6))
    # max/mean: 1.0 balanced; 8/4 = 2.0 = E/top_k, every token on the same two experts; skewed 8/4 = 2.0 too,
    # the first worst layer is named; the mean over layers (1 + 2 + 2) / 3; 3 experts with no token.
    assert summary == {
        "expert_load_max": 2.0,
        "expert_load_max_layer": 5,
        "expert_load_mean": 5 / 3,
        "expert_load_idle": 3,
    }
    assert load_summary([balanced, [5, 3, 4, 4]], (0, 1))["expert_load_max"] == 5 / 4
    (row,) = layer_rows([skewed], (7,))
    assert row == {
        "layer": 7,
        "counts": skewed,
        "picks": 16,
        "min_share": 0.0,
        "max_share": 0.5,
        "imbalance": 2.0,
        "dead": 1,
    }


def test_a_dense_model_counts_nothing_and_makes_no_collective(one_rank_group):
    family, _, settings = CASES[1]  # llama
    arch = discover(hf_model(family, settings).config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    assert arch.experts is None and pipe.expert_picks.take("cpu") is None
    assert expert_load_of(SimpleNamespace(module=pipe), output_dir=None, writes=False, start_step=0) is None


def test_a_resumed_run_rewinds_the_expert_load_file(tmp_path):
    lines = [json.dumps({"step": step, "layers": []}) for step in (3, 6)]
    (tmp_path / EXPERT_LOAD_FILE).write_text("\n".join(lines) + '\n{"step": 9, "lay')  # the last line cut off
    settings = dict(total_steps=9, interval=1, wandb=WandbSettings(project="p", mode="disabled"), run_config={})
    MetricsLog(output_dir=tmp_path, enabled=True, resume_step=3, **settings).finish()
    assert (tmp_path / EXPERT_LOAD_FILE).read_text() == lines[0] + "\n"
