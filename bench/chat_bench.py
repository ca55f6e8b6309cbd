"""Chat fine-tuning next to plain-text training, and what attention across packed examples costs.

    python -m bench.chat_bench [--steps 40] [--verses 8000] [--repeats 2]

Builds its own data and tokenizer in a fresh folder (nothing is read from a cache): the default run's BPE
(8,192) trained on the embedded corpus, with ChatML's two special tokens and template added (every run uses
it, so that all have the same vocabulary and head), and chat examples made of the first `--verses` verses
(tests/helpers.py: chat_records). Then trains the default model and layout (gpt2-tiny, 2 stages,
ds_configs/cpu_pp2.json, 128-token blocks) on the plain text, on packed chat data under document attention
(the default) and under causal attention, and on padded chat data, `--repeats` times round robin, and prints a
table: the packing efficiency (answer tokens / block tokens), the block fill, tokens/s of each run and answer
tokens/s (medians after step 10), the final validation loss (in the run's own blocks and attention), and the
held-out answer loss of its export with every example alone: the same answer tokens for every chat run.

The last lines score the held-out answers of the packed runs' exports in their packed blocks, as HF computes
them without positions (attention across the examples) and with the blocks' positions (transformers then
masks each example), against each example alone.
"""

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import fresh_work_dir
from bench.fixtures import CHATML, QUIET_RUN, chat_records, cli, deepspeed_command
from bench.pipeline_bench import run
from models.loss import IGNORE_INDEX
from train.data.example_packing import example_blocks
from train.data.examples import DataFormat
from train.data.sources import embedded_corpus, load_texts, resolve_sources
from train.data.splits import packed_dataset
from train.data.tokenizer import train_bpe_tokenizer


def train(name: str, work: Path, steps: int, **flags) -> Path:
    out = work / name
    args = cli(train_steps=steps, eval_blocks=64, output_dir=out, data_cache_dir=work / "cache", **QUIET_RUN, **flags)
    run(deepspeed_command(2, 29681, args), env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return out


def chat_setup(work: Path, verses: int) -> tuple[Path, Path]:
    """The tokenizer of every run (the default run's BPE + ChatML: text and chat runs have the same vocabulary,
    hence the same head) and a chat jsonl made of verses."""
    texts = load_texts(resolve_sources([embedded_corpus()])[0])
    tokenizer = train_bpe_tokenizer((b["text"] for b in texts.iter(batch_size=1000)), 8192, work / "bpe")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(work / "chat_tokenizer")
    texts = [json.loads(line)["text"] for line in itertools.islice(open(embedded_corpus()), verses)]
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in chat_records(texts)))
    return work / "chat_tokenizer", data


def median_after_10(out: Path, value) -> float:
    """The median of `value(metrics)` over the logged steps after the first 10."""
    return statistics.median(
        [value(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()][10:]
    )


@torch.no_grad()
def held_out_answer_losses(out: Path, data: Path, tokenizer, work: Path) -> dict[str, float]:
    """Mean held-out answer loss of a run's export over the packed validation blocks: `causal` (HF on the block,
    no positions), `document` (HF on the block with its positions) and `alone` (each example by itself)."""
    model = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    blocks = packed_dataset(
        resolve_sources([str(data)]),
        DataFormat("chat"),
        tokenizer,
        seq_len=128,
        val_fraction=0.02,
        cache_dir=work / "cache",
    )
    sums, count = {"causal": 0.0, "document": 0.0, "alone": 0.0}, 0
    for row in blocks["validation"]:
        ids, labels, positions = row["input_ids"].long(), row["labels"].long(), row["position_ids"].long()
        n = int((labels[1:] != IGNORE_INDEX).sum())
        sums["causal"] += model(ids[None], labels=labels[None]).loss.item() * n
        # No cache: with one, transformers 5.24 does not look for packed documents in the positions (masking_utils)
        document = model(ids[None], position_ids=positions[None], labels=labels[None], use_cache=False)
        sums["document"] += document.loss.item() * n
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for start, end in itertools.pairwise(starts):
            example_labels = labels[start:end]
            k = int((example_labels[1:] != IGNORE_INDEX).sum())
            if k:
                sums["alone"] += model(ids[None, start:end], labels=example_labels[None]).loss.item() * k
        count += n
    return {name: total / count for name, total in sums.items()} | {"answer_tokens": count}


VARIANTS = {
    "text": {},
    "chat, packed": {"packing": "pack"},
    "chat, packed, causal": {"packing": "pack", "attention": "causal"},
    "chat, padded": {"packing": "pad"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--verses", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant, round robin")
    a = p.parse_args()
    work = fresh_work_dir("chat_bench")
    tokenizer_dir, data = chat_setup(work, a.verses)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    runs = {name: [] for name in VARIANTS}
    for repeat in range(a.repeats):  # round robin: a slow spell of this shared machine hits every variant alike
        for name, flags in VARIANTS.items():
            chat = dict(data=data, data_format="chat", **flags) if flags else {}
            folder = f"{name.replace(', ', '_')}_{repeat}"
            runs[name].append(train(folder, work, a.steps, tokenizer=tokenizer_dir, **chat))
    print(
        "| data | blocks | answer tokens / block tokens | fill | tokens/s (runs) | answer tokens/s | eval loss "
        "| held-out answers alone |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    scores = {}
    for name, outs in runs.items():
        speeds = " / ".join(f"{median_after_10(out, lambda m: m['tokens_per_sec']):,.0f}" for out in outs)
        eval_loss = [json.loads(line) for line in (outs[0] / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
        if name == "text":
            print(f"| text | | all | 1.000 | {speeds} | | {eval_loss:.3f} | |")
            continue
        (source,) = resolve_sources([str(data)])
        _, stats = example_blocks(source, DataFormat("chat", packing=VARIANTS[name]["packing"]), tokenizer, 128, None)
        scores[name] = held_out_answer_losses(outs[0], data, tokenizer, work)
        answer_speed = median_after_10(outs[0], lambda m: m["tokens_per_sec"] * (1 - m["masked_fraction"]))
        print(
            f"| {name} | {stats['blocks']:,} | {stats['answer_fraction']:.3f} | {stats['fill_fraction']:.3f} | "
            f"{speeds} | {answer_speed:,.0f} | {eval_loss:.3f} | {scores[name]['alone']:.4f} |"
        )
    for name in ("chat, packed", "chat, packed, causal"):
        score = scores[name]
        gap = {how: (score[how] - score["alone"]) / score["alone"] for how in ("causal", "document")}
        print(
            f"\n{name} run, held-out answers in their packed blocks ({score['answer_tokens']:,} answer tokens): "
            f"{score['causal']:.4f} across examples ({gap['causal']:+.2%} vs alone), {score['document']:.4f} with "
            f"the positions ({gap['document']:+.2%}), {score['alone']:.4f} each example alone"
        )


if __name__ == "__main__":
    main()
