"""Pipeline throughput on CPU: plain transformers loop vs ours (1 and 2 stages) vs torch.distributed.pipelining,
and ours under the 1F1B and the DualPipeV schedule side by side.

    python -m bench.pipeline_bench [--layers 4 8] [--steps 12] [--repeats 2] [--only "1 stage" Schedule1F1B]
        [--tables variants schedules] [--micro-batches 4 8 16]

Ours runs eager and with `--compile` (inductor; the 2 warm-up steps hold the compilation).

GPT-2 d=256, vocab 1024, seq 128, micro-batch 2, 16 micro-batches per step, fp32, AdamW,
clipping 1.0 by the global gradient norm (every variant, so that all compute the same update); ours
with ZeRO-1, which shards nothing with one data-parallel replica but is what clips by the global norm (DeepSpeed
0.19.8 without ZeRO clips a pipeline by its first stage's norm; pipegpt refuses that).
Every variant runs `--repeats` times in this invocation; the table gives the
median and the fastest seconds per step after 2 warm-up steps (the fastest is the cost without
this shared machine's bursts of noise). Pipeline efficiency = ideal / measured, with ideal =
(plain loop on 1 thread) / p x (m + p - 1) / m: what p perfect stages would take. Two ideals: from the
1-thread loop running alone, and contended, from two 1-thread loops running at the same time (as two
stages share this machine's cores, memory bandwidth and caches: each computes slower than alone).

The schedules table runs ours on 2 ranks (FLOPs partition) under 1F1B and under DualPipeV at each of
`--micro-batches` (micro-batch 2 throughout), in the same invocation, round robin. Its efficiency is against the
contended ideal without any bubble, (two 1-thread loops at once) / 2, beside 1F1B's bubble-bound ceiling
m / (m + p - 1): a schedule with a smaller bubble can pass it, 1F1B cannot. The measured bubble is the
timeline's (`--profile-steps`, the last step, not in the step times): per rank, the share of the step not
spent in forward or backward; the theory is train/planning/schedules.py's. Memory is each rank's peak
resident set (`peak_mem_mb`, the largest over the ranks) and its growth once the model was built.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import fresh_work_dir

REPO = Path(__file__).resolve().parent.parent
MICRO, MICROS, SEQ = 2, 16, 128


def plain_loop(layers: int, threads: int, steps: int, micros: int = MICROS) -> list[float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    config = GPT2Config(
        n_layer=layers,
        n_embd=256,
        n_head=4,
        n_positions=SEQ,
        vocab_size=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "sdpa"
    return timed_plain_steps(GPT2LMHeadModel(config), micros, MICRO, SEQ, steps)


def timed_plain_steps(model, micros: int, micro: int, seq: int, steps: int) -> list[float]:
    """Seconds of each step of `model` trained by hand (AdamW, clipping 1.0, `micros` micro-batches of random
    tokens), after 2 warm-up steps."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (micros, micro, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        for tokens in batch:
            (model(tokens, labels=tokens).loss / micros).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[2:]


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ours(
    layers: int,
    stages: int,
    steps: int,
    work: Path,
    tokenizer: Path,
    partition: str,
    compiled: bool = False,
    schedule: str = "1f1b",
    micros: int = MICROS,
) -> list[dict]:
    """The metrics of each step after the 2 warm-up ones (with `--profile-steps` on the last: its timeline)."""
    from bench.fixtures import QUIET_RUN, cli, deepspeed_command, ds_config, tiny_gpt2, write_json

    model = write_json(work / f"gpt2_{layers}.json", tiny_gpt2(layers, 256, 4, SEQ, vocab_size=1024))
    ds = ds_config(
        MICRO * micros,
        MICRO,
        scheduler=None,
        zero_optimization={"stage": 1},  # stage 0 clips by stage 0's norm alone (train/config/ds_config.py)
        optimizer={"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    )
    out = work / f"run_{layers}_{stages}_{partition}_{schedule}_{micros}_{time.time_ns()}"
    flags = cli(
        model_config=model,
        tokenizer=tokenizer,
        seq_len=SEQ,
        pipeline_stages=stages,
        partition_method=partition,
        schedule=schedule,
        deepspeed_config=write_json(work / f"ds_{micros}.json", ds),
        train_steps=steps,
        eval_blocks=MICRO * micros,
        output_dir=out,
        data_cache_dir=work / "cache",
        compile=compiled,
        **QUIET_RUN,
    )
    flags += ["--profile-steps", str(steps)] if stages > 1 else []
    run(deepspeed_command(stages, 29655, flags), env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(2 // stages)})
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][2:]


def step_times(metrics: list[dict]) -> list[float]:
    """The step times, without a profiled step (its instructions synchronise and record)."""
    return [m["step_time"] for m in metrics if not any(k.startswith("bubble/") for k in m)]


def torch_pipelining(layers: int, schedule: str, steps: int) -> list[float]:
    proc = run(
        [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29656",
            "-m",
            "bench.torch_pipelining",
            "--layers",
            str(layers),
            "--schedule",
            schedule,
            "--steps",
            str(steps),
        ]
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_times"]


VARIANTS = [
    "plain transformers loop, 2 threads",
    "plain transformers loop, 1 thread",
    "plain transformers loop, 1 thread, two at once",
    "ours, 1 stage, 2 threads",
    "ours, 1 stage, 2 threads, compiled",
    "ours, 2 stages (parameters)",
    "ours, 2 stages (flops)",
    "ours, 2 stages (flops), compiled",
    "torch Schedule1F1B, 2 stages",
    "torch ScheduleGPipe, 2 stages",
]


def measure(name: str, layers: int, steps: int, work: Path) -> list[float]:
    if name.startswith("plain"):
        threads = "2" if "2 threads" in name else "1"
        cmd = [sys.executable, "-m", "bench.pipeline_bench", "--plain", str(layers), threads, "--steps", str(steps)]
        return json.loads(run(cmd).stdout) if "two at once" not in name else two_loops_at_once(layers, steps, MICROS)
    if name.startswith("ours"):
        stages = 1 if "1 stage" in name else 2
        partition = "flops" if "flops" in name else "parameters"
        return step_times(ours(layers, stages, steps, work, work / "tokenizer", partition, compiled="compiled" in name))
    return torch_pipelining(layers, "1f1b" if "1F1B" in name else "gpipe", steps)


def variants_table(layer_counts: list[int], steps: int, repeats: int, only: list[str] | None, work: Path) -> None:
    print(
        "| blocks | variant | s/step median | s/step fastest | tokens/s (median) | vs plain, 2 threads "
        "| pipeline efficiency, median (alone / contended) |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for layers in layer_counts:
        # The ideal needs the 1-thread plain loop; the ratio column needs the 2-thread one.
        wanted = [n for n in VARIANTS if n.startswith("plain") or not only or any(o in n for o in only)]
        results = {name: [] for name in wanted}
        for _ in range(repeats):  # round robin, so that a burst of machine noise does not hit one variant twice
            for name in wanted:
                results[name].append(measure(name, layers, steps, work))
        plain2 = statistics.median(statistics.median(t) for t in results["plain transformers loop, 2 threads"])
        # What 2 perfect stages would take: half a 1-thread loop's step, plus the fill and drain of 1F1B.
        ideal, contended = (
            statistics.median(statistics.median(t) for t in results[f"plain transformers loop, 1 thread{which}"])
            / 2
            * (MICROS + 1)
            / MICROS
            for which in ("", ", two at once")
        )
        for name, repeats_of_name in results.items():
            for times in repeats_of_name:
                median, fastest = statistics.median(times), min(times)
                eff = f"{ideal / median:.2f} / {contended / median:.2f}" if "2 stages" in name else ""
                print(
                    f"| {layers} | {name} | {median:.3f} | {fastest:.3f} | {MICRO * MICROS * SEQ / median:,.0f} "
                    f"| {plain2 / median:.2f} | {eff} |",
                    flush=True,
                )


def two_loops_at_once(layers: int, steps: int, micros: int) -> list[float]:
    """Two 1-thread plain loops sharing the machine, as two pipeline ranks do: each one's step times."""
    cmd = [sys.executable, "-m", "bench.pipeline_bench", "--plain", str(layers), "1", "--steps", str(steps)]
    cmd += ["--plain-micro-batches", str(micros)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    return [t for proc in procs for t in json.loads(proc.communicate()[0])]


def schedules_table(layer_counts: list[int], steps: int, repeats: int, micro_batches: list[int], work: Path) -> None:
    from train.planning.schedules import SCHEDULE_NAMES, bubble_theory

    print(
        "| blocks | micro-batches | schedule | s/step median | s/step fastest | tokens/s (median) "
        "| efficiency (contended, no bubble) | 1F1B ceiling m/(m+1) | bubble measured, rank 0 / 1 | bubble theory "
        "| peak MB, rank 0 / 1 | model MB, rank 0 / 1 |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for layers in layer_counts:
        for micros in micro_batches:
            contended, runs = [], {schedule: [] for schedule in SCHEDULE_NAMES}
            for _ in range(repeats):  # round robin: a burst of noise does not hit one schedule twice
                contended.append(statistics.median(two_loops_at_once(layers, steps, micros)))
                for schedule in runs:
                    runs[schedule].append(
                        ours(layers, 2, steps, work, work / "tokenizer", "flops", schedule=schedule, micros=micros)
                    )
            ideal = statistics.median(contended) / 2  # two perfect ranks, no bubble
            for schedule, repeats_of_schedule in runs.items():
                for metrics in repeats_of_schedule:
                    times, last = step_times(metrics), metrics[-1]
                    median = statistics.median(times)
                    bubble = " / ".join(f"{last[f'bubble/stage{r}']:.1%}" for r in range(2))
                    peak, model = (" / ".join(f"{last[f'{k}/stage{r}']:,.0f}" for r in range(2)) for k in MEMORY)
                    print(
                        f"| {layers} | {micros} | {SCHEDULE_NAMES[schedule]} | {median:.3f} | {min(times):.3f} "
                        f"| {MICRO * micros * SEQ / median:,.0f} | {ideal / median:.2f} | {micros / (micros + 1):.2f} "
                        f"| {bubble} | {bubble_theory(schedule, 2, micros):.1%} | {peak} | {model} |",
                        flush=True,
                    )


MEMORY = ("peak_mem_mb", "model_mem_mb")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="+", default=None, help="run the variants whose names contain one of these")
    p.add_argument("--tables", nargs="+", choices=("variants", "schedules"), default=["variants", "schedules"])
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16], help="of the schedules table")
    p.add_argument("--plain", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: layers threads
    p.add_argument("--plain-micro-batches", type=int, default=MICROS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.plain:
        print(json.dumps(plain_loop(a.plain[0], a.plain[1], a.steps, a.plain_micro_batches)))
        return
    from train.data.sources import embedded_corpus, load_texts, resolve_sources
    from train.data.tokenizer import train_bpe_tokenizer

    work = fresh_work_dir("pipeline_bench")
    texts = load_texts(resolve_sources([embedded_corpus()])[0], "text")
    train_bpe_tokenizer((b["text"] for b in texts.iter(batch_size=1000)), 1024, work / "tokenizer")
    if "variants" in a.tables:
        variants_table(a.layers, a.steps, a.repeats, a.only, work)
    if "schedules" in a.tables:
        schedules_table(a.layers, a.steps, a.repeats, a.micro_batches, work)


if __name__ == "__main__":
    main()
