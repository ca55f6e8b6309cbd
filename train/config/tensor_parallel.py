"""What `--tensor-parallel N` can run with, checked once before the ranks build anything (docs/tensor_parallel.md).

The layers are cut by models/tensor_parallel.py (the family's `base_model_tp_plan`); what the first version does
not combine with the cut layers is refused here in one line each, rather than run silently wrong: LoRA/QLoRA (the
adapters would have to be cut like their base), DualPipeV (its two stages per rank are built outside DeepSpeed's
slice grid), torch.compile (the collectives inside the layers are untested under it), and a checkpoint with cut
layers saved before they were declared for the universal conversion, into another layout.
"""

from pathlib import Path

from transformers import PretrainedConfig

from models.errors import first_line
from models.tensor_parallel import check_tensor_parallel
from train.checkpoint.manifest import read_manifest, saved_layout, verified_tag_dir
from train.checkpoint.universal import SLICES_DECLARED
from train.config.args import Flags
from train.errors import ConfigError


def check_tensor_parallel_run(flags: Flags, model_config: PretrainedConfig, size: int | None = None) -> None:
    """One ConfigError line for a model or a flag `--tensor-parallel` (or `size`, a layout the planner tries) cannot
    run with; nothing at 1."""
    tp = flags.tensor_parallel if size is None else size
    if tp <= 1:
        return
    try:
        check_tensor_parallel(model_config, tp)
    except ValueError as e:
        raise ConfigError(first_line(e)) from None
    refused = {
        "--lora-rank/--peft-config (adapters on cut layers)": flags.lora_rank or flags.peft_config,
        "--schedule dualpipev": flags.schedule == "dualpipev",
        "--compile": getattr(flags, "compile", False),  # train.plan has no --compile
    }
    for what, given in refused.items():
        if given:
            raise ConfigError(f"--tensor-parallel {tp} does not run with {what} yet: leave one of them out")


def check_tensor_parallel_resume(flags: Flags, load: Path, resume: str) -> None:
    """A checkpoint resumes into any tensor-parallel size: exactly in its own layout, its weights alone
    (`--reset-optimizer`: the layer files' slices joined and cut again), or through DeepSpeed's universal checkpoint,
    which joins cut layers only by the patterns a run saves since they were declared (train/checkpoint/universal.py).
    An earlier checkpoint with cut layers does not carry them: refused into another layout."""
    tag_dir = verified_tag_dir(load)
    saved = saved_layout(tag_dir)["tensor_parallel"]
    if resume != "universal" or saved == 1 or read_manifest(tag_dir).get(SLICES_DECLARED):
        return
    raise ConfigError(
        f"--load {load}: this checkpoint of --tensor-parallel {saved} was saved before its slices were declared for "
        "DeepSpeed's universal conversion, so it cannot resume in another layout; relaunch with the layout it was "
        "saved with, or pass --reset-optimizer to load its weights only"
    )
