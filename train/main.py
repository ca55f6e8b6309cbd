"""Training entry point: `deepspeed --module train.main ARGS` (see launch.sh).

Phases: resolve the run config (train/config/run_config.py) -> build the run (train/build.py: tokenizer,
packed data, pipeline model, DeepSpeed engine, resume) -> the loop below -> Hugging Face export -> sample.
"""

import atexit
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from models.hf_weights import export_hf_model
from train.build import Run, build_run
from train.checkpoint.manifest import read_manifest
from train.config.args import SAMPLE_TOKENS, Flags, parse_args
from train.config.run_config import resolve_run_config
from train.distributed.agreement import every_rank
from train.distributed.preemption import Preemption, record_exit_code
from train.distributed.run_lock import RunLock, check_no_earlier_run
from train.distributed.setup import init_distributed, rank, say
from train.errors import RunError, entry_point
from train.export import export_adapter
from train.generate import generate_text
from train.observe.divergence import stop_if_diverged


def train(run: Run) -> Path:
    """One optimizer step per iteration; each component decides when it acts. Returns the last checkpoint. The
    metrics log and the data feed are closed on every way out: finished, preempted or failed."""
    with ExitStack() as opened:
        opened.callback(run.batches.close)
        opened.push(lambda failure, *_: run.log.finish(failed=failure is not None))
        preempted_at = train_steps(run)
    if preempted_at is not None:
        raise run.preemption.stop(preempted_at, run.checkpointer.last_saved, run.checkpointer.last_save_seconds)
    return run.checkpointer.last_saved


def train_steps(run: Run) -> int | None:
    """The steps after the resumed one to the last, each saved as the checkpointer decides. Returns the step after
    which a preemption stopped the run (it is saved), or None."""
    engine, last, fp16 = run.engine, run.config.flags.train_steps, run.engine.fp16_enabled()
    run.preemption.arm()
    for step in range(run.start_step + 1, last + 1):
        with run.watchdog.watching(step):
            run.profiler.begin(step)
            run.meter.begin_step()
            start = time.perf_counter()
            loss = engine.train_batch(data_iter=run.data_iter).item()
            seconds = time.perf_counter() - start
            run.meter.report_compile(seconds)
            data_wait = run.batches.take_wait_seconds()
            # Preference blocks count pairs, not answer tokens: `pairs` in the metrics (models/preference_loss.py)
            answer_tokens = None if run.preference.active else run.batches.answer_tokens(step)
            timeline = run.profiler.end()
            grad_norm = run.meter.grad_norm()
            stop_if_diverged(step, loss, grad_norm, fp16=fp16, last_checkpoint=run.checkpointer.latest_tag)
            evaluate = run.evaluator.should_evaluate(step, step == last)
            if evaluate or run.log.should_log(step, step == last):
                metrics = run.meter.metrics(
                    loss,
                    grad_norm,
                    seconds=seconds,
                    data_wait=data_wait,
                    answer_tokens=answer_tokens,
                    timeline=timeline,
                    last_step=step == last,
                )
                metrics.update(run.preference.metrics())  # TRL's rewards/ and logps/ (preference data)
                if evaluate:
                    metrics.update(run.evaluator.evaluate(step))
                    metrics.update(run.preference.metrics("eval_"))
                run.log.log(step, metrics)
            preempted = run.preemption.requested()
        run.checkpointer.save(step, last_step=step == last or preempted)
        if preempted:
            return step
    return None


def export_and_sample(run: Run, checkpoint: Path) -> None:
    """Rank 0 exports the last checkpoint as a Hugging Face folder (LoRA: a PEFT adapter folder, and the merged
    model with --merge-adapter) and samples from it with transformers."""
    if rank() != 0:
        return
    flags, out = run.config.flags, run.config.output_dir
    if run.config.adapters is None:
        generation = read_manifest(checkpoint).get("generation_config")
        model_dir = export_hf_model(
            checkpoint, run.model_config, out_dir=out / "hf", tokenizer=run.tokenizer, generation_config=generation
        )
        say(f"Hugging Face export: {model_dir}")
    else:
        merged = out / "hf" if flags.merge_adapter else None
        model_dir = export_adapter(
            checkpoint, read_manifest(checkpoint), out=out / "adapter", tokenizer=run.tokenizer, merged=merged
        )
        say(f"PEFT adapter: {model_dir}" + (f"; merged model: {merged}" if merged else ""))
    tokens = SAMPLE_TOKENS if flags.sample_tokens is None else flags.sample_tokens
    if tokens == 0:  # --sample-tokens 0: no sample
        return
    prompt = run.evaluator.prompts[0] if run.config.data_format.masked else flags.sample_prompt
    chat = run.config.data_format.kind == "chat"  # stops at the template's end of turn, the turns shown apart
    say("sample: " + generate_text(model_dir, prompt, tokens, seed=flags.seed, chat=chat))


def run_training(flags: Flags) -> None:
    preemption = Preemption()  # first: a signal or the end of launch.sh stops the rank, also while it prepares
    init_distributed(flags.dist_timeout)
    lock = None
    try:
        config = every_rank(lambda: resolve_run_config(flags, dist.get_world_size()))
        lock = RunLock(config.output_dir)  # one run per folder: taken before anything is written into it
        if ended := every_rank(lock.acquire, run_here=rank() == 0):
            say(f"taking over {config.output_dir} from a run that ended without releasing it ({ended})")
        every_rank(lambda: check_no_earlier_run(config.output_dir, flags.load), run_here=rank() == 0)
        run = build_run(config, preemption)
        export_and_sample(run, train(run))
    except RunError:
        dist.destroy_process_group()  # every rank stops here together: a RunError is agreed
        raise
    except Exception:
        preemption.stop_if_ended()  # a peer that stopped with launch.sh: say that, not the collective's error
        raise
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None) -> NoReturn:
    flags = parse_args(argv)
    code = entry_point(lambda: run_training(flags), flags.output_dir.resolve() / "error.log")
    record_exit_code(code)
    leave(code)


def leave(code: int) -> NoReturn:
    """A rank leaves at once, without the interpreter's teardown. That teardown frees torch's and gloo's objects
    one by one: ~2 s per rank on a CPU after the work is done (torch 2.13), a cost every launch paid. After a
    failure it sometimes aborts: the C++ threads of gloo's process groups are destroyed while joinable
    ("terminate called without an active exception") and the launcher reports exit code 250 instead of ours
    (seen in CI, even after destroy_process_group). A finished run still runs the atexit handlers (W&B,
    logging, file locks); a failed one leaves without them, as before."""
    if code == 0:
        atexit._run_exitfuncs()  # CPython's own exit step (private, unchanged since 3.0; checked on 3.11)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
