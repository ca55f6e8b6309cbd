"""The planner on an imported pretrained-size model: a SmolLM2-135M-class Llama (random weights saved with
`save_pretrained`, trained with `--model`), full fine-tuning and LoRA on 1 and 2 CPU ranks, each stage's planned
memory by kind beside the measured peak (the method of bench/memory_bench.py: real ranks, fp32, ZeRO-1, AdamW,
glibc's mmap threshold pinned).

    python -m bench.imported_memory_bench [--steps 3] [--layouts full:1 full:2 LoRA:1 LoRA:2] [--tensor-parallel]

`--tensor-parallel`: instead, a Llama with 4 key/value heads (bench/memory_bench.py's LLAMA; SMOL's 3 do not divide
by 2) fully fine-tuned as TP 2 x PP 2 on 4 CPU ranks, beside `train.plan --tensor-parallel 2`'s estimate.
"""

import argparse
from pathlib import Path

from bench.memory_bench import (
    LLAMA,
    LORA_MICRO,
    LORA_RANK,
    SEQ,
    VOCAB,
    bench_ds_config,
    bpe_work_dir,
    llama_base,
    measure,
)
from train.planning.memory_model import plan_stages

# A SmolLM2-135M-class Llama (its published config: GQA 9/3 heads, SwiGLU 1536, tied 49,152-token embedding),
# random weights saved with save_pretrained and imported with --model; the 8,192-token BPE fits inside its vocabulary.
SMOL = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
IMPORTED_SEQ, IMPORTED_MICRO = 256, (1, 4)


def imported_model_table(work: Path, steps: int, layouts: list[str]) -> None:
    """An imported pretrained-size model (SMOL), full fine-tuning and LoRA (rank 16, all-linear) on 1 and 2 ranks:
    each stage's planned memory by kind beside the measured peak."""
    base, arch, adapters = llama_base(work, "smol_base", SMOL)
    ds = bench_ds_config(*IMPORTED_MICRO)
    print(
        f"\nimported SmolLM2-135M-class Llama ({arch.parameters() / 1e6:.1f}M, tied {SMOL['vocab_size']:,}-token "
        f"vocabulary), {IMPORTED_MICRO[1]} micro-batches of {IMPORTED_MICRO[0]} x {IMPORTED_SEQ} tokens, fp32, ZeRO-1"
    )
    print(
        "| training | stages | stage | trainable | weights | optimizer | bucket | gradients "
        "| activations (backward / step) | planned MB | measured MB | planned / measured |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for layout in layouts:
        name, stages = layout.split(":")
        lora = name == "LoRA"
        extra = {"lora_rank": LORA_RANK} if lora else {}
        measured, _ = measure(
            work, f"smol_{name}_pp{stages}", ds, int(stages), steps, model=base, seq_len=IMPORTED_SEQ, **extra
        )
        plans = plan_stages(
            arch,
            ds,
            stages=int(stages),
            data_parallel=1,
            seq_len=IMPORTED_SEQ,
            method="flops",
            adapters=adapters if lora else None,
        )
        for plan in plans:
            m = {k: v / 2**20 for k, v in plan.memory.items()}
            mb, peak = measured[plan.stage], plan.peak / 2**20
            print(
                f"| {name} | {stages} | {plan.stage} | {plan.trainable / 1e6:,.1f}M | {m['weights']:,.0f} "
                f"| {m['optimizer']:,.0f} | {m['reduction']:,.0f} | {m['backward_gradients']:,.0f} "
                f"| {m['activations']:,.0f} / {m['kept_logits']:,.0f} | {peak:,.0f} | {mb:,.0f} | {peak / mb:.2f} |",
                flush=True,
            )


def tensor_parallel_table(work: Path, steps: int) -> None:
    """TP 2 x PP 2 on 4 CPU ranks, full fine-tuning of LLAMA: each stage's planned peak (one rank of its slice group)
    beside the measured one (the largest over the stage's slice ranks)."""
    base, arch, _ = llama_base(work, "llama_base", {"vocab_size": VOCAB, **LLAMA})
    ds = bench_ds_config(*LORA_MICRO)
    measured, _ = measure(work, "llama_tp2_pp2", ds, 2, steps, tensor_parallel=2, model=base, seq_len=SEQ)
    plans = plan_stages(arch, ds, stages=2, data_parallel=1, seq_len=SEQ, method="flops", tensor_parallel=2)
    print(f"\nLlama {arch.parameters() / 1e6:.1f}M, TP 2 x PP 2, {LORA_MICRO[1]} micro-batches of "
          f"{LORA_MICRO[0]} x {SEQ} tokens, fp32, ZeRO-1")  # fmt: skip
    print("| stage | parameters per rank | weights | optimizer | activations | planned MB | measured MB | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for plan in plans:
        m, peak, mb = {k: v / 2**20 for k, v in plan.memory.items()}, plan.peak / 2**20, measured[plan.stage]
        print(
            f"| {plan.stage} | {plan.parameters / 1e6:,.2f}M | {m['weights']:,.0f} | {m['optimizer']:,.0f} "
            f"| {m['activations']:,.0f} | {peak:,.0f} | {mb:,.0f} | {peak / mb:.2f} |",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layouts", nargs="+", default=["full:1", "full:2", "LoRA:1", "LoRA:2"], help="training:stages")
    p.add_argument("--tensor-parallel", action="store_true", help="TP 2 x PP 2 on 4 ranks instead")
    a = p.parse_args()
    if a.tensor_parallel:
        return tensor_parallel_table(bpe_work_dir("imported_memory_bench"), a.steps)
    imported_model_table(bpe_work_dir("imported_memory_bench"), a.steps, a.layouts)


if __name__ == "__main__":
    main()
