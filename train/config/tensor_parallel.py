"""What `--tensor-parallel N` can run with, checked once before the ranks build anything (docs/tensor_parallel.md).

The layers are cut by models/tensor_parallel.py (the family's `base_model_tp_plan`); what the first version does
not combine with the cut layers is refused here in one line each, rather than run silently wrong: LoRA/QLoRA (the
adapters would have to be cut like their base), DualPipeV (its two stages per rank are built outside DeepSpeed's
slice grid), torch.compile (the collectives inside the layers are untested under it), and a checkpoint of another
tensor-parallel size or any resume but the exact one (the universal conversion does not join slices yet).
"""

from pathlib import Path

from transformers import PretrainedConfig

from models.errors import first_line
from models.tensor_parallel import check_tensor_parallel
from train.checkpoint.manifest import saved_layout, verified_tag_dir
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
    """A checkpoint with cut layers resumes only exactly (the same layout); none resumes into another TP size."""
    saved = saved_layout(verified_tag_dir(load))["tensor_parallel"]
    if saved == flags.tensor_parallel and (saved == 1 or resume == "exact"):
        return
    raise ConfigError(
        f"--load {load}: a checkpoint of --tensor-parallel {saved} resumes only with --tensor-parallel {saved} and "
        "the layout it was saved with (joining or re-cutting tensor-parallel slices is not supported yet); "
        "relaunch with that layout"
    )
