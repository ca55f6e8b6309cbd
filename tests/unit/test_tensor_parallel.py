"""Tensor parallelism inside decoder layers (models/tensor_parallel.py) computes what the HF model computes.

Every family of tests/cases.py, in two gloo processes spawned once (tests/tensor_parallel_reference.py): every
decoder layer cut by the family's plan with `slice_layer`, the logits and the input gradient equal HF's, every cut
parameter's gradients joined over the ranks equal HF's gradient of the full parameter, every replicated parameter's
gradient equals HF's on each rank, and exactly the cut parameters are model-parallel for DeepSpeed. Families without
a plan for their layers, and what cannot be cut evenly, are refused in one line (in-process, from the config).
"""

import pytest
from transformers import CONFIG_MAPPING

from models.tensor_parallel import check_tensor_parallel, tp_styles
from tests.cases import CASES, FAMILY_CASES, FAMILY_IDS, MOE_CASES
from tests.tensor_parallel_reference import assert_equal, refusal, spawn_comparisons

# transformers 5.24 gives these no base_model_tp_plan entries for their decoder layers.
REFUSED = ("gpt2", "gpt_oss")
BY_ID = dict(zip(FAMILY_IDS, FAMILY_CASES, strict=True))


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    return spawn_comparisons([(case_id, family, settings) for case_id, (family, _, settings) in BY_ID.items()])


@pytest.mark.parametrize("case_id", [i for i, (family, _, _) in BY_ID.items() if family not in REFUSED])
def test_sliced_layers_compute_what_hf_computes(results, case_id):
    assert_equal(results[case_id])


@pytest.mark.parametrize("family", REFUSED)
def test_families_without_a_plan_are_refused(results, family):
    (case_id,) = [i for i, (f, _, _) in BY_ID.items() if f == family]
    message = refusal(results[case_id])
    assert message.startswith(f"tensor-parallel size 2: {family} has no tensor-parallel plan"), message


LLAMA = next(settings for family, _, settings in CASES if family == "llama")  # 4 heads, 2 key/value heads
SMALL = {k: LLAMA[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}


@pytest.mark.parametrize(
    "family, settings, size, expected",
    [
        ("llama", LLAMA, 4, "has 2 key/value heads, which do not divide among 4 ranks"),
        ("llama", LLAMA, 3, "has 4 attention heads, which do not divide among 3 ranks"),
        ("llama", dict(LLAMA, attention_dropout=0.1), 2, "sets dropout in its layers (attention_dropout=0.1)"),
        (
            "llama",
            dict(LLAMA, num_key_value_heads=4, intermediate_size=90),
            4,
            "mlp.gate_proj.weight has 90 features along dimension 0, not divisible by 4",
        ),
        ("cohere", dict(SMALL, use_qk_norm=True), 2, "self_attn.q_norm holds a weight per head"),
        ("gpt2", FAMILY_CASES[0][2], 2, "gpt2 has no tensor-parallel plan for its decoder layers"),
    ],
)
def test_what_cannot_be_cut_is_refused_in_one_line(family, settings, size, expected):
    with pytest.raises(ValueError) as refusal:
        check_tensor_parallel(CONFIG_MAPPING[family](**settings), size)
    message = str(refusal.value)
    assert expected in message and message.startswith(f"tensor-parallel size {size}: {family} "), message
    assert "\n" not in message and "; " in message, message  # the problem, then the fix


def test_a_family_whose_plan_leaves_out_per_head_norms_gets_them_summed():
    """transformers 5.24's GLM-4.5 plan cuts q/k/v by heads but omits the per-head q/k norms that Qwen3's plan marks
    `replicated_with_grad_allreduce` (without them its norm gradients were off by 94% in the spawned test)."""
    config = CONFIG_MAPPING["glm4_moe"](**next(s for family, _, s in MOE_CASES if family == "glm4_moe"))
    assert "self_attn.q_norm" not in {k.removeprefix("layers.*.") for k in config.base_model_tp_plan}
    styles = tp_styles(config)
    assert styles["self_attn.q_norm"] == styles["self_attn.k_norm"] == "replicated_with_grad_allreduce"
    assert check_tensor_parallel(config, 2) is None
