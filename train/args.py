"""Command-line flags. Batch sizes, precision, ZeRO, optimizer, schedule and clipping live in the DeepSpeed JSON."""

import argparse
from pathlib import Path

from models.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "cpu_pp2.json"


class OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage before its error; bad flags get one `error:` line like all bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrors(prog="pipegpt", description="Train a Hugging Face causal LM as a DeepSpeed pipeline.")
    model = p.add_argument_group("model")
    model.add_argument(
        "--model-config",
        default=None,
        help=f"preset ({', '.join(PRESETS)}), config.json or HF config dir; default gpt2-tiny when --model "
        "is not given",
    )
    model.add_argument(
        "--model", default=None, help="pretrained HF model (save_pretrained dir or hub name) to start from"
    )
    model.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer dir or hub name; default: the --model's, else a byte-level BPE trained on the data",
    )
    model.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a BPE trained on the data")
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="files, globs, folders (.txt/.json/.jsonl/.parquet/.csv, .gz/.zst) or hub datasets "
        "(NAME[#CONFIG][@SPLIT]), each optionally weighted (path:0.7); default: the embedded King James Bible",
    )
    data.add_argument(
        "--val-data",
        nargs="+",
        default=None,
        help="explicit validation sources (same forms as --data); default: --val-fraction held out",
    )
    data.add_argument("--text-column", default="text")
    data.add_argument("--seq-len", type=int, default=128)
    data.add_argument("--val-fraction", type=float, default=0.02, help="last fraction of packed blocks held out")
    data.add_argument("--data-cache-dir", type=Path, default=None, help="packed-data cache (default ~/.cache/pipegpt)")
    data.add_argument(
        "--trace-batches",
        action="store_true",
        help="record the block indices every data-reading rank feeds, in <output-dir>/batches/",
    )
    data.add_argument("--num-proc", type=int, default=None, help="processes for tokenization (default: all cores)")
    train = p.add_argument_group("training")
    train.add_argument(
        "--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=str(DEFAULT_DS_CONFIG)
    )
    train.add_argument("--pipeline-stages", type=int, default=2)
    train.add_argument(
        "--partition-method",
        default="flops",
        help="flops (balance forward+backward FLOPs), or DeepSpeed's parameters, uniform, type:<regex>",
    )
    train.add_argument(
        "--activation-checkpoint-interval",
        type=int,
        default=0,
        help="recompute every N transformer blocks in backward instead of storing their activations",
    )
    train.add_argument("--train-steps", type=int, default=300)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (and at the end)")
    train.add_argument("--eval-blocks", type=int, default=None, help="validation blocks per evaluation (default: all)")
    train.add_argument("--log-interval", type=int, default=10)
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    ckpt.add_argument("--keep-last", type=int, default=2, help="complete checkpoints kept (0: all)")
    ckpt.add_argument(
        "--load", type=Path, default=None, help="resume from a checkpoint folder (its `latest`) or one tag folder"
    )
    ckpt.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="load only the weights (needed when resuming with another stage or replica count)",
    )
    out = p.add_argument_group("outputs")
    out.add_argument("--output-dir", type=Path, default=REPO / "runs" / "default")
    out.add_argument("--wandb-project", default="pipegpt")
    out.add_argument("--wandb-run-name", default=None)
    out.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        default=None,
        help="default: online when WANDB_API_KEY is set, else offline",
    )
    out.add_argument(
        "--profile-steps",
        type=int,
        nargs="*",
        default=[],
        help="steps whose 1F1B schedule is recorded (Chrome trace + PNG in <output-dir>/timeline)",
    )
    out.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s for MFU (default: looked up from the device name; none on CPU)",
    )
    out.add_argument("--sample-prompt", default="And God said", help="prompt for the sample printed at the end")
    out.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.model_config is None and args.model is None:
        args.model_config = "gpt2-tiny"
    return args
