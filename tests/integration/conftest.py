"""Runs that several integration files read, each trained once per session."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import launch, small_run_args, step_losses, tiny_gpt2, write_ds_config, write_json

REFERENCE_STEPS, LAYOUT_STEPS = 40, 6


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


@dataclass(frozen=True)
class LayoutRuns:
    folder: Path  # model.json, ds.json, ds_micro1.json, the data cache
    runs: dict[str, Path]
    args: dict[str, list[str]]  # each run's flags, less --output-dir
    stdout: dict[str, str]


def layout_args(corpus: Path, tokenizer_dir: Path, folder: Path, ds_config: Path) -> list:
    """The flags of every layout run: 6 steps of tiny GPT-2 on the test corpus, batches traced, step 2 profiled."""
    steps = LAYOUT_STEPS
    return [
        *small_run_args(corpus, tokenizer_dir, folder, ds_config, folder / "model.json", steps),
        "--trace-batches",
        "--profile-steps",
        2,
    ]


@pytest.fixture(scope="session")
def gpt2_layouts(corpus, tokenizer_dir, tmp_path_factory) -> LayoutRuns:
    """The same 6 steps of tiny GPT-2 as pp=1, pp=2, pp=2 x dp=2 and pp=2 balanced by FLOPs with activation
    checkpointing (global batch 8, micro-batch 2, fp32), with document attention as pp=1 and as pp=2 (FLOPs,
    checkpointing), and under DualPipeV as pp=2 and as pp=2 x dp=2 (micro-batch 1; the second with checkpointing).
    Read by test_training.py, and as the eager or one-node reference by test_compile.py and test_scale_out.py."""
    tmp = tmp_path_factory.mktemp("layouts")
    write_json(tmp / "model.json", tiny_gpt2())
    ds_config = write_ds_config(tmp / "ds.json")
    by_params = ["--partition-method", "parameters"]
    balanced = ["--partition-method", "flops", "--activation-checkpoint-interval", 1]
    layouts = [
        ("pp1", 1, 1, by_params),
        ("pp2", 2, 2, by_params),
        ("pp2_dp2", 2, 4, []),
        ("pp2_flops_ac", 2, 2, balanced),
        ("pp1_document", 1, 1, [*by_params, "--attention", "document"]),
        ("pp2_document", 2, 2, [*balanced, "--attention", "document"]),
        # Micro-batches of 1 keep the global batch of 8: 8 micro-batches on one replica (more than the 4 that
        # sampling runs), and on 2 replicas 4, the fewest DualPipeV runs on 2 ranks.
        ("pp2_dualpipev", 2, 2, ["--schedule", "dualpipev"]),
        ("pp2_dp2_dualpipev", 2, 4, ["--schedule", "dualpipev", "--activation-checkpoint-interval", 1]),
    ]
    micro_1 = write_ds_config(tmp / "ds_micro1.json", micro=1)
    runs, flags, stdout = {}, {}, {}
    for name, stages, ranks, extra in layouts:
        config = micro_1 if "dualpipev" in name else ds_config
        args = [*layout_args(corpus, tokenizer_dir, tmp, config), "--pipeline-stages", stages, *extra]
        runs[name], flags[name] = tmp / name, [str(a) for a in args]
        stdout[name] = launch([*flags[name], "--output-dir", runs[name]], ranks).stdout
    return LayoutRuns(folder=tmp, runs=runs, args=flags, stdout=stdout)
