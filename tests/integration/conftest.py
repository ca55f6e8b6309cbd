"""Runs that several integration files read, each trained once per session."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import launch, small_run_args, step_losses, tiny_gpt2, write_ds_config, write_json

REFERENCE_STEPS = 40


@dataclass(frozen=True)
class ReferenceRun:
    folder: Path  # model.json, ds.json, the data cache
    args: list[str]  # the run's flags, less --output-dir
    out: Path
    losses: dict[int, float]


@pytest.fixture(scope="session")
def gpt2_reference(corpus, tokenizer_dir, tmp_path_factory) -> ReferenceRun:
    """The uninterrupted pp=2 tiny GPT-2 run (fp32, global batch 8 of micro-batches of 2, AdamW `torch_adam`): 40
    steps, every step logged, every 5th checkpointed and kept. Resumes, layout changes, damaged files and full disks
    are measured against it."""
    tmp = tmp_path_factory.mktemp("gpt2_reference")
    model, ds = write_json(tmp / "model.json", tiny_gpt2()), write_ds_config(tmp / "ds.json")
    flags = dict(eval_interval=REFERENCE_STEPS, eval_blocks=8, save_interval=5, keep_last=0, sample_tokens=2)
    args = [str(a) for a in small_run_args(corpus, tokenizer_dir, tmp, ds, model, REFERENCE_STEPS, **flags)]
    out = tmp / "reference"
    launch([*args, "--output-dir", out], ranks=2)
    return ReferenceRun(folder=tmp, args=args, out=out, losses=step_losses(out))
