"""Tensor parallelism inside decoder layers (models/tensor_parallel.py) computes what the HF model computes.

Two gloo processes (one spawn for every family; a subgroup of the world, as the pipeline grid's slice group is)
build every family's tiny random model of tests/cases.py (same seed: the same weights), cut every decoder layer of
one copy by the family's plan with `slice_layer`, and run both copies forward and backward on the same input
embeddings (their gradient is the first layer's input gradient) and a fixed random weighting of the logits. The
logits and the input gradient equal HF's; every cut parameter's gradients, joined over the ranks, equal HF's
gradient of the full parameter; every replicated parameter's gradient equals HF's on each rank; exactly the cut
parameters carry `model_parallel`. Families without a plan for their layers are refused in one line.
"""

import copy
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deepspeed.runtime.utils import is_model_parallel_parameter
from transformers import CONFIG_MAPPING

from models.architecture import discover
from models.tensor_parallel import check_tensor_parallel, slice_layer, tp_styles
from tests.cases import CASES, FAMILY_CASES, FAMILY_IDS, MOE_CASES, SEQ, VOCAB, hf_model
from tests.helpers import free_port

SIZE = 2
# transformers 5.24 gives these no base_model_tp_plan entries for their decoder layers.
REFUSED = ("gpt2", "gpt_oss")
OUTPUT_TOLERANCE = 1e-5  # absolute, on logits of order 1 (fp32: sums split in two, then added)
GRAD_TOLERANCE = 1e-5  # relative to the gradient's largest entry


def _errors(hf: torch.nn.Module, sliced: torch.nn.Module, plans: dict, group) -> dict:
    """{parameter: (cut, marked, error of its gradient)}: cut ones joined over the group first."""
    cut = {f"{prefix}.{piece.name}": piece for prefix, plan in plans.items() for piece in plan.slices}
    theirs, errors = dict(hf.named_parameters()), {}
    for name, param in sliced.named_parameters():
        grad, expected = param.grad, theirs[name].grad
        if expected is None:  # the token embedding: the input embeddings are given
            errors[name] = (False, is_model_parallel_parameter(param), 0.0 if grad is None else float("inf"))
            continue
        if name in cut:
            parts = [torch.empty_like(grad) for _ in range(SIZE)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = cut[name].join(parts)
        error = (grad - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
        errors[name] = (name in cut, is_model_parallel_parameter(param), error)  # as DeepSpeed 0.19.8's grad norm
    return errors


def _compare(family: str, settings: dict, rank: int, group) -> dict:
    hf = hf_model(family, settings)
    check_tensor_parallel(hf.config, SIZE)
    sliced, arch = copy.deepcopy(hf), discover(hf.config)
    styles = tp_styles(arch)
    paths = [arch.layer_path(i) for i in range(arch.num_layers)]
    plans = {path: slice_layer(sliced.get_submodule(path), styles, rank, SIZE, group) for path in paths}
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    weighting = torch.randn(2, SEQ, VOCAB, generator=generator)
    outputs = []
    for model in (hf, sliced):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds).logits
        (logits * weighting).sum().backward()
        outputs.append((logits.detach(), embeds.grad))
    (logits, input_grad), (sliced_logits, sliced_input_grad) = outputs
    return {
        "logits": (sliced_logits - logits).abs().max().item(),
        "input_grad": (sliced_input_grad - input_grad).abs().max().item() / input_grad.abs().max().item(),
        "params": _errors(hf, sliced, plans, group),
        "cut_shapes": {
            name: (tuple(p.shape), tuple(hf.get_parameter(name).shape))
            for name, p in sliced.named_parameters()
            if is_model_parallel_parameter(p)
        },
    }


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=SIZE)
    group = dist.new_group(list(range(SIZE)))
    results = {}
    for case_id, (family, _, settings) in zip(FAMILY_IDS, FAMILY_CASES, strict=True):
        try:
            results[case_id] = _compare(family, settings, rank, group)
        except ValueError as e:
            results[case_id] = {"refused": str(e)}
    every_rank = [None] * SIZE
    dist.all_gather_object(every_rank, results, group=group)
    if rank == 0:
        torch.save(every_rank, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results() -> list[dict]:
    """Every rank's {case id: errors or refusal}."""
    with tempfile.NamedTemporaryFile(suffix=".pt") as out:
        mp.spawn(_worker, args=(free_port(), out.name), nprocs=SIZE)
        return torch.load(out.name, weights_only=False)


SUPPORTED = [i for i, (family, _, _) in zip(FAMILY_IDS, FAMILY_CASES, strict=True) if family not in REFUSED]


@pytest.mark.parametrize("case_id", SUPPORTED)
def test_sliced_layers_compute_what_hf_computes(results, case_id):
    for rank, by_case in enumerate(results):
        result = by_case[case_id]
        assert "refused" not in result, result
        assert result["logits"] <= OUTPUT_TOLERANCE, (rank, result["logits"])
        assert result["input_grad"] <= GRAD_TOLERANCE, (rank, result["input_grad"])
        wrong = {name: e for name, e in result["params"].items() if e[2] > GRAD_TOLERANCE}
        assert not wrong, (rank, wrong)
        assert all(cut == marked for cut, marked, _ in result["params"].values()), rank
        cut = result["cut_shapes"]
        assert cut and any(".mlp." in name for name in cut), cut  # attention and MLP or experts both cut
        for name, (mine, full) in cut.items():
            assert sum(a != b for a, b in zip(mine, full, strict=True)) == 1, name  # one dimension cut
            assert torch.Size(mine).numel() * SIZE == torch.Size(full).numel(), name


@pytest.mark.parametrize("family", REFUSED)
def test_families_without_a_plan_are_refused(results, family):
    (case_id,) = {i for i, (f, _, _) in zip(FAMILY_IDS, FAMILY_CASES, strict=True) if f == family}
    message = results[0][case_id]["refused"]
    assert "\n" not in message and "no tensor-parallel plan" in message and family in message, message


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
