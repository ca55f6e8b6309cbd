"""`train.evaluate` in-process on one rank: the run's evaluator, on an imported model, equals transformers' loss on
the same validation blocks, and writes nothing but its results (and the tokenizer it used). Over real ranks, against
a training run's own evaluation: tests/integration/test_evaluate_launch.py."""

import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.helpers import tiny_llama, train_blocks, write_ds_config
from train.config.run_config import resolve_run_config
from train.evaluate import RESULTS_FILE, evaluate_model, evaluation_flags


def test_evaluating_an_imported_model_gives_transformers_loss_on_the_validation_blocks(
    corpus, tokenizer_dir, tmp_path, one_rank_group
):
    torch.manual_seed(0)
    settings = {k: v for k, v in tiny_llama().items() if k != "model_type"}
    AutoModelForCausalLM.from_config(LlamaConfig(**settings)).save_pretrained(tmp_path / "model")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--model", tmp_path / "model", "--tokenizer", tokenizer_dir, "--data", corpus, "--seq-len", 32]
    args += ["--val-fraction", 0.05, "--eval-blocks", 16, "--pipeline-stages", 1, "--sample-tokens", 3]
    args += ["--deepspeed_config", write_ds_config(tmp_path / "ds.json"), "--data-cache-dir", cache]
    flags = evaluation_flags([*map(str, args), "--output-dir", str(out), "--wandb-mode", "disabled"])
    results = evaluate_model(resolve_run_config(flags, world_size=1))

    blocks = train_blocks(corpus, tokenizer_dir, cache, split="validation")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.stack([blocks[i]["input_ids"] for i in range(16)]).long()
    with torch.no_grad():  # every block has 32 tokens: the mean over blocks is the mean of their means
        expected = torch.stack([hf(row[None], labels=row[None]).loss for row in ids]).mean().item()
    assert abs(results["eval_loss"] - expected) <= 1e-6 * expected, (results["eval_loss"], expected)
    assert results["blocks"] == 16 and len(results["samples"]) == 2  # a micro-batch of 2 prompts
    assert json.loads((out / RESULTS_FILE).read_text())["eval_loss"] == results["eval_loss"]
    assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE, "tokenizer"]
