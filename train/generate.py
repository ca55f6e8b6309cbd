"""Sample text from a Hugging Face export or a pipeline checkpoint, with transformers' `generate` (a KV cache).

python -m train.generate runs/default/hf --prompt "And God said"
python -m train.generate runs/default/checkpoints --prompt "And God said"
python -m train.generate runs/chat/hf --prompt "What is a covenant?" --greedy
python -m train.generate runs/chat/hf --messages conversation.json --temperature 0

A tokenizer with a chat template renders a prompt as one user turn and generation stops at the template's end of
turn (`--chat`, the default then; `--no-chat`: the text as it is). `--temperature 0` or `--greedy`: the most likely
token every time (deterministic).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from train.data.examples import CONTENT_PROBE
from train.errors import ConfigError, entry_point

Prompt = str | list[int] | list[dict]  # text, token ids (a chat prompt already rendered) or chat messages


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token the chat template writes right after an assistant turn's content (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>), beside the tokenizer's EOS; none without a template."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not tokenizer.chat_template:
        return ids
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": CONTENT_PROBE}]
    after = tokenizer.apply_chat_template(turns, tokenize=False).partition(CONTENT_PROBE)[2]
    first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    return ids + [i for i in first if i in tokenizer.all_special_ids and i not in ids]


def load_model(model_dir: Path) -> torch.nn.Module:
    if (model_dir / "adapter_config.json").exists():  # a PEFT adapter: its base model, with the adapters
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(model_dir).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def turns_text(messages: list[dict], answer: str) -> str:
    """The conversation, one `role: content` paragraph per turn, the generated answer last."""
    return "\n".join(
        f"{m['role']}: {m.get('content', '')}" for m in [*messages, {"role": "assistant", "content": answer}]
    )


def generate_text(
    model_dir: Path,
    prompt: Prompt,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | None = None,
) -> str:
    """The prompt and what the model adds to it. Chat (messages, token ids of a rendered chat prompt, or text with
    `chat` on, by default when the tokenizer has a template): generation stops at the end of the assistant's turn
    and the turns are shown apart. `temperature` 0: greedy."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    is_messages = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
    chat = is_messages or (bool(tokenizer.chat_template) if chat is None else chat)
    if chat and not tokenizer.chat_template and (is_messages or isinstance(prompt, str)):
        what = "--messages" if is_messages else "--chat"
        raise ConfigError(f"{what}: the tokenizer of {model_dir} has no chat template; pass --no-chat and a --prompt")
    messages = [{"role": "user", "content": prompt}] if chat and isinstance(prompt, str) else prompt
    if isinstance(messages, str):
        ids = tokenizer(messages)["input_ids"]
    elif isinstance(messages[0], dict):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:  # token ids, e.g. a chat prompt already rendered by its template
        ids = list(messages)
    model = load_model(model_dir)
    torch.manual_seed(seed)
    # Greedy unsets the sampling settings a generation config may hold (transformers warns of them otherwise).
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    if chat:  # the model's own stop tokens (its generation config), and the template's end of turn
        stops = model.generation_config.eos_token_id
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
        sampling["eos_token_id"] = stops + [i for i in end_of_turn_ids(tokenizer) if i not in stops]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    new = out[0, len(ids) :].tolist()
    if not chat:
        return tokenizer.decode(ids + new, skip_special_tokens=True)
    answer = tokenizer.decode(new, skip_special_tokens=True).strip()
    if not isinstance(messages[0], int):
        return turns_text(messages, answer)
    return tokenizer.decode(ids, skip_special_tokens=False).rstrip() + "\n" + answer  # the template's own markup


def read_messages(path: Path) -> list[dict]:
    """A JSON file of [{role, content}, ...] (or {"messages": [...]}), the conversation so far."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        problem = f"--messages {path}: cannot read it as JSON ({e}); pass a file of [{{role, content}}, ...]"
        raise ConfigError(problem) from None
    messages = value.get("messages") if isinstance(value, dict) else value
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError(f"--messages {path}: must hold a non-empty list of {{role, content}} records")
    return messages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "model_dir", type=Path, help="a save_pretrained folder, a PEFT adapter folder or a checkpoint folder"
    )
    p.add_argument(
        "--prompt", default="And God said", help="the text to continue, or the question (default: %(default)s)"
    )
    p.add_argument("--messages", type=Path, default=None, help="a JSON file of chat messages instead of --prompt")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render --prompt as a user turn with the tokenizer's chat template and stop at its end of turn "
        "(default: when the tokenizer has a template)",
    )
    p.add_argument("--max-new-tokens", type=int, default=60, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="the most likely token every time (--temperature 0)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return entry_point(lambda: generate_from(a))


def generate_from(a: argparse.Namespace) -> None:
    model_dir = a.model_dir
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such folder; pass a save_pretrained folder, an adapter or a checkpoint")
    if a.temperature < 0:
        raise ConfigError("--temperature must be 0 (greedy) or positive")
    prompt = read_messages(a.messages) if a.messages else a.prompt
    with tempfile.TemporaryDirectory() as tmp:
        if not (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists():
            from train.export import export_checkpoint  # a pipeline checkpoint: export it first

            model_dir = export_checkpoint(model_dir, Path(tmp) / "hf")
        sampling = {name: getattr(a, name) for name in ("max_new_tokens", "top_k", "top_p", "seed", "chat")}
        print(generate_text(model_dir, prompt, temperature=0.0 if a.greedy else a.temperature, **sampling))


if __name__ == "__main__":
    sys.exit(main())
