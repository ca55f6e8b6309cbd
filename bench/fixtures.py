"""What the benchmarks and the tests both build: tiny model configs, DeepSpeed configs, chat records, trainer
flags and the command that starts ranks. (tests/helpers.py adds what only tests need.)"""

import json
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_gpt2(layers: int = 4, width: int = 64, heads: int = 4, positions: int = 64, **overrides) -> dict:
    """A small GPT-2 config (no dropout: layouts and resumes compare exactly), for `--model-config FILE`."""
    return {
        "model_type": "gpt2",
        "n_layer": layers,
        "n_embd": width,
        "n_head": heads,
        "n_positions": positions,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **overrides,
    }


def tiny_llama(**overrides) -> dict:
    """A small Llama config (untied head, GQA: 4 query and 2 key/value heads) with a 512-token vocabulary, the
    test tokenizer's; `overrides`: other config fields (tie_word_embeddings=True, model_type="qwen2", ...)."""
    return {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **overrides,
    }


def ds_config(train_batch: int = 8, micro: int = 2, **overrides) -> dict:
    """A DeepSpeed config for tests and benches: fp32, ZeRO-1, torch AdamW (bit-exact resumes), warm-up + cosine.
    An override of None drops the key (e.g. scheduler=None)."""
    config = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": "auto", "warmup_num_steps": 2, "warmup_type": "linear"},
        },
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
        **overrides,
    }
    return {k: v for k, v in config.items() if v is not None}


# The ChatML template of Qwen2.5-style chat models (no system prompt added), for tokenizers trained here.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_records(verses: list[str]) -> list[dict]:
    """Chat examples made of verses: the user gives the first 6 words of a verse, the assistant up to 6 more;
    every third example has a system turn, every fourth a second exchange (the next verse)."""
    records = []
    for i, verse in enumerate(verses):
        messages = [{"role": "system", "content": "You are a scribe."}] if i % 3 == 0 else []
        for text in [verse, verses[(i + 1) % len(verses)]][: 2 if i % 4 == 0 else 1]:
            words = text.split()
            messages += [
                {"role": "user", "content": "Continue: " + " ".join(words[:6])},
                {"role": "assistant", "content": " ".join(words[6:12])},
            ]
        records.append({"messages": messages})
    return records


def write_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: Path, value: dict) -> Path:
    return write_file(path, json.dumps(value))


def cli(**flags) -> list[str]:
    """Trainer flags from keywords: seq_len=32 -> --seq-len 32; True -> the bare flag; lists -> several values."""
    args: list[str] = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-") if name != "deepspeed_config" else "--deepspeed_config"
        if value is True:
            args.append(flag)
        elif isinstance(value, list | tuple):
            args += [flag, *map(str, value)]
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


# A short run that logs every step and evaluates only at its end (benchmarks; tests that time nothing else).
QUIET_RUN = {"log_interval": 1, "eval_interval": 10**6, "sample_tokens": 1, "wandb_mode": "disabled"}


def deepspeed_command(ranks: int, port: int, flags: list[str]) -> list[str]:
    """The trainer through DeepSpeed's launcher, without launch.sh's preflight (benchmarks)."""
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), "--module", "train.main", *flags]
