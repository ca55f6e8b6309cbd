"""A cut decoder layer through DeepSpeed's universal checkpoint, in-process with DeepSpeed's own functions: the
slices of every parameter, written as its extraction writes them, are joined by its converter (`merge_tp_slices`)
under the patterns `universal_checkpoint_patterns` declares into the full tensors (from TP 2; from TP 1 as they
are), and cut again by its loader (`load_hp_checkpoint_state`) for each rank of a run marked by
`mark_universal_slice`, or kept whole for one rank.
A MoE layer (Qwen2-MoE) has every kind of cut: 2-D colwise (q/k/v and their biases) and rowwise (o_proj), a 3-D
fused gate/up (2 blocks along dimension 1) and a 3-D rowwise down_proj (dimension 2), replicated norms, router and
shared expert. And the weights-only path: layer files of one tensor-parallel size re-cut for another. Over real
ranks: tests/integration/test_tensor_parallel_training.py."""

import pytest
import torch
from deepspeed.checkpoint.ds_to_universal import dump_param_fragment, merge_tp_slices
from deepspeed.checkpoint.universal_checkpoint import load_hp_checkpoint_state
from deepspeed.utils.tensor_fragment import fragment_address, tensor_fragment

from models.architecture import discover
from models.deepspeed_internals import mark_universal_slice
from models.tensor_parallel import plan_layer, tp_styles
from models.tensor_parallel_stage import resliced_layer_state
from models.tensor_parallel_universal import universal_checkpoint_patterns
from tests.cases import MOE_CASES, hf_model

SIZE = 2
STATES = {"fp32": 1.0, "exp_avg": 2.0, "exp_avg_sq": 3.0}  # each state a multiple of the weight: told apart


@pytest.fixture(scope="module")
def moe_layer():
    """(architecture, full tensors by pipeline name, slices by name) of Qwen2-MoE's layer 0 as pipeline layer 1
    (`1.layer.<name>`), cut 2 ways."""
    family, _, settings = next(case for case in MOE_CASES if case[0] == "qwen2_moe")
    model = hf_model(family, settings)
    arch = discover(model.config)
    layer = model.get_submodule(arch.layer_path(0))
    slices = {f"1.layer.{p.name}": p for p in plan_layer(layer, tp_styles(arch), SIZE).slices}
    return arch, {f"1.layer.{name}": param.detach().clone() for name, param in layer.named_parameters()}, slices


@pytest.fixture(scope="module", params=[SIZE, 1])
def converted(request, moe_layer, tmp_path_factory):
    """(full tensors, slices, the converter's output folder) of the layer saved cut 2 ways (or whole by one rank,
    which declares no patterns: DeepSpeed's default, concatenation along dimension 0, joins one slice)."""
    saved, (_, full, slices) = request.param, moe_layer
    layout = {name: None if name not in slices else (slices[name].dim, tuple(t.shape), slices[name].pieces)
              for name, t in full.items()}  # fmt: skip
    info = universal_checkpoint_patterns(layout, SIZE) if saved > 1 else {}
    tmp = tmp_path_factory.mktemp("universal")
    shapes = {}  # per slice rank, as DeepSpeed's main reads them from each rank's `param_shapes`
    for name, tensor in full.items():
        parts = [slices[name].take(tensor, r, saved) if name in slices and saved > 1 else tensor for r in range(saved)]
        shapes[name] = [part.shape for part in parts]
        for rank, part in enumerate(parts):
            for state, scale in STATES.items():
                flat = (part * scale).flatten()
                dump_param_fragment(str(tmp / "slices"), rank, 0, state, flat, name, 0, flat.numel())
    unused = set.intersection(
        *(set(merge_tp_slices(info, str(tmp / "zero"), str(tmp / "slices"), saved, item)) for item in shapes.items())
    )
    assert not unused, unused  # DeepSpeed's --strict check: every declared pattern names a parameter
    return full, slices, tmp / "zero"


def test_the_converter_joins_every_slice_into_the_full_tensor(converted):
    full, slices, zero = converted
    assert {s.dim for s in slices.values()} == {0, 1, 2} and any(s.pieces == 2 for s in slices.values())
    for name, tensor in full.items():
        for state, scale in STATES.items():
            merged = torch.load(zero / name / f"{state}.pt", weights_only=False)["param"]
            assert torch.equal(merged, tensor * scale), (name, state)


@pytest.mark.parametrize("size", [1, SIZE])
def test_the_loader_cuts_each_rank_its_slice(converted, size):
    """What a rank of a TP `size` run gets of every state: its `Slice.take` part (a cut parameter, marked: from a
    one-rank checkpoint, whose converted files say "cut along 0", a rowwise weight is cut wrong without the mark),
    the whole tensor (replicated, or a run of one rank)."""
    full, slices, zero = converted
    for name, tensor in full.items():
        for rank in range(size):
            cut = slices.get(name) if size > 1 else None
            expected = cut.take(tensor, rank, size) if cut else tensor
            param = torch.nn.Parameter(torch.zeros_like(expected))
            if cut:
                mark_universal_slice(param, cut.dim, tuple(tensor.shape), cut.pieces)
            address = fragment_address(numel=param.numel(), start=0)
            hp = torch.zeros(param.numel())
            param._hp_mapping = tensor_fragment(param.view(-1), address, hp, address, {}, {}, False, 0)
            load_hp_checkpoint_state(param, str(zero / name), rank, size)
            assert torch.equal(hp, expected.flatten()), (name, rank)
            for state in ("exp_avg", "exp_avg_sq"):
                loaded = param._hp_mapping.optim_fragment[state]
                assert torch.equal(loaded, (expected * STATES[state]).flatten()), (name, rank, state)


@pytest.mark.parametrize("saved, size", [(SIZE, 1), (1, SIZE), (SIZE, SIZE)])
def test_layer_files_of_another_tensor_parallel_size_are_joined_and_cut_again(moe_layer, tmp_path, saved, size):
    """The weights-only path (`--reset-optimizer`): pipeline layer 1's files as TP `saved` wrote them, one per slice
    rank, give each rank of TP `size` its part (`resliced_layer_state`)."""
    arch, full, slices = moe_layer
    paths = []
    for rank in range(saved):
        state = {k[2:]: slices[k].take(v, rank, saved) if k in slices and saved > 1 else v for k, v in full.items()}
        paths.append(tmp_path / f"layer_01-model_{rank:02d}-model_states.pt")
        torch.save(state, paths[-1])
    for rank in range(size):
        state = resliced_layer_state(paths, arch, 1, rank, size)
        assert state.keys() == {k[2:] for k in full}
        for name, tensor in full.items():
            expected = slices[name].take(tensor, rank, size) if name in slices and size > 1 else tensor
            assert torch.equal(state[name[2:]], expected), (name, rank)
