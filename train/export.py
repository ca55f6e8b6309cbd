"""Export a pipeline checkpoint (any layout, fp32/bf16/fp16) as a Hugging Face model folder, or a LoRA
checkpoint as a PEFT adapter folder (and, with --merged, the base model with the adapters merged in).

    python -m train.export runs/default/checkpoints --out my-model
    python -m train.export runs/default/checkpoints/step_300 --out my-model --tokenizer runs/default/tokenizer
    python -m train.export runs/lora/checkpoints --out my-adapter --merged my-merged-model

Reads the per-layer files DeepSpeed writes (its zero_to_fp32.py does not understand pipeline
checkpoints); the result loads with `AutoModelForCausalLM.from_pretrained`, an adapter with
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`.
"""

import argparse
import sys
from pathlib import Path

from models.architecture import discover
from models.hf_weights import config_from_dict, export_hf_model
from models.hub import resolve_model_dir
from models.lora import AdapterPlan, adapters_from_checkpoint, lora_settings, merged_model, save_adapter
from models.portable import make_portable
from train.checkpoint.manifest import read_manifest, verified_tag_dir, verify_contents
from train.checkpoint.same_run import checkpoint_tokenizer_dir
from train.data.tokenizer import load_tokenizer
from train.errors import ConfigError, entry_point


def export_checkpoint(
    checkpoint: Path, out: Path, tokenizer_dir: Path | None = None, merged: Path | None = None
) -> Path:
    """`out`: the HF model folder, or for a LoRA checkpoint the PEFT adapter folder (`merged`: also the merged
    model there). Returns `out`."""
    tag_dir = verified_tag_dir(checkpoint)
    if "universal_of" in read_manifest(tag_dir):  # its weights are the native checkpoint's, beside it
        tag_dir = verified_tag_dir(tag_dir.parent / read_manifest(tag_dir)["universal_of"])
    verify_contents(tag_dir)
    manifest = read_manifest(tag_dir)
    config = config_from_dict(manifest["model_config"])
    tokenizer_dir = tokenizer_dir or checkpoint_tokenizer_dir(tag_dir)
    tokenizer = load_tokenizer(str(tokenizer_dir)) if tokenizer_dir else None
    if "adapters" not in manifest:
        if merged is not None:
            raise ConfigError(f"--merged: {tag_dir} is a checkpoint of full training, with no adapters to merge")
        return export_hf_model(
            tag_dir, config, out_dir=out, tokenizer=tokenizer, generation_config=manifest.get("generation_config")
        )
    return export_adapter(tag_dir, manifest, out=out, tokenizer=tokenizer, merged=merged)


def export_adapter(tag_dir: Path, manifest: dict, *, out: Path, tokenizer, merged: Path | None = None) -> Path:
    """A LoRA checkpoint as a PEFT adapter folder (`base_model_name_or_path`: the base as the run named it), with
    the tokenizer; `merged`: also the base with the adapters merged in, as a save_pretrained folder."""
    from peft import LoraConfig  # here: importing peft imports bitsandbytes, after models/ has quieted it

    arch = discover(config_from_dict(manifest["model_config"]))
    plan = AdapterPlan(config=LoraConfig(**lora_settings(manifest["adapters"]["config"])), targets={})
    save_adapter(out, plan, adapters_from_checkpoint(tag_dir, arch), base_model=manifest["base_model"])
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    make_portable(out, context=arch.max_positions())
    if merged is not None:
        base_dir = Path(manifest["base_model_dir"])
        if not base_dir.is_dir():
            base_dir = resolve_model_dir(manifest["base_model"])
        merged_model(base_dir, out).save_pretrained(merged)
        if tokenizer is not None:
            tokenizer.save_pretrained(merged)
        make_portable(merged)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoints folder (its `latest` is used) or one tag folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's tokenizer/ folder")
    p.add_argument(
        "--merged", type=Path, default=None, help="LoRA checkpoints: also write the base with the adapters merged in"
    )
    args = p.parse_args(argv)
    return entry_point(lambda: print(export_checkpoint(args.checkpoint, args.out, args.tokenizer, args.merged)))


if __name__ == "__main__":
    sys.exit(main())
