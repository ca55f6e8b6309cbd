"""Command-line flags. Batch sizes, precision, ZeRO, optimizer, schedule and clipping live in the DeepSpeed JSON.

The model and layout flags are shared, with the same defaults, by `train.main`, `train.prepare` (the same
parser) and `train.plan` (`shared_flags()` as argparse parents). The parsed flags are read-only: what is
derived from them is resolved once into a `RunConfig` (train/config/run_config.py).
"""

import argparse
import re
from pathlib import Path

from models.presets import PRESETS
from train.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # train/config/args.py -> the repository
DEFAULT_DS_CONFIG = REPO / "ds_configs" / "cpu_pp2.json"
DEFAULT_MODEL_CONFIG = "gpt2-tiny"
DEFAULT_BPE_VOCAB = 8192
SAMPLE_TOKENS = 40  # --sample-tokens by default
EVALUATION_SAMPLES_UP_TO = 100_000_000  # parameters: larger models are not sampled at evaluations by default


# Lowest allowed value of each numeric flag (a BPE vocabulary needs its 256 bytes + EOS).
LOWEST = {
    "train_steps": 1,
    "seq_len": 1,
    "eval_interval": 1,
    "log_interval": 1,
    "save_interval": 0,
    "keep_last": 0,
    "seed": 0,
    "sample_tokens": 0,
    "vocab_size": 257,
    "activation_checkpoint_interval": 0,
    "dist_timeout": 1,
    "lora_rank": 1,
}
PARTITION_METHODS = ("parameters", "uniform", "flops")
DATA_FORMATS = ("text", "prompt-completion", "chat", "preference")  # --data-format (train.main, train.plan)


class Flags(argparse.Namespace):
    """The parsed flags; setting an attribute after parsing raises, so nothing is smuggled through them."""

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(f"the parsed flags are read-only: resolve {name!r} into the RunConfig instead")
        super().__setattr__(name, value)

    def freeze(self) -> "Flags":
        self.__dict__["_frozen"] = True
        return self

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items() if not k.startswith("_")}


class DefaultsShown(argparse.RawDescriptionHelpFormatter):
    """`--help` gives every flag's default: appended where the help text does not already say it (switches are off
    by default, and say what they turn on)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, value = action.help or "", action.default
        if action.nargs == 0 or value in (None, [], argparse.SUPPRESS) or "default" in text.lower():
            return text
        if isinstance(value, str | Path) and Path(value).is_absolute() and Path(value).is_relative_to(REPO):
            value = Path(value).relative_to(REPO)  # the repository's own files, as the README names them
        return f"{text} (default: {str(value).replace('%', '%%')})"


class OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage before its error; bad flags get one `error:` line like all bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def _lora_flags(p: argparse.ArgumentParser) -> None:
    lora = p.add_argument_group("LoRA (adapters trained on a frozen --model, with peft's LoRA layers)")
    lora.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="train LoRA adapters of this rank instead of every weight (default: none, every weight trains)",
    )
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, a scale of 1)")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    lora.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="module names (suffixes, as peft matches them) or one regex; default all-linear: every linear layer "
        "of the decoder, not the LM head",
    )
    lora.add_argument(
        "--lora-target-parameters",
        nargs="+",
        default=None,
        help="parameters peft adapts itself (its target_parameters, suffixes such as mlp.experts.gate_up_proj), "
        "or none; default on a mixture of experts: the experts' fused 3-D weights (not the router)",
    )
    lora.add_argument(
        "--peft-config",
        type=Path,
        default=None,
        help="a LoraConfig as PEFT saves it (adapter_config.json, or a folder with one; with its "
        "adapter_model.safetensors or adapter_model.bin, training starts from those adapters), instead of the "
        "--lora-* flags (default: none)",
    )
    lora.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA: hold the base's decoder linear layers in 4 bits (bitsandbytes, as BitsAndBytesConfig("
        "load_in_4bit=True)), each stage quantizing its own layers as it loads them",
    )
    lora.add_argument("--bnb-4bit-quant-type", choices=["nf4", "fp4"], default="nf4", help="the 4-bit data type")
    lora.add_argument(
        "--bnb-4bit-double-quant", action="store_true", help="quantize the block scales too (~0.4 bits a weight less)"
    )


def shared_flags() -> list[argparse.ArgumentParser]:
    """The model and layout flags of every command, as argparse parents."""
    model_parser = argparse.ArgumentParser(add_help=False)
    model = model_parser.add_argument_group("model")
    model.add_argument(
        "--model-config",
        default=None,
        help=f"preset ({', '.join(PRESETS)}), config.json or HF config "
        f"dir; default {DEFAULT_MODEL_CONFIG} when --model is not given",
    )
    model.add_argument(
        "--model",
        default=None,
        help="pretrained HF model (save_pretrained dir or hub name); default: none, --model-config from scratch",
    )
    model.add_argument(
        "--keep-gelu-new",
        action="store_true",
        help="keep GPT-2's gelu_new (~8 kernels) instead of the same function fused (gelu_pytorch_tanh, within ~3e-7); "
        "imported GPT-2 checkpoints and from-scratch GPT-2 get the fused one, and the export says so",
    )
    model.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer dir or hub name; default: the --model's, else a byte-level BPE trained on the data",
    )
    model.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary of a BPE trained on the data (default "
        f"{DEFAULT_BPE_VOCAB}); for the planner, the tokenizer's (default: the preset's)",
    )
    model.add_argument(
        "--router-aux-loss-coef",
        type=float,
        default=None,
        help="mixture of experts: add the router's load-balancing loss times this coefficient, as the HF model "
        "does with output_router_logits (default: the model config's own setting, usually off)",
    )
    _lora_flags(model_parser)
    layout_parser = argparse.ArgumentParser(add_help=False)
    _layout_flags(layout_parser)
    return [model_parser, layout_parser]


def _layout_flags(p: argparse.ArgumentParser) -> None:
    layout = p.add_argument_group("layout")
    layout.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default=str(DEFAULT_DS_CONFIG),
        help="the DeepSpeed JSON: batch sizes, precision, ZeRO, optimizer, LR schedule, clipping",
    )
    layout.add_argument(
        "--pipeline-stages",
        type=int,
        default=2,
        help="pipeline ranks per replica (each holds 2 stages under dualpipev); data-parallel replicas = world size "
        "/ (stages x --tensor-parallel)",
    )
    layout.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        help="ranks that split each decoder layer's matrices by the family's base_model_tp_plan (consecutive ranks: "
        "keep them on one node; docs/tensor_parallel.md); world size = stages x this x data-parallel replicas",
    )
    layout.add_argument(
        "--schedule",
        choices=("1f1b", "dualpipev"),
        default="1f1b",
        help="1f1b: one stage per rank, bubble (p-1)/(m+p-1); dualpipev: DeepSpeed's DualPipeV, two stages per rank "
        "(the embedding and the head on rank 0), a smaller bubble, at least 2 x --pipeline-stages micro-batches",
    )
    layout.add_argument(
        "--partition-method",
        default="flops",
        help="flops (balance forward+backward FLOPs), or DeepSpeed's parameters, uniform, "
        "type:<regex on the layer class>",
    )
    layout.add_argument(
        "--activation-checkpoint-interval",
        type=int,
        default=0,
        help="recompute every N transformer blocks in backward instead of storing their activations",
    )
    layout.add_argument(
        "--seq-len", type=int, default=128, help="tokens per packed block (at most the model's positions)"
    )
    layout.add_argument("--train-steps", type=int, default=300, help="optimizer steps (the run's last step)")


def _data_flags(p: argparse.ArgumentParser) -> None:
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
    data.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="text",
        help="text: pretraining, every token in the loss; prompt-completion or chat: the loss on the answers only; "
        "preference: pairs of a chosen and a rejected answer to a prompt, the DPO loss (docs/preference.md)",
    )
    data.add_argument(
        "--text-column", default="text", help="column holding the text (.txt files are one document per line)"
    )
    data.add_argument(
        "--prompt-column",
        default="prompt",
        help="prompt-completion and preference data: the prompt column ('' for preference pairs whose answers are "
        "whole conversations sharing the prompt turns)",
    )
    data.add_argument("--completion-column", default="completion", help="prompt-completion data: the answer column")
    data.add_argument("--messages-column", default="messages", help="chat data: the column of {role, content} lists")
    data.add_argument(
        "--chat-template", type=Path, default=None, help="a Jinja chat template file (default: the tokenizer's own)"
    )
    data.add_argument(
        "--packing",
        choices=["pack", "pad"],
        default="pack",
        help="prompt-completion and chat data: several examples per --seq-len block, or one (padded)",
    )
    data.add_argument(
        "--attention",
        choices=["document", "causal"],
        default=None,
        help="document: a token of a packed block attends only to earlier tokens of its own document, whose "
        "positions start at 0 (as if it were alone); causal: to every earlier token of the block. Default: "
        "document for prompt-completion and chat data, causal for text (docs/data.md: Attention in packed blocks)",
    )
    data.add_argument(
        "--overlong",
        choices=["truncate", "drop"],
        default="truncate",
        help="prompt-completion and chat data: cut an example longer than --seq-len to it, or drop it (counted)",
    )
    _preference_flags(p)
    _data_reading_flags(p)


def _preference_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("preference data (--data-format preference, docs/preference.md)")
    data.add_argument("--chosen-column", default="chosen", help="preference data: the preferred answer's column")
    data.add_argument("--rejected-column", default="rejected", help="preference data: the other answer's column")
    data.add_argument(
        "--preference-loss",
        choices=["sigmoid", "ipo"],
        default="sigmoid",
        help="preference data: trl 1.16 DPOTrainer's loss_type: sigmoid (DPO) or ipo (averaged over answer tokens)",
    )
    data.add_argument("--beta", type=float, default=0.1, help="preference data: DPO's beta (IPO's tau), TRL's default")


def _data_reading_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data: how it is read, held out and cached")
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="last fraction of packed blocks held out (under --streaming without --val-data: the first evaluation's "
        "worth of blocks of the stream)",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="read the sources as a stream, tokenized and packed on the ranks that read data while training runs: "
        "no cache, the first step at once; the blocks of the cached path, in order (with --val-data the same blocks "
        "as --data-order sequential; docs/data.md: Streaming)",
    )
    data.add_argument(
        "--data-order",
        choices=["shuffled", "sequential"],
        default=None,
        help="training blocks in a seeded random order per epoch, or in order (default: shuffled; sequential under "
        "--streaming, which reads in order)",
    )
    data.add_argument(
        "--data-cache-dir",
        type=Path,
        default=None,
        help="packed-data cache (default ~/.cache/pipegpt, or PIPEGPT_CACHE); on a file system the nodes share, "
        "each node tokenizes a shard of the data",
    )
    data.add_argument(
        "--trace-batches",
        action="store_true",
        help="record the blocks (and the shape and a digest of the labels) every data-reading rank feeds its engine, "
        "in <output-dir>/batches/",
    )
    data.add_argument(
        "--num-proc", type=int, default=None, help="processes for tokenization, per node (default: all cores)"
    )


def _loop_flags(p: argparse.ArgumentParser) -> None:
    train = p.add_argument_group("training")
    train.add_argument("--seed", type=int, default=1234, help="the run's random seed")
    train.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (and at the end)")
    train.add_argument(
        "--eval-blocks",
        type=int,
        default=None,
        help="validation blocks per evaluation (default: those that hold 1,048,576 tokens, or all when fewer), "
        "rounded down to whole global batches (train_batch_size blocks per evaluation step; the log says how many)",
    )
    train.add_argument(
        "--log-interval", type=int, default=10, help="steps between logged steps (progress line, metrics.jsonl, W&B)"
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every pipeline layer (DeepSpeed's engine.compile); the first step pays the compilation "
        "(reported once). Works with activation checkpointing; the backend and what inductor needs (a C++ compiler "
        "on CPU, Triton on GPUs) are checked before any rank starts",
    )
    train.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=300,
        help="seconds a rank waits on a peer inside a training step before it reports a hang (in "
        "<output-dir>/hang/) and stops; every process group gives up 30 s later",
    )
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    ckpt.add_argument("--keep-last", type=int, default=2, help="complete checkpoints kept (0: all)")
    ckpt.add_argument(
        "--load",
        type=Path,
        default=None,
        help="resume from a checkpoint folder (its `latest`) or one tag folder (default: none, a fresh run; "
        "train.evaluate: the weights to evaluate)",
    )
    ckpt.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="with --load: restore the weights, the step and the LR schedule but not the optimizer's moments (Adam "
        "starts afresh). Not needed to change the layout: another layout resumes everything, optimizer included, "
        "through DeepSpeed's universal checkpoint",
    )


def _output_flags(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--output-dir", type=Path, default=REPO / "runs" / "default", help="where the run writes (docs/outputs.md)"
    )
    out.add_argument("--wandb-project", default="pipegpt", help="W&B project")
    out.add_argument("--wandb-run-name", default=None, help="W&B run name (default: the --output-dir folder's name)")
    out.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        default=None,
        help="default: online when WANDB_API_KEY is set, else offline; disabled turns W&B off",
    )
    out.add_argument(
        "--profile-steps",
        type=int,
        nargs="*",
        default=[],
        help="steps whose pipeline schedule is recorded (Chrome trace + PNG in <output-dir>/timeline; default: none)",
    )
    out.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s for MFU (default: looked up from the device name; none on CPU)",
    )
    out.add_argument(
        "--sample-prompt",
        default="And God said",
        help="prompt of the samples of text runs (chat and prompt-completion runs sample held-out prompts)",
    )
    out.add_argument(
        "--sample-tokens",
        type=int,
        default=None,
        help=f"new tokens per sample, at every evaluation (through the pipeline, no KV cache) and from the export at "
        f"the end; 0: no samples (default {SAMPLE_TOKENS}, and none at evaluations for models over "
        f"{EVALUATION_SAMPLES_UP_TO // 10**6}M parameters unless given; a line says so)",
    )
    out.add_argument(
        "--merge-adapter",
        action="store_true",
        help="LoRA: also export the base model with the adapters merged in, as <output-dir>/hf (beside adapter/)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags (also `train.prepare`'s)."""
    p = OneLineErrors(
        prog="pipegpt",
        description="Train a Hugging Face causal LM as a DeepSpeed pipeline.",
        parents=shared_flags(),
        formatter_class=DefaultsShown,
    )
    _data_flags(p)
    _loop_flags(p)
    _output_flags(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Flags:
    """Parse `argv` with `parser` (default: the trainer's); the result is read-only."""
    flags = (parser or build_parser()).parse_args(argv, namespace=Flags())
    if flags.model_config is None and flags.model is None:
        flags.model_config = DEFAULT_MODEL_CONFIG
    return flags.freeze()


def check_flag_ranges(flags: Flags) -> None:
    for flag, low in LOWEST.items():
        value = getattr(flags, flag)
        if value is not None and value < low:
            what = "0 (off) or positive" if low == 0 and flag == "activation_checkpoint_interval" else f"at least {low}"
            raise ConfigError(f"--{flag.replace('_', '-')} must be {what}")
    if flags.peak_tflops is not None and flags.peak_tflops <= 0:
        raise ConfigError("--peak-tflops must be positive (the device's dense peak for the training dtype)")
    method = flags.partition_method.lower()
    if method not in PARTITION_METHODS and not method.startswith("type:"):
        raise ConfigError(
            f"--partition-method {flags.partition_method!r}: use flops, parameters, uniform or type:<regex>"
        )
    if method.startswith("type:"):
        try:
            re.compile(flags.partition_method[len("type:") :])
        except re.error as e:
            raise ConfigError(f"--partition-method {flags.partition_method!r}: not a regex ({e})") from None
    if flags.router_aux_loss_coef is not None and flags.router_aux_loss_coef < 0:
        raise ConfigError("--router-aux-loss-coef must be 0 or positive")
    if not 0 < flags.val_fraction < 1:
        raise ConfigError("--val-fraction must be between 0 and 1")
    if flags.beta <= 0:
        raise ConfigError("--beta must be positive (TRL's default 0.1)")
    if flags.data_format == "preference" and (flags.streaming or flags.router_aux_loss_coef):
        which = "--streaming" if flags.streaming else "--router-aux-loss-coef"
        raise ConfigError(f"--data-format preference does not take {which} (docs/preference.md): drop {which}")
    if not 0 <= flags.lora_dropout < 1:
        raise ConfigError("--lora-dropout must be at least 0 and below 1")
    if flags.lora_alpha is not None and flags.lora_alpha <= 0:
        raise ConfigError("--lora-alpha must be positive")
