"""Mixture-of-experts training throughput on CPU: a plain transformers loop against ours on 1 and 2 stages.

    python -m bench.moe_bench [--models qwen3_moe mixtral] [--steps 12] [--repeats 2]

Two tiny MoE models (d=256, 4 layers, vocab 1024, seq 128; Qwen3-MoE with 16 experts, Mixtral with 8, top-2),
micro-batch 2, 8 micro-batches per step, fp32, AdamW, clipping 1.0, the router loss on (coefficient 0.01) in every
variant, the experts through transformers' default implementation (`grouped_mm`) in every variant. The plain loop
is `AutoModelForCausalLM(...).loss` (cross-entropy + router loss) with backward and `optimizer.step()` on random
tokens of the same shape; ours trains the embedded corpus through `train.main` (routing differs with the tokens,
not the work per token). Every variant runs `--repeats` times round robin; the table gives the median seconds per
step after 2 warm-up steps and tokens/s.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import fresh_work_dir
from bench.fixtures import QUIET_RUN, cli, deepspeed_command, ds_config, write_json
from bench.pipeline_bench import run, step_times, timed_plain_steps

MICRO, MICROS, SEQ, COEF = 2, 8, 128, 0.01
_SHAPE = dict(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    num_experts_per_tok=2,
)
MODELS = {
    "qwen3_moe": dict(_SHAPE, model_type="qwen3_moe", num_experts=16, moe_intermediate_size=256, head_dim=64),
    "mixtral": dict(_SHAPE, model_type="mixtral", num_local_experts=8, intermediate_size=512),
}
VARIANTS = ["plain transformers loop, 2 threads", "ours, 1 stage, 2 threads", "ours, 2 stages (flops)"]


def plain_loop(family: str, steps: int) -> list[float]:
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.set_num_threads(2)
    settings = {k: v for k, v in MODELS[family].items() if k != "model_type"}
    config = CONFIG_MAPPING[family](**settings, output_router_logits=True, router_aux_loss_coef=COEF)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return timed_plain_steps(model, MICROS, MICRO, SEQ, steps)


def ours(family: str, stages: int, steps: int, work: Path) -> list[float]:
    ds = ds_config(
        MICRO * MICROS,
        MICRO,
        scheduler=None,
        optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    )
    out = work / f"run_{family}_{stages}_{time.time_ns()}"
    flags = cli(
        model_config=write_json(work / f"{family}.json", MODELS[family]),
        tokenizer=work / "tokenizer",
        seq_len=SEQ,
        pipeline_stages=stages,
        partition_method="flops",
        deepspeed_config=write_json(work / "ds.json", ds),
        train_steps=steps,
        eval_blocks=MICRO * MICROS,
        output_dir=out,
        data_cache_dir=work / "cache",
        router_aux_loss_coef=COEF,
        **QUIET_RUN,
    )
    run(deepspeed_command(stages, 29657, flags), env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(2 // stages)})
    return step_times([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:])


def measure(name: str, family: str, steps: int, work: Path) -> list[float]:
    if name.startswith("plain"):
        return json.loads(
            run([sys.executable, "-m", "bench.moe_bench", "--plain", family, "--steps", str(steps)]).stdout
        )
    return ours(family, 1 if "1 stage" in name else 2, steps, work)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--plain", choices=list(MODELS), help=argparse.SUPPRESS)  # internal: one plain loop
    a = p.parse_args()
    if a.plain:
        print(json.dumps(plain_loop(a.plain, a.steps)))
        return
    from train.data.sources import embedded_corpus, load_texts, resolve_sources
    from train.data.tokenizer import train_bpe_tokenizer

    work = fresh_work_dir("moe_bench")
    texts = load_texts(resolve_sources([embedded_corpus()])[0], "text")
    train_bpe_tokenizer((b["text"] for b in texts.iter(batch_size=1000)), 1024, work / "tokenizer")
    print(f"seq {SEQ}, {MICROS} micro-batches of {MICRO} a step, router loss {COEF}, {a.steps} steps")
    print("| model | variant | s/step median (runs) | tokens/s (median) | vs plain loop |")
    print("| --- | --- | ---: | ---: | ---: |")
    for family in a.models:
        results = {name: [] for name in VARIANTS}
        for _ in range(a.repeats):  # round robin: a burst of machine noise does not hit one variant twice
            for name in VARIANTS:
                results[name].append(statistics.median(measure(name, family, a.steps, work)))
        plain = statistics.median(results[VARIANTS[0]])
        for name, medians in results.items():
            median = statistics.median(medians)
            runs = " / ".join(f"{m:.3f}" for m in medians)
            print(
                f"| {family} | {name} | {runs} | {MICRO * MICROS * SEQ / median:,.0f} | {plain / median:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
