"""Every use of DeepSpeed's private internals, in one file, each with the reason it is needed.

Checked against DeepSpeed 0.19.8 (`deepspeed/runtime/pipe/module.py`, `engine.py`, `dualpipev.py`,
`deepspeed/runtime/utils.py`, `deepspeed/ops/__init__.py`, `deepspeed/checkpoint/universal_checkpoint.py`)
and, for the process-group timeout DeepSpeed leaves to torch, torch 2.13.
On a DeepSpeed upgrade, review this file, then run the suite: the tests exercise every function here.
"""

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import partition_balanced, partition_uniform

SHARED_MEMORY_ALL_REDUCE_OP = "deepspeed_shm_comm"


def skip_shared_memory_all_reduce_build() -> None:
    """DeepSpeed JIT-compiles its shared-memory all-reduce at init on CPU, although only inference uses it.
    torch guards that build with a lock file in ~/.cache/torch_extensions which a rank killed at the wrong
    moment leaves behind, and every later launch then waits on it forever, printing nothing. The op's
    entry in `deepspeed.ops.__compatible_ops__` is what `init_distributed` consults."""
    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_ALL_REDUCE_OP] = False


def set_default_group_timeout(timeout: timedelta) -> None:
    """The timeout of every process group created without one. DeepSpeed creates its pipeline, data-parallel and
    tied-weight groups with `dist.new_group(ranks)` and no timeout (deepspeed/runtime/pipe/topology.py, module.py),
    and torch (2.13, `distributed_c10d._get_default_timeout`) then reads these module globals: 30 minutes for
    gloo and 10 for NCCL, whatever `init_process_group` was given."""
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def process_groups() -> set:
    """Every process group this process holds but the default one (torch 2.13: `distributed_c10d._world.pg_map`)."""
    return {group for group in c10d._world.pg_map if group is not c10d._world.default_pg}


def destroy_process_groups(keep: set) -> None:
    """Destroy the process groups made since `keep = process_groups()`. DeepSpeed 0.19.8 makes several per engine
    (its pipeline grid, the tied-weight groups) and destroys none, and each gloo group keeps three threads that poll
    as long as torch (2.13) holds it: 400 idle groups used 0.4 of a core. For a process that builds engine after
    engine (the in-process tests); a group is freed once nothing else refers to it either."""
    for group in process_groups() - keep:
        dist.destroy_process_group(group)


def clear_eval_outputs(engine: PipelineEngine) -> None:
    """`eval_batch` adds every micro-batch's output to `engine.total_loss` and never resets it: a scalar left by
    a loss evaluation cannot take logits (`train_batch` resets it the same way before its schedule)."""
    engine.total_loss = None


def layer_seed_offset(pipe: PipelineModule) -> int:
    """The counter DeepSpeed seeds every layer's forward from: `base_seed * (micro_offset + 1) + layer`, with
    `micro_offset` counting this module's forwards (training, evaluation and sampling alike). It is in no
    checkpoint of DeepSpeed's, so a resumed run would replay the first micro-batches' dropout masks."""
    return pipe.micro_offset


def restore_layer_seed_offset(pipe: PipelineModule, offset: int) -> None:
    pipe.micro_offset = offset


def set_global_steps(engine: PipelineEngine, step: int) -> None:
    """The engine's step counter after a weights-only load (`load_state_dir` restores no engine state): DeepSpeed
    reads `global_steps` for its LR-schedule and logging decisions, and the next `save_checkpoint` stores it."""
    engine.global_steps = step


@contextmanager
def forward_only_micro_batches(engine: PipelineEngine, count: int) -> Iterator[None]:
    """Around `engine.eval_batch(..., num_micro_batches=count)`: the engine's micro-batch count is `count` meanwhile.

    DeepSpeed 0.19.8's `DualPipeVEngine` finds a micro-batch's phase-1 slot as `buffer_id + self.micro_batches`
    (dualpipev.py `_phase1_buffer`), the training count, while the forward-only schedule it runs for `count`
    micro-batches numbers the slots `phase x count + micro-batch`: with any other count, phase 1 reads empty slots
    (`'NoneType' object has no attribute 'clone'` on one rank, the other left waiting). Upstream, `_phase1_buffer`
    should use the running schedule's count. 1F1B reads the attribute only when no count is given."""
    training = engine.micro_batches
    engine.micro_batches = count
    try:
        yield
    finally:
        engine.micro_batches = training


def loss_stage_global_rank(engine: PipelineEngine) -> int:
    """The global rank (of this data-parallel replica) whose stage computes the loss and holds the logits: the last
    pipeline rank under 1F1B, rank 0 under DualPipeV (whose phase-1 stages come back to it)."""
    return engine._loss_stage_global_rank()


def wrap_instructions(engine: PipelineEngine, wrap: Callable[[str, Callable], Callable]) -> None:
    """Give this engine instance (and no other) a copy of its schedule's instruction table, each entry
    wrapped: `engine._INSTRUCTION_MAP` maps instruction classes to the bound methods the schedule (1F1B or DualPipeV)
    executes. Nothing of DeepSpeed is patched globally (its own `wall_clock_breakdown` crashes with more
    than one stage in 0.19.8)."""
    engine._INSTRUCTION_MAP = {kind: wrap(kind.__name__, fn) for kind, fn in engine._INSTRUCTION_MAP.items()}


def balanced_partition(weights: list[float], stages: int) -> list[int]:
    """Stage bounds whose summed `weights` are as even as DeepSpeed's solver makes them: its `parameters` and
    `type:` partitions' own (`deepspeed.runtime.utils.partition_balanced`, no public API in 0.19.8), so that the
    `flops` partition cuts as they do."""
    return [int(b) for b in partition_balanced(weights, stages)]  # numpy integers


def deepspeed_partition(method: str, *, stages: int, parameters: list[int], layer_names: list[str]) -> list[int] | None:
    """Stage bounds of DeepSpeed's own partition methods (uniform, parameters, type:<regex>) over layers with these
    `parameters` and class names, or None for a method it does not know. A copy of
    `PipelineModule._partition_layers` (0.19.8, runtime/pipe/module.py), which runs only inside the module's
    constructor: the planner and the run's checks need a layout's bounds without building it."""
    method = method.lower()
    if method == "uniform":
        bounds = partition_uniform(len(parameters), stages)
    elif method == "parameters":
        bounds = partition_balanced(parameters, stages)
    elif method.startswith("type:"):  # layers whose class name the regex finds weigh 1, the others 0
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        bounds = partition_balanced([int(bool(pattern.search(name))) for name in layer_names], stages)
    else:
        return None
    return [int(b) for b in bounds]


def partition_bounds(pipe: PipelineModule) -> list[int]:
    """The bounds of all stages of a built module (`parts`, which `_partition_layers` sets; 2 x ranks stages under
    DualPipeV). DeepSpeed 0.19.8 keeps them in this attribute only."""
    return [int(b) for b in pipe.parts]


def tied_parameters(pipe: PipelineModule) -> Iterator[torch.nn.Parameter]:
    """The parameters of this stage's tied modules (`tied_modules`, DeepSpeed 0.19.8's ModuleDict of the
    TiedLayerSpec modules, the one place a stage keeps them apart from its own layers)."""
    for module in pipe.tied_modules.values():
        yield from module.parameters()


def slice_parallel_group(pipe: PipelineModule) -> tuple[int, int, dist.ProcessGroup | None]:
    """(slice rank, slice size, slice group) of this rank in the pipeline module's grid. `PipelineModule` keeps its
    grid private (`_grid`, module.py:183); the engine exposes it as `engine.grid` only after `deepspeed.initialize`,
    and tensor parallelism must cut the layers before the optimizer holds their parameters."""
    grid = pipe._grid
    return grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size(), grid.get_slice_parallel_group()


def save_layer_files(engine: PipelineEngine, tag_dir: Path, exclude_frozen: bool) -> None:
    """Write this stage's per-layer files (`layer_NN-model_states.pt`) into `tag_dir` through the engine's checkpoint
    engine. `engine.save_checkpoint` writes them too, but after its other files; DeepSpeed 0.19.8 has no public call
    for the layer files alone (`PipelineModule.save_state_dict` with the engine's `checkpoint_engine`)."""
    engine.module.save_state_dict(str(tag_dir), engine.checkpoint_engine, exclude_frozen)


def load_layer_files(
    engine: PipelineEngine,
    tag_dir: Path,
    strict: bool,
    state_of: Callable[[int, list[Path]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load this stage's layers from the per-layer files in `tag_dir`, whatever pipeline layout wrote them, and
    nothing else (no optimizer, no engine state): DeepSpeed 0.19.8's `load_checkpoint` has no weights-only mode, so
    `PipelineModule.load_state_dir` with the engine's `checkpoint_engine`. That picks a layer's file by slice rank
    (`SDLoader`, Megatron's merge rules when the counts differ); `state_of(layer index, the layer's files in name
    order)` builds each layer's state instead (another tensor-parallel size), then the tied copies are synchronised
    from their owner as `load_state_dir` does (`_synchronize_tied_weights`: a tied head is a `partial`, no module)."""
    pipe = engine.module
    if state_of is None:
        pipe.load_state_dir(str(tag_dir), checkpoint_engine=engine.checkpoint_engine, strict=strict)
        return
    for index, module in pipe.stage_modules():
        module.load_state_dict(state_of(index, sorted(tag_dir.glob(f"layer_{index:02d}-*model_states.pt"))), strict)
    pipe._synchronize_tied_weights()


def mark_universal_slice(param: torch.Tensor, dim: int, full_shape: tuple[int, ...], pieces: int) -> None:
    """Tell DeepSpeed's universal-checkpoint loader how this rank's part of a cut parameter lies in the full one.
    `load_hp_checkpoint_state` (0.19.8, checkpoint/universal_checkpoint.py) otherwise cuts every full tensor along
    the dimension the converter recorded, which is 0 for a checkpoint saved without slices; with this attribute
    (`DS_AUTOTP_UC_META`, AutoTP's; read by `_resolve_autotp_partition`) it takes `full.chunk(size, dim)[rank]`,
    per each of `pieces` equal sub-parameters (`sub_param_sizes`, split evenly: no version key): what `Slice.take`
    does."""
    meta = {"partition_dim": dim, "logical_shape": tuple(full_shape), "replicated": False}
    if pieces > 1:
        meta["sub_param_sizes"] = (full_shape[dim] // pieces,) * pieces
    setattr(param, DS_AUTOTP_UC_META, meta)


def universal_slice(param: torch.Tensor) -> tuple[int, tuple[int, ...], int] | None:
    """(dim, full shape, pieces) that `mark_universal_slice` recorded on `param`, or None (replicated)."""
    meta = getattr(param, DS_AUTOTP_UC_META, None)
    if meta is None:
        return None
    return meta["partition_dim"], meta["logical_shape"], len(meta.get("sub_param_sizes", (0,)))


class PipelineModuleHooks(PipelineModule):
    """`PipelineModule` with its private steps opened up as public hooks for `models/pipeline.py`."""

    def custom_partition(self, method: str) -> list[int] | None:
        """Stage bounds for a partition method DeepSpeed does not know, else None (DeepSpeed's own)."""
        return None

    def check_partition(self, method: str) -> None:
        """Called with `self.parts` set: raise ValueError for bounds that cannot run."""

    def layer_parameter_counts(self) -> list[int]:
        """Parameters per layer spec, for DeepSpeed's `parameters` partition."""
        raise NotImplementedError

    def stage_layers(self) -> list[tuple[int, int]]:
        """[start, stop) of the layer specs of each stage this pipeline rank holds: one under 1F1B."""
        return [(int(self._local_start), int(self._local_stop))]  # numpy integers from `partition_balanced`

    def _stage_functions(self) -> list[list]:
        """The built layers (`forward_funcs`, module.py) of each stage of `stage_layers`."""
        return [self.forward_funcs]

    def stage_modules(self) -> Iterator[tuple[int, torch.nn.Module]]:
        """(global layer index, built module) of this rank's layers; a tied head, which DeepSpeed keeps as a
        `partial` calling the first layer's module, is left out."""
        for (start, _), functions in zip(self.stage_layers(), self._stage_functions(), strict=True):
            for offset, layer in enumerate(functions):
                if isinstance(layer, torch.nn.Module):
                    yield start + offset, layer

    def stage_layer_names(self) -> list[str]:
        return [spec.typename.__name__ for start, stop in self.stage_layers() for spec in self._layer_specs[start:stop]]

    def tied_weights(self) -> Iterator[tuple[torch.Tensor, int, dist.ProcessGroup]]:
        """(this stage's copy of a tied weight, the global rank of its owner, the tie's group)."""
        for comm in self.tied_comms.values():
            for attr in comm["weight_attr"]:
                yield self._recursive_getattr(comm["module"], attr), min(comm["ranks"]), comm["group"]

    # The private steps. `_partition_layers` sets `self.parts` and calls `_set_bounds`; both are called from
    # `PipelineModule.__init__` before any layer is built.
    def _partition_layers(self, method: str = "uniform") -> None:
        bounds = self.custom_partition(method)
        if bounds is None:
            super()._partition_layers(method)
        else:
            self.parts = bounds
            self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])
        self.check_partition(method)

    def _count_layer_params(self) -> list[int]:
        # DeepSpeed builds every layer of the model, one at a time on every rank, to count its parameters
        # for the `parameters` partition (minutes for a 70B model).
        return self.layer_parameter_counts()

    def allreduce_tied_weight_gradients(self) -> None:
        # DeepSpeed all-reduces `weight.grad` of every tied weight; a frozen tied embedding (LoRA) has no gradient
        # on any of its stages, and `all_reduce(None)` raises. Trainable tied weights are reduced as DeepSpeed does.
        if all(weight.requires_grad for weight, _, _ in self.tied_weights()):
            super().allreduce_tied_weight_gradients()
            return
        for weight, _, group in self.tied_weights():
            if weight.requires_grad:
                dist.all_reduce(weight.grad, group=group)

    @torch.no_grad()
    def _synchronize_tied_weights(self) -> None:
        # DeepSpeed broadcasts the tied embedding with grad enabled, which records the in-place
        # broadcast in autograd and makes every backward warn; the broadcast is not differentiable.
        super()._synchronize_tied_weights()


class DualPipeVModuleHooks(DualPipeVModule, PipelineModuleHooks):
    """DeepSpeed's `DualPipeVModule` (2 x ranks stages; rank r holds stage r, phase 0, and stage 2 x ranks - 1 - r,
    phase 1) with the hooks above. In this order DualPipeV's own steps run first: its `_partition_layers` doubles
    `num_stages` and then calls the hooks' (a custom partition cuts 2 x ranks stages), after which it sets the
    phases' bounds; its `_build` builds each phase through `PipelineModule._build`."""

    def stage_layers(self) -> list[tuple[int, int]]:
        return [tuple(int(b) for b in bounds) for bounds in self.phase_bounds]  # phase 0, phase 1

    def _stage_functions(self) -> list[list]:
        return self.phase_funcs
