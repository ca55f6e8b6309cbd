"""Memory: the planner's estimate beside what training really holds, with and without activation checkpointing,
and full fine-tuning beside LoRA on the same pretrained model and layout.

    python -m bench.memory_bench [--steps 4] [--only lora|checkpointing]

Each row trains a CPU-sized model for a few steps through `train.main` (real ranks, fp32, ZeRO-1,
AdamW) and reads `model_mem_mb/stage<i>`: peak resident memory less what the rank held before the
model was built (glibc's mmap threshold pinned, so that freed tensors leave the RSS as they leave a
GPU allocator's counters). Beside it, `train.plan`'s estimate for the same model, layout and DeepSpeed config,
and the median seconds per step (and tokens/s), so a cost shows next to its saving.
"""

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from bench import fresh_work_dir
from bench.fixtures import QUIET_RUN, cli, deepspeed_command, ds_config, tiny_gpt2, write_json
from bench.pipeline_bench import run
from models.architecture import discover
from models.hf_weights import config_from_dict
from train.planning.memory_model import plan_stages

SEQ, VOCAB = 128, 8192  # the vocabulary is the BPE tokenizer's, trained here on the embedded corpus
# (blocks, width, heads, stages, micro-batch, micro-batches)
CASES = [(8, 384, 6, 1, 4, 4), (8, 384, 6, 2, 4, 8), (6, 512, 8, 2, 4, 8)]


def measure(
    work: Path, name: str, ds: dict, stages: int, steps: int, tensor_parallel: int = 1, **flags
) -> tuple[dict, list]:
    """Train `steps` steps on stages x `tensor_parallel` ranks; (measured model MB per stage, the metrics rows)."""
    out = work / f"run_{name}_{time.time_ns()}"
    flags = {"seq_len": SEQ, **flags}
    args = cli(
        tokenizer=work / "tokenizer",
        pipeline_stages=stages,
        tensor_parallel=tensor_parallel,
        deepspeed_config=write_json(work / f"{name}_ds.json", ds),
        train_steps=steps,
        eval_blocks=ds["train_batch_size"],
        output_dir=out,
        data_cache_dir=work / "cache",
        **QUIET_RUN,
        **flags,
    )
    ranks = stages * tensor_parallel
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, 2 // ranks)), "MALLOC_MMAP_THRESHOLD_": "131072"}
    run(deepspeed_command(ranks, 29658, args), env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {s: rows[-1][f"model_mem_mb/stage{s}"] for s in range(stages)}, rows


def bench_ds_config(micro: int, micro_batches: int) -> dict:
    return ds_config(
        micro * micro_batches,
        micro,
        scheduler=None,
        optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    )


def train_and_read_memory(work: Path, case: tuple, checkpoint_interval: int, steps: int) -> tuple[dict, float, dict]:
    layers, d, heads, stages, micro, micro_batches = case
    config = tiny_gpt2(layers, d, heads, SEQ, vocab_size=VOCAB)
    ds = bench_ds_config(micro, micro_batches)
    name = f"{layers}x{d}_pp{stages}_ac{checkpoint_interval}"
    measured, rows = measure(
        work,
        name,
        ds,
        stages,
        steps,
        model_config=write_json(work / f"{name}.json", config),
        activation_checkpoint_interval=checkpoint_interval,
    )
    plans = plan_stages(
        discover(config_from_dict(config)),
        ds,
        stages=stages,
        data_parallel=1,
        seq_len=SEQ,
        method="flops",
        checkpoint_interval=checkpoint_interval,
    )
    planned = {p.stage: (p.peak / 2**20, p.memory["activations"] / 2**20) for p in plans}
    return measured, statistics.median(r["step_time"] for r in rows[1:]), planned


# A Llama-style model (GQA, SwiGLU, untied head) saved with save_pretrained, fine-tuned fully and with LoRA.
LLAMA = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=SEQ,
    tie_word_embeddings=False,
)
LORA_RANK, LORA_STAGES, LORA_MICRO = 16, 2, (4, 8)


def llama_base(work: Path, name: str, settings: dict) -> tuple[Path, object, object]:
    """A random Llama of `settings` saved under work/name, its Architecture and its rank-16 all-linear LoRA plan."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.lora import plan_adapters
    from models.lora_targets import lora_config

    torch.manual_seed(0)
    base = work / name
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(base)
    arch = discover(config_from_dict({"model_type": "llama", **settings}))
    config = lora_config(rank=LORA_RANK, alpha=None, dropout=0.0, target_modules=None, base_model=None)
    return base, arch, plan_adapters(arch, config)


def full_versus_lora(work: Path, steps: int) -> None:
    base, arch, adapters = llama_base(work, "llama_base", {"vocab_size": VOCAB, **LLAMA})
    ds = bench_ds_config(*LORA_MICRO)
    print(
        f"\nfull fine-tuning vs LoRA (rank {LORA_RANK}, all-linear), {LORA_STAGES} stages, {LORA_MICRO[1]} x "
        f"{LORA_MICRO[0]} micro-batches of {SEQ} tokens, fp32, ZeRO-1"
    )
    print("| training | stage | trainable | planned peak MB | measured MB | planned / measured | s/step | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, extra, plan_adapters_ in (("full", {}, None), ("LoRA", {"lora_rank": LORA_RANK}, adapters)):
        measured, rows = measure(work, f"llama_{name}", ds, LORA_STAGES, steps, model=base, **extra)
        plans = plan_stages(
            arch,
            ds,
            stages=LORA_STAGES,
            data_parallel=1,
            seq_len=SEQ,
            method="flops",
            checkpoint_interval=0,
            adapters=plan_adapters_,
        )
        step_time = statistics.median(r["step_time"] for r in rows[1:])
        tokens = statistics.median(r["tokens_per_sec"] for r in rows[1:])
        for plan in plans:
            mb, peak = measured[plan.stage], plan.peak / 2**20
            print(
                f"| {name} | {plan.stage} | {plan.trainable / 1e6:,.2f}M | {peak:,.0f} | {mb:,.0f} | {peak / mb:.2f} "
                f"| {step_time:.2f} | {tokens:,.0f} |",
                flush=True,
            )


def preset_model(work: Path, preset: str) -> Path:
    """The preset at its own vocabulary (Qwen2.5's 151,936: a quarter of the 0.5B model), random weights saved with
    save_pretrained, for `--model` (the 8,192-token BPE fits inside its embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    from models.presets import preset_config

    folder = work / f"{preset}_model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config(preset)).save_pretrained(folder)
    return folder


def preset_table(work: Path, presets: list[str], steps: int, seq_len: int, own_vocab: bool) -> None:
    """Real sizes: a preset trained on 2 ranks (fp32, ZeRO-1, 4 micro-batches of 1), each stage's planned memory
    by kind beside the measured peak; at the BPE's vocabulary, or (`own_vocab`) the preset's own."""
    from models.presets import resolve_model_config

    vocab = "the preset's own vocabulary" if own_vocab else f"a {VOCAB}-token vocabulary"
    print(f"\nreal sizes, {vocab}: 2 stages, 4 micro-batches of 1 x {seq_len} tokens, fp32, ZeRO-1, AdamW")
    print(
        "| preset | stage | parameters | weights | optimizer | bucket | gradients | activations | planned MB "
        "| measured MB | planned / measured |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    ds = bench_ds_config(1, 4)
    for preset in presets:
        if own_vocab:
            model = preset_model(work, preset)
            config = resolve_model_config(None, str(model), None, fused_gelu=True)
            measured, _ = measure(work, preset, ds, 2, steps, model=model, seq_len=seq_len)
            shutil.rmtree(model)
        else:
            config = resolve_model_config(preset, None, VOCAB, fused_gelu=True)
            measured, _ = measure(work, preset, ds, 2, steps, model_config=preset, seq_len=seq_len)
        for plan in plan_stages(discover(config), ds, stages=2, data_parallel=1, seq_len=seq_len, method="flops"):
            m = {k: v / 2**20 for k, v in plan.memory.items()}
            mb, peak = measured[plan.stage], plan.peak / 2**20
            print(
                f"| {preset} | {plan.stage} | {plan.parameters / 1e6:,.0f}M | {m['weights']:,.0f} "
                f"| {m['optimizer']:,.0f} | {m['reduction']:,.0f} | {m['backward_gradients']:,.0f} "
                f"| {m['activations']:,.0f} | {peak:,.0f} | {mb:,.0f} | {peak / mb:.2f} |",
                flush=True,
            )


def bpe_work_dir(name: str) -> Path:
    """A fresh work folder holding the VOCAB-token BPE trained on the embedded corpus (its `tokenizer/`)."""
    from train.data.sources import embedded_corpus, load_texts, resolve_sources
    from train.data.tokenizer import train_bpe_tokenizer

    work = fresh_work_dir(name)
    texts = load_texts(resolve_sources([embedded_corpus()])[0], "text")
    train_bpe_tokenizer((b["text"] for b in texts.iter(batch_size=1000)), VOCAB, work / "tokenizer")
    return work


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--only", choices=["lora", "checkpointing", "presets"], default=None, help="one of the tables")
    p.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b"], help="the real-size table's presets")
    p.add_argument("--preset-seq-len", type=int, default=256)
    p.add_argument("--preset-vocab", choices=["bpe", "own"], default="own", help="the real-size table's vocabulary")
    a = p.parse_args()
    work = bpe_work_dir("memory_bench")
    if a.only in (None, "checkpointing"):
        checkpointing_table(work, a.steps)
    if a.only in (None, "lora"):
        full_versus_lora(work, a.steps)
    if a.only in (None, "presets"):
        preset_table(work, a.presets, a.steps, a.preset_seq_len, own_vocab=a.preset_vocab == "own")


def checkpointing_table(work: Path, steps: int) -> None:
    print(
        "| model | stages | micro-batches | activation checkpointing | stage | planned peak MB (activations) "
        "| measured MB | planned / measured | s/step |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for case in CASES:
        layers, d, _, stages, micro, micro_batches = case
        for interval in (0, 1):
            measured, step_time, planned = train_and_read_memory(work, case, interval, steps)
            for stage, mb in measured.items():
                peak, activations = planned[stage]
                checkpointing = "every block" if interval else "off"
                print(
                    f"| {layers} x {d} | {stages} | {micro_batches} x {micro} | {checkpointing} | {stage} "
                    f"| {peak:,.0f} ({activations:,.0f}) | {mb:,.0f} | {peak / mb:.2f} | {step_time:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
