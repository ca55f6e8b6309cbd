"""Training throughput of each model family through the same pipeline, on this machine.

    python -m bench.families_bench [--models gpt2-tiny llama-tiny qwen2-tiny pythia-tiny] [--stages 2] [--steps 60]

Every model trains `--steps` steps through `train.main` on the embedded corpus (the default run's
settings: BPE 8,192, 128-token blocks, `ds_configs/cpu_pp2.json`, one CPU rank per stage), the models round robin
`--repeats` times. The table gives parameters, model FLOPs per token, the median tokens/s over the
logged steps after the first 10, and GFLOP/s (FLOPs per token x tokens/s: comparable across sizes).
"""

import argparse
import json
import statistics
from pathlib import Path

from bench import fresh_work_dir
from bench.fixtures import QUIET_RUN, cli, deepspeed_command
from bench.pipeline_bench import run


def train(model: str, stages: int, steps: int, work: Path, tokenizer: Path | None) -> Path:
    out = work / f"{model}_{len(list(work.glob(f'{model}_*')))}"
    flags = cli(
        model_config=model,
        pipeline_stages=stages,
        train_steps=steps,
        eval_blocks=16,
        output_dir=out,
        data_cache_dir=work / "cache",
        tokenizer=tokenizer,
        **QUIET_RUN,
    )
    run(deepspeed_command(stages, 29671, flags), env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-tiny", "llama-tiny", "qwen2-tiny", "pythia-tiny"])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    work = fresh_work_dir("families_bench")
    tokenizer, rows = None, {m: [] for m in a.models}
    for _ in range(a.repeats):
        for model in a.models:
            out = train(model, a.stages, a.steps, work, tokenizer)
            tokenizer = tokenizer or out / "tokenizer"
            config = json.loads((out / "run_config.json").read_text())
            speeds = [json.loads(line)["tokens_per_sec"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            rows[model].append((config, statistics.median(speeds[10:])))
    print(f"{a.stages} stages on {a.stages} CPU ranks, {a.steps} steps, median tokens/s after step 10")
    print("| model | family | parameters | MFLOP/token | tokens/s (runs) | GFLOP/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model, runs in rows.items():
        config = runs[0][0]
        speeds = [s for _, s in runs]
        flops = config["flops_per_token"]
        print(
            f"| {model} | {config['model']['model_type']} | {config['parameters'] / 1e6:.2f}M | {flops / 1e6:.1f} | "
            f"{' / '.join(f'{s:,.0f}' for s in speeds)} | {flops * statistics.median(speeds) / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
