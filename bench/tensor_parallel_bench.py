"""Step time of tensor parallelism inside the stages on this machine: TP 2 x PP 2 (4 CPU ranks) against PP 2 (2).

    python -m bench.tensor_parallel_bench [--steps 30] [--repeats 2] [--width 512]

A Llama-style model (d=`--width`, 4 layers, 8 heads, 4 key/value heads, vocab 2048, 256-token blocks) trains the
embedded corpus through `train.main`: 4 micro-batches of 2 per step, fp32, ZeRO-1, AdamW, clipping 1.0. Both
layouts run `--repeats` times round robin; the table gives the median seconds per step after 3 warm-up steps. On a
2-core machine TP 2 x PP 2 runs 4 ranks on 2 cores (OMP_NUM_THREADS=1 everywhere): it shows the communication and
scheduling cost of the cut layers, not a speed-up; on GPUs each rank has its own device.
"""

import argparse
import json
import statistics
from pathlib import Path

from bench import fresh_work_dir
from bench.fixtures import QUIET_RUN, cli, deepspeed_command, ds_config, tiny_llama, write_json
from bench.pipeline_bench import run, step_times

MICRO, MICROS, SEQ = 2, 4, 256
LAYOUTS = {"PP 2 (2 ranks)": 1, "TP 2 x PP 2 (4 ranks)": 2}


def train(tp: int, steps: int, width: int, work: Path) -> list[float]:
    model = tiny_llama(hidden_size=width, intermediate_size=4 * width, num_attention_heads=8, num_key_value_heads=4,
                       num_hidden_layers=4, vocab_size=2048, max_position_embeddings=SEQ)  # fmt: skip
    out = work / f"tp{tp}_{len(list(work.glob(f'tp{tp}_*')))}"
    flags = cli(
        model_config=write_json(work / "model.json", model),
        tokenizer=work / "tokenizer" if (work / "tokenizer").is_dir() else None,
        vocab_size=2048,
        seq_len=SEQ,
        pipeline_stages=2,
        tensor_parallel=tp,
        deepspeed_config=write_json(work / "ds.json", ds_config(MICRO * MICROS, MICRO, scheduler=None)),
        train_steps=steps,
        eval_blocks=MICRO * MICROS,
        output_dir=out,
        data_cache_dir=work / "cache",
        **QUIET_RUN,
    )
    run(deepspeed_command(2 * tp, 29683, flags), env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    if not (work / "tokenizer").is_dir():
        (work / "tokenizer").symlink_to(out / "tokenizer")
    return step_times([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--width", type=int, default=512)
    a = p.parse_args()
    work = fresh_work_dir("tensor_parallel_bench")
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(a.repeats):
        for name, tp in LAYOUTS.items():
            times[name].append(statistics.median(train(tp, a.steps, a.width, work)))
    print(f"d={a.width}, 4 layers, {MICROS} micro-batches of {MICRO} x {SEQ} tokens, median s/step after 3 steps")
    print("| layout | s/step (runs) | tokens/s |")
    print("| --- | ---: | ---: |")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {' / '.join(f'{t:.3f}' for t in runs)} | {MICRO * MICROS * SEQ / median:,.0f} |")


if __name__ == "__main__":
    main()
