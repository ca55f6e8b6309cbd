"""Sample text from a Hugging Face export or a pipeline checkpoint.

python -m train.generate runs/default/hf --prompt "And God said"
python -m train.generate runs/default/checkpoints --prompt "And God said"
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.errors import ConfigError, entry_point


def generate_text(
    model_dir: Path,
    prompt: str | list[int],
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if (model_dir / "adapter_config.json").exists():  # a PEFT adapter: its base model, with the adapters
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    if isinstance(prompt, str):
        inputs = tokenizer(prompt, return_tensors="pt")
    else:  # token ids, e.g. a chat prompt already rendered by its template
        inputs = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "model_dir", type=Path, help="a save_pretrained folder, a PEFT adapter folder or a checkpoint folder"
    )
    p.add_argument("--prompt", default="And God said")
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    return entry_point(lambda: generate_from(a))


def generate_from(a: argparse.Namespace) -> None:
    model_dir = a.model_dir
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such folder; pass a save_pretrained folder, an adapter or a checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        if not (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists():
            from train.export import export_checkpoint  # a pipeline checkpoint: export it first

            model_dir = export_checkpoint(model_dir, Path(tmp) / "hf")
        sampling = {name: getattr(a, name) for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}
        print(generate_text(model_dir, a.prompt, **sampling))


if __name__ == "__main__":
    sys.exit(main())
