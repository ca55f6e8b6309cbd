"""The planner under tensor parallelism (train/planning/tensor_parallel.py, step_time.py, layout_search.py): a rank's
parameters and collectives from the shapes, the activations of a cut layer, and `--search-stages` over TP sizes."""

import json
import re
from fractions import Fraction

import pytest
from transformers import CONFIG_MAPPING

import train.planning.machine
from models.architecture import discover
from tests.helpers import ds_config, tiny_llama, write_ds_config
from train.config.args import parse_args
from train.plan import build_parser, main, make_plan
from train.planning.activations import _saved_bytes, saved_bytes
from train.planning.machine import INTRA_NODE_BUS_GBPS
from train.planning.memory_model import plan_stages

# tiny_llama: h 64, 4 heads and 2 key/value heads of 16, SwiGLU 96, 4 layers, untied 512-token vocabulary
H, KV, FF, VOCAB = 64, 2 * 16, 96, 512
CUT = H * H + 2 * H * KV + H * H + 3 * H * FF  # q, k, v, o and gate, up, down: every matrix of a layer is cut
WHOLE = 2 * H  # its two RMSNorms


def _arch():
    return discover(CONFIG_MAPPING["llama"](**tiny_llama()))


def test_a_rank_holds_half_of_every_cut_matrix_and_whole_norms_embedding_and_head():
    """TP 2 x PP 2, fp32, ZeRO-1 over 1 replica: stage 0 holds the embedding and 2 layers, stage 1 2 layers, the
    final norm and the head (the flops partition of tiny_llama); its weights, optimizer and gradients follow."""
    plans = plan_stages(
        _arch(), ds_config(8, 2), stages=2, data_parallel=1, seq_len=32, method="flops", tensor_parallel=2
    )
    assert [p.bounds for p in plans] == [[(0, 3)], [(3, 7)]]
    layer = CUT // 2 + WHOLE
    expected = [VOCAB * H + 2 * layer, 2 * layer + H + VOCAB * H]
    assert [p.parameters for p in plans] == expected
    for plan, params in zip(plans, expected, strict=True):
        assert plan.memory["weights"] == 4 * params and plan.memory["optimizer"] == 12 * params
        assert plan.memory["backward_gradients"] == 4 * params


def test_a_cut_layers_activations_extrapolate_exactly_and_keep_its_input_whole():
    """What rank 0 of a layer cut 2 ways saves for 96 tokens, measured on the full-width layer, equals the planner's
    count from its cut narrow copies; it is less than the whole layer's and more than half of it: the layer's input,
    norms and the cut projections' input stay whole (Megatron's accounting without sequence parallelism)."""
    arch = _arch()
    text = json.dumps(json.loads(arch.config.to_json_string(use_diff=False)), sort_keys=True)
    cut = _saved_bytes(text, Fraction(1), 96, "fp32", None, 0, 2)
    whole = _saved_bytes(text, Fraction(1), 96, "fp32", None, 0, 1)
    assert saved_bytes(arch, "fp32", seq_len=96, tp=2).micro_batch(96) == pytest.approx(cut, rel=1e-9)
    # at least the layer's input, the attention's and the MLP's normed inputs: three [96, 64] fp32 tensors
    assert whole / 2 + 3 * 96 * H * 4 / 2 <= cut < whole


@pytest.fixture
def model_and_ds(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("NUM_GPUS", raising=False)
    CONFIG_MAPPING["llama"](**tiny_llama()).save_pretrained(tmp_path / "model")
    return ["--model-config", str(tmp_path / "model"), "--seq-len", "32"], str(write_ds_config(tmp_path / "ds.json"))


def test_the_collectives_per_step_follow_the_plans_styles(model_and_ds):
    """Llama's plan: q, k, v, gate and up all-reduce their [T, h] input's gradient, o and down their [T, h] output:
    7 h elements per token and layer, over the busiest rank's 2 layers, 4 micro-batches of 2 x 32 tokens, fp32;
    a ring moves 2 (t - 1) / t of them at the GPU's bus bandwidth."""
    model, ds = model_and_ds
    extra = ["--gpus-per-node", "2", "--gpu", "H100", "--pipeline-stages", "1", "--tensor-parallel", "2"]
    plan = make_plan(parse_args([*model, *extra, "--deepspeed_config", ds], build_parser()))
    expected = 4 * 7 * H * 4 * 2 * 32 * 4  # layers x elements per token x micro-batches x tokens x bytes
    assert plan.tensor_parallel == 2 and plan.time.all_reduce_bytes == expected and plan.time.all_gather_bytes == 0
    assert plan.time.collectives == pytest.approx(2 * expected * (1 / 2) / (INTRA_NODE_BUS_GBPS["H100"] * 1e9))


def test_the_search_cuts_the_layers_within_a_node_when_whole_ones_do_not_fit(model_and_ds, capsys, monkeypatch):
    """This machine's 2 CPU ranks (one node), each given just over TP 2's peak: the whole model on one rank does not
    fit, TP 2 x PP 1 does and has no bubble; the search says so."""
    model, ds = model_and_ds
    arch = discover(CONFIG_MAPPING["llama"](**tiny_llama()))
    peaks = {
        tp: max(
            p.peak
            for p in plan_stages(
                arch,
                json.load(open(ds)),
                stages=1,
                data_parallel=2 // tp,
                seq_len=32,
                method="flops",
                tensor_parallel=tp,
            )
        )  # fmt: skip
        for tp in (1, 2)
    }
    assert peaks[2] < peaks[1]
    monkeypatch.setattr(train.planning.machine, "machine_memory", lambda: int(2 * (peaks[2] + peaks[1]) / 2 / 0.9))
    assert main([*model, "--search-stages", "--deepspeed_config", ds]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("search: TP 2 x PP 1: fits"), out[2]
    assert json.loads(out[-1])["tensor_parallel"] == 2 and json.loads(out[-1])["stages"] == 1
    assert "warning" not in "\n".join(out)


def test_the_search_never_proposes_a_size_the_model_cannot_be_cut_to(model_and_ds, capsys):
    """4 GPUs per node: TP 4 would split tiny_llama's 2 key/value heads, so it is listed as refused (the trainer's
    line) and no layout with it is planned; 1 and 2 are."""
    model, ds = model_and_ds
    assert main([*model, "--nodes", "2", "--gpus-per-node", "4", "--search-stages", "--deepspeed_config", ds]) == 0
    out = capsys.readouterr().out.splitlines()
    search = [line for line in out if line.startswith(("search: ", "  TP "))]
    assert [re.search(r"TP \d+", line).group() for line in search] == ["TP 1", "TP 2", "TP 4"], search
    assert "TP 4: tensor-parallel size 4: llama has 2 key/value heads" in search[-1]
    assert json.loads(out[-1])["tensor_parallel"] == 1  # fits whole: no collectives, the fewest stages


def test_a_tensor_parallel_size_the_trainer_refuses_is_refused_in_one_line(model_and_ds, capsys):
    model, ds = model_and_ds
    assert main([*model, "--gpus-per-node", "4", "--tensor-parallel", "4", "--pipeline-stages", "1",
                 "--deepspeed_config", ds]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key/value heads" in err[0], err
