"""Checks of flags, DeepSpeed JSON and data that run before any rank does work.

`launch.sh` runs this once (`python -m train.preflight --world-size N ARGS...`) so that bad
input costs one line and no rank start-up; every rank runs the same checks again.
"""

import os
import socket
import sys
import time
from argparse import Namespace
from pathlib import Path

from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from transformers import PretrainedConfig

from models.architecture import discover
from models.hf_weights import check_hub_name, check_weights_fit, not_found
from models.presets import resolve_model_config
from train.args import parse_args
from train.checkpoint import verified_tag_dir
from train.data import Source, embedded_corpus, resolve_sources, unreadable
from train.ds_config import check_layout, load_ds_config
from train.errors import ConfigError
from train.tokenizer import load_tokenizer, tokenizer_too_large


def check_hub_dataset(source: Source, text_column: str) -> None:
    """The dataset's metadata (from the hub, or the local cache offline): it exists, has the split and column."""
    from datasets import load_dataset_builder

    try:
        check_hub_name("--data", source.hub_name, repo_type="dataset")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        builder = load_dataset_builder(source.hub_name, source.hub_config)
    except Exception as e:  # offline, unknown name or config: many exception types, one meaning here
        raise ConfigError(not_found("--data", source.hub_name, e)) from None
    splits, features = builder.info.splits, builder.info.features
    if splits and source.hub_split not in splits:
        raise ConfigError(f"--data {source.spec}: no split {source.hub_split!r} (splits: {list(splits)}); use @SPLIT")
    if features and text_column not in features:
        raise ConfigError(f"--data {source.spec}: no column {text_column!r} (columns: {list(features)}); "
                          "pass --text-column")  # fmt: skip


def check_sources(sources: list[Source], text_column: str) -> None:
    """Peek at the first record of each local source (streaming: nothing is materialised) and at each hub
    dataset's metadata. A malformed record later in a large file is reported by the ranks, in one line too."""
    for source in sources:
        if source.hub_name:
            check_hub_dataset(source, text_column)
        for builder, files in source.files.items():
            if builder == "text":
                continue
            try:
                first = next(iter(load_dataset(builder, data_files=files[:1], split="train", streaming=True)), None)
            except (ValueError, DatasetGenerationError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise ConfigError(unreadable(files[0], builder, e)) from None
            if first is None:
                raise ConfigError(f"{files[0]} holds no records")
            if text_column not in first:
                raise ConfigError(
                    f"{files[0]} has no column {text_column!r} (columns: {list(first)}); pass --text-column"
                )


def check_seq_len(model_config: PretrainedConfig, seq_len: int) -> None:
    arch = discover(model_config)
    if arch.max_positions() is not None and seq_len > arch.max_positions():
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's {arch.max_positions()} positions")
    if (window := arch.sliding_window()) is not None and seq_len > window:
        # Without a mask SDPA attends to every earlier token: beyond the window that is not the model.
        raise ConfigError(
            f"--seq-len {seq_len} exceeds the model's {window}-token sliding attention window, which the pipeline "
            f"does not mask; use --seq-len {window} or less"
        )


def check_inputs(args: Namespace, world_size: int) -> tuple[dict, PretrainedConfig, list[Source], tuple[int, int, int]]:
    """(DeepSpeed config, model config, data sources, batch layout), or a ConfigError naming the fix."""
    lowest = {"train_steps": 1, "seq_len": 1, "eval_interval": 1, "log_interval": 1, "save_interval": 0,
              "keep_last": 0, "seed": 0, "sample_tokens": 0, "vocab_size": 257}  # BPE: 256 bytes + EOS  # fmt: skip
    for flag, low in lowest.items():
        if getattr(args, flag) < low:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {low}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ConfigError("--peak-tflops must be positive (the device's dense peak for the training dtype)")
    method = args.partition_method.lower()
    if method not in ("parameters", "uniform", "flops") and not method.startswith("type:"):
        raise ConfigError(
            f"--partition-method {args.partition_method!r}: use flops, parameters, uniform or type:<regex>"
        )
    if args.activation_checkpoint_interval < 0:
        raise ConfigError("--activation-checkpoint-interval must be 0 (off) or positive")
    if not 0 < args.val_fraction < 1:
        raise ConfigError("--val-fraction must be between 0 and 1")
    ds_config = load_ds_config(args.deepspeed_config, args.train_steps)
    try:
        model_config = resolve_model_config(args.model_config, args.model, args.vocab_size)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    layout = check_layout(ds_config, world_size, args.pipeline_stages, model_config.num_hidden_layers)
    if args.eval_blocks is not None and args.eval_blocks < layout[0]:
        raise ConfigError(f"--eval-blocks {args.eval_blocks} is under one global batch: use at least {layout[0]}")
    check_seq_len(model_config, args.seq_len)
    if args.load is not None:
        if not args.load.exists():
            raise ConfigError(f"--load {args.load}: no such folder; pass a run's checkpoints folder or a step_N in it")
        verified_tag_dir(args.load)
    sources = resolve_sources(args.data or [embedded_corpus()])
    if args.val_data:
        resolve_sources(args.val_data)
    return ds_config, model_config, sources, layout


def warn_about_stale_build_locks(older_than_s: float = 600) -> None:
    """torch builds DeepSpeed's JIT ops (fused Adam, ...) under a lock file that a killed build leaves behind;
    every rank then waits on it forever without a word. Name old ones before the ranks start."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        age_min = (time.time() - lock.stat().st_mtime) / 60
        if age_min * 60 > older_than_s:
            print(f"warning: {lock} is {age_min:.0f} min old; unless a build is running, a killed build left it "
                  "and ranks that load this op will wait forever: delete it", file=sys.stderr)  # fmt: skip


def check_pretrained(args: Namespace, model_config: PretrainedConfig) -> None:
    """A local `--model` folder's weights fit its config (safetensors headers only), and the tokenizer fits the
    model's embedding."""
    if Path(args.model).is_dir():
        try:
            check_weights_fit(Path(args.model), discover(model_config))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    tokenizer = load_tokenizer(args.tokenizer or args.model, flag="--tokenizer" if args.tokenizer else "--model")
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(tokenizer_too_large(len(tokenizer), model_config.vocab_size))


def check_output_dir(output_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, can be written (nothing is created here)."""
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is a file" if not existing.is_dir() else "cannot be written"
        raise ConfigError(f"--output-dir {output_dir}: {existing} {what}; pass a folder you can write")


def check_port_free(port: int) -> None:
    """The rendezvous port on this machine (a second run on the same port fails deep in torch's TCPStore)."""
    with socket.socket() as s:
        # As torch's TCPStore does: a port whose last run's connections linger in TIME_WAIT is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            raise ConfigError(f"MASTER_PORT {port} is in use (another run?): set MASTER_PORT to a free port") from None


def main(argv: list[str]) -> int:
    """`python -m train.preflight [--world-size N] [--master-port P] ARGS`: the checks of every rank, plus those
    that cost seconds or the network (tokenizer, hub names, data records, output folder, port), done once."""
    world_size, port = 1, None
    while argv[:1] in (["--world-size"], ["--master-port"]):
        if argv[0] == "--world-size":
            world_size = int(argv[1])
        else:
            port = int(argv[1])
        argv = argv[2:]
    try:
        args = parse_args(argv)
    except SystemExit as e:  # a bad flag (its one line is printed) or --help
        return int(e.code or 0)
    try:
        _, model_config, sources, _ = check_inputs(args, world_size)
        if args.model:
            check_pretrained(args, model_config)
        elif args.tokenizer:
            load_tokenizer(args.tokenizer)
        check_sources(sources + (resolve_sources(args.val_data) if args.val_data else []), args.text_column)
        check_output_dir(args.output_dir)
        if port is not None:
            check_port_free(port)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_about_stale_build_locks()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
