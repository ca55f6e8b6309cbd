"""Flags that would change nothing in the combination given: one line each, before any rank, never ignored.

A flag whose value differs from its default but which the other flags make inert (a 4-bit option without
`--load-in-4bit`, a sample prompt with no samples, a chat column for text data) is a ConfigError naming the flag
and the fix. A value equal to the default cannot be told from an absent flag, and changes nothing either way. The
LoRA flags without LoRA are refused where the adapters are resolved (train/config/adapters.py).
"""

from train.config.args import Flags, build_parser
from train.errors import ConfigError

MASKED = "--data-format {data_format}"
# (flag, whether it has an effect given the flags, the rest of the line: what makes it inert and the fix)
EFFECTS = [
    ("bnb_4bit_quant_type", lambda f: f.load_in_4bit, "without --load-in-4bit: pass --load-in-4bit or drop it"),
    ("bnb_4bit_double_quant", lambda f: f.load_in_4bit, "without --load-in-4bit: pass --load-in-4bit or drop it"),
    ("compile_backend", lambda f: f.compile, "without --compile: pass --compile or drop it"),
    ("reset_optimizer", lambda f: f.load is not None, "without --load: pass --load CHECKPOINTS or drop it"),
    ("sample_prompt", lambda f: f.sample_tokens != 0, "with --sample-tokens 0 (no sample): drop one of them"),
    (
        "sample_prompt",
        lambda f: f.data_format == "text",
        f"with {MASKED}, whose samples start from held-out prompts: drop it",
    ),
    (
        "val_fraction",
        lambda f: not f.val_data,
        "with --val-data, the validation (nothing of --data is held out): drop one of them",
    ),
    ("text_column", lambda f: f.data_format == "text", f"with {MASKED}: drop it, or pass --data-format text"),
    *[
        (column, lambda f: f.data_format == "prompt-completion", f"with {MASKED}: drop it")
        for column in ("prompt_column", "completion_column")
    ],
    *[
        (name, lambda f: f.data_format == "chat", f"with {MASKED}: drop it")
        for name in ("messages_column", "chat_template")
    ],
    *[
        (name, lambda f: f.data_format != "text", "with --data-format text (documents are packed whole): drop it")
        for name in ("packing", "overlong")
    ],
    *[
        (name, lambda f: f.wandb_mode != "disabled", "with --wandb-mode disabled: drop one of them")
        for name in ("wandb_project", "wandb_run_name")
    ],
]


def check_flag_effects(flags: Flags) -> None:
    """Every flag given a value other than its (trainer's) default has an effect with the others."""
    parser = build_parser()
    for name, has_effect, rest in EFFECTS:
        if getattr(flags, name, None) == parser.get_default(name) or has_effect(flags):
            continue
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} has no effect {rest.format(data_format=flags.data_format)}")
