"""Export a pipeline checkpoint (any layout, fp32/bf16/fp16) as a Hugging Face model folder.

    python -m train.export runs/default/checkpoints --out my-model
    python -m train.export runs/default/checkpoints/step_300 --out my-model --tokenizer runs/default/tokenizer

Reads the per-layer files DeepSpeed writes (its zero_to_fp32.py does not understand pipeline
checkpoints); the result loads with `AutoModelForCausalLM.from_pretrained`.
"""

import argparse
import sys
from pathlib import Path

from models.hf_weights import config_from_dict, export_hf_model
from train.checkpoint.manifest import read_manifest, verified_tag_dir
from train.data.tokenizer import load_tokenizer
from train.errors import entry_point


def export_checkpoint(checkpoint: Path, out: Path, tokenizer_dir: Path | None = None) -> Path:
    tag_dir = verified_tag_dir(checkpoint)
    if "universal_of" in read_manifest(tag_dir):  # its weights are the native checkpoint's, beside it
        tag_dir = verified_tag_dir(tag_dir.parent / read_manifest(tag_dir)["universal_of"])
    config = config_from_dict(read_manifest(tag_dir)["model_config"])
    run_tokenizer = tag_dir.parent.parent / "tokenizer"  # <run>/checkpoints/<tag>
    tokenizer_dir = tokenizer_dir or (run_tokenizer if run_tokenizer.exists() else None)
    tokenizer = load_tokenizer(str(tokenizer_dir)) if tokenizer_dir else None
    return export_hf_model(tag_dir, config, out, tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoints folder (its `latest` is used) or one tag folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", type=Path, default=None, help="default: the run's tokenizer/ folder")
    args = p.parse_args(argv)
    return entry_point(lambda: print(export_checkpoint(args.checkpoint, args.out, args.tokenizer)))


if __name__ == "__main__":
    sys.exit(main())
