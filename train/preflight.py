"""Checks of flags, DeepSpeed JSON and data that run before any rank does work.

`launch.sh` runs this once (`python -m train.preflight --world-size N ARGS...`) so that bad
input costs one line and no rank start-up; every rank runs the same checks again (which is why
`PIPEGPT_SKIP_PREFLIGHT=1` may leave this out for a command known to be good).
"""

import os
import socket
import sys
import time
from pathlib import Path

from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from models.architecture import discover
from models.hf_weights import check_weights_fit
from models.hub import check_hub_name, not_found
from train.config.args import parse_args
from train.config.run_config import RunConfig, resolve_run_config
from train.data.examples import chat_template_of, chat_text_and_spans
from train.data.preference import check_answers
from train.data.sources import Source, check_text_values, unreadable
from train.data.tokenizer import load_tokenizer, tokenizer_too_large
from train.distributed.run_lock import check_no_earlier_run, check_not_in_use
from train.errors import ConfigError, entry_point, first_line

CHECKING = (
    "preflight: checking the flags, the DeepSpeed JSON (its keys with DeepSpeed's config classes, the optimizer's and "
    "schedule's values by building them), the model, the first record of each data source and the output folder"
)


def missing_column(where: str, present: list, columns: dict[str, tuple[str, str]]) -> str | None:
    for column, (_, flag) in columns.items():
        if column not in present:
            return f"{where} no column {column!r} (columns: {present}); pass {flag}"
    return None


def check_hub_dataset(source: Source, columns: dict[str, tuple[str, str]]) -> None:
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
    if features and (problem := missing_column(f"--data {source.spec}:", list(features), columns)):
        raise ConfigError(problem)


def check_sources(sources: list[Source], columns: dict[str, tuple[str, str]], chat: tuple | None = None) -> None:
    """Peek at the first record of each local source (streaming: nothing is materialised) and at each hub
    dataset's metadata. A malformed record later in a large file is reported by the ranks, in one line too."""
    for source in sources:
        if source.hub_name:
            check_hub_dataset(source, columns)
        for builder, files in source.files.items():
            if builder == "text" and list(columns) == ["text"]:
                continue
            try:
                first = next(iter(load_dataset(builder, data_files=files[:1], split="train", streaming=True)), None)
            except (ValueError, DatasetGenerationError) as e:  # pyarrow's ArrowInvalid is a ValueError
                raise ConfigError(unreadable(files[0], builder, e)) from None
            if first is None:
                raise ConfigError(f"{files[0]} holds no records")
            if problem := missing_column(f"{files[0]} has", list(first), columns):
                raise ConfigError(problem)
            check_first_record(files[0], first, columns, chat)


def check_first_record(file: str, record: dict, columns: dict[str, tuple[str, str]], chat: tuple | None) -> None:
    """The first record's text columns hold text, and (chat data, `chat`: (tokenizer, template)) its conversation
    renders, as the ranks will read them all."""
    for column, read_as in columns.items():
        check_text_values(file, [record[column]], column, read_as)
    ours = {name: column for column, (name, _) in columns.items()}
    if "chosen" in ours:  # preference pairs: an empty answer, equal answers or a null (train/data/preference.py)
        try:
            check_answers(*(record[ours[n]] if n in ours else [] for n in ("pair_prompt", "chosen", "rejected")))
        except ValueError as e:
            raise ConfigError(f"{file}: record 1 is not a pair pipegpt can train on: {first_line(e)}") from None
    if chat is not None and "messages" in ours:
        try:
            chat_text_and_spans(record[ours["messages"]], *chat)
        except ValueError as e:
            raise ConfigError(f"{file}: record 1 is not a conversation pipegpt can train on: {first_line(e)}") from None


def warn_about_stale_build_locks(older_than_s: float = 600) -> None:
    """torch builds DeepSpeed's JIT ops (fused Adam, ...) under a lock file that a killed build leaves behind;
    every rank then waits on it forever without a word. Name old ones before the ranks start."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        age_min = (time.time() - lock.stat().st_mtime) / 60
        if age_min * 60 > older_than_s:
            print(
                f"warning: {lock} is {age_min:.0f} min old; unless a build is running, a killed build left it "
                "and ranks that load this op will wait forever: delete it",
                file=sys.stderr,
            )


def check_pretrained(config: RunConfig) -> PreTrainedTokenizerBase:
    """A local `--model` folder's weights fit its config (safetensors headers only), and the tokenizer fits the
    model's embedding."""
    model, tokenizer_name = config.flags.model, config.flags.tokenizer
    if Path(model).is_dir():
        try:
            check_weights_fit(Path(model), discover(config.model_config))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    tokenizer = load_tokenizer(tokenizer_name or model, flag="--tokenizer" if tokenizer_name else "--model")
    if len(tokenizer) > config.model_config.vocab_size:
        raise ConfigError(tokenizer_too_large(len(tokenizer), config.model_config.vocab_size))
    return tokenizer


def check_writable(flag: str, folder: Path) -> None:
    """A folder the run writes (`--output-dir`, the data cache), or the nearest folder above it that exists, can be
    written (nothing is created here)."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is a file" if not existing.is_dir() else "cannot be written"
        raise ConfigError(f"{flag} {folder}: {existing} {what}; pass a folder you can write")


def check_port_free(port: int) -> None:
    """The rendezvous port on this machine (a second run on the same port fails deep in torch's TCPStore)."""
    with socket.socket() as s:
        # As torch's TCPStore does: a port whose last run's connections linger in TIME_WAIT is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            raise ConfigError(f"MASTER_PORT {port} is in use (another run?): set MASTER_PORT to a free port") from None


def check_once(flags, world_size: int, port: int | None) -> None:
    """The checks of every rank, plus those that cost seconds or the network, done once."""
    config = resolve_run_config(flags, world_size)
    chat = None
    if flags.model or flags.tokenizer:
        tokenizer = check_pretrained(config) if flags.model else load_tokenizer(flags.tokenizer)
        if config.data_format.kind == "chat":
            chat = (tokenizer, chat_template_of(config.data_format, tokenizer))
    check_sources(config.sources + (config.val_sources or []), config.data_format.columns(), chat)
    check_writable("--output-dir", flags.output_dir)
    check_not_in_use(flags.output_dir.resolve())
    check_no_earlier_run(flags.output_dir, flags.load)
    if port is not None:
        check_port_free(port)
    warn_about_stale_build_locks()


def main(argv: list[str]) -> int:
    """`python -m train.preflight [--world-size N] [--master-port P] ARGS`: run by launch.sh before the ranks."""
    world_size, port = 1, None
    while argv[:1] in (["--world-size"], ["--master-port"]):
        if argv[0] == "--world-size":
            world_size = int(argv[1])
        else:
            port = int(argv[1])
        argv = argv[2:]
    try:
        flags = parse_args(argv)
    except SystemExit as e:  # a bad flag (its one line is printed) or --help
        return int(e.code or 0)
    print(CHECKING, flush=True)
    return entry_point(lambda: check_once(flags, world_size, port))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
