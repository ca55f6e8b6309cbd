"""A timeline of the pipeline schedule (1F1B or DualPipeV): every instruction each rank executes, for chosen steps.

DeepSpeed's pipeline engine runs a schedule of instructions (LoadMicroBatch, ForwardPass,
SendActivation, RecvGrad, BackwardPass, ReduceTiedGrads, ReduceGrads, OptimizerStep; DualPipeV adds
CommitP2P and a `phase` on each) looked up in a table on the engine. We give the engine instance a copy of
that table whose entries time themselves during profiled steps (`models/deepspeed_internals.wrap_instructions`).

Writes `<output>/timeline/step_N.trace.json` (Chrome / Perfetto: one process per pipeline rank, one
thread per data-parallel replica), `step_N.png` (a Gantt chart, one row per rank; DualPipeV's phase-1
passes hatched) and returns the measured bubble per rank beside the schedule's theory
(`train/planning/schedules.bubble_theory`: 1F1B's (p - 1) / (m + p - 1)).
"""

import json
import time
from pathlib import Path

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine

from models.deepspeed_internals import wrap_instructions
from train.planning.schedules import SCHEDULE_NAMES, bubble_theory

COMPUTE = ("ForwardPass", "BackwardPass")
COLOURS = {
    "LoadMicroBatch": "#9e9e9e",
    "ForwardPass": "#1f77b4",
    "BackwardPass": "#ff7f0e",
    "SendActivation": "#2ca02c",
    "RecvActivation": "#98df8a",
    "SendGrad": "#d62728",
    "RecvGrad": "#ff9896",
    "ReduceTiedGrads": "#9467bd",
    "ReduceGrads": "#8c564b",
    "OptimizerStep": "#e377c2",
    "CommitP2P": "#17becf",
}


class ScheduleProfiler:
    """Records the chosen steps' schedules (none: it does nothing) into `<output_dir>/timeline`."""

    def __init__(self, *, engine: PipelineEngine, steps: set[int], output_dir: Path):
        self.engine, self.steps, self.output_dir = engine, steps, output_dir
        self.events: list[dict] = []
        self.step = None
        self.t0 = 0.0
        if steps:
            wrap_instructions(engine, self._timed)

    def _timed(self, name: str, fn):
        def run(engine, **kwargs):
            if self.step is None:
                return fn(engine, **kwargs)
            get_accelerator().synchronize()  # device work belongs to the instruction that launched it
            start = time.perf_counter()
            result = fn(engine, **kwargs)
            get_accelerator().synchronize()
            self.events.append(
                {
                    "name": name,
                    "start": start - self.t0,
                    "end": time.perf_counter() - self.t0,
                    "step": self.step,
                    **kwargs,
                }
            )
            return result

        return run

    def begin(self, step: int) -> None:
        if step in self.steps:
            dist.barrier()  # a common time origin on every rank
            self.t0, self.step = time.perf_counter(), step

    def end(self) -> dict | None:
        """After a profiled step (a collective): rank 0 writes the trace and picture; returns the bubble summary."""
        if self.step is None:
            return None
        step, self.step = self.step, None
        mine = {
            "stage": self.engine.stage_id,
            "dp": self.engine.grid.data_parallel_id,
            "events": [e for e in self.events if e["step"] == step],
        }
        self.events = []
        everyone: list[dict] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        summary = bubble_summary(
            everyone, self.engine.num_stages, self.engine.gradient_accumulation_steps(), self.engine.module.SCHEDULE
        )
        if dist.get_rank() == 0:
            out = self.output_dir / "timeline"
            out.mkdir(parents=True, exist_ok=True)
            write_chrome_trace(everyone, out / f"step_{step}.trace.json")
            draw_gantt(everyone, out / f"step_{step}.png", f"step {step}: {summary_line(summary)}")
            (out / f"step_{step}.bubble.json").write_text(json.dumps(summary, indent=1))
            print(f"step {step} timeline in {out}: {summary_line(summary)}", flush=True)
        return summary


def bubble_summary(ranks: list[dict], stages: int, num_micro_batches: int, schedule: str = "1f1b") -> dict:
    """Per pipeline rank (`stages` of them): the fraction of the step's wall time not spent in forward or backward
    compute, beside the schedule's theory."""
    start = min(e["start"] for r in ranks for e in r["events"])
    end = max(e["end"] for r in ranks for e in r["events"])
    measured = {}
    for stage in range(stages):
        replica = next(r for r in ranks if r["stage"] == stage and r["dp"] == 0)
        busy = sum(e["end"] - e["start"] for e in replica["events"] if e["name"] in COMPUTE)
        measured[stage] = 1 - busy / (end - start)
    return {
        "stages": stages,
        "schedule": schedule,
        "micro_batches": num_micro_batches,
        "step_seconds": end - start,
        "theory": bubble_theory(schedule, stages, num_micro_batches),
        "measured": measured,
    }


def summary_line(summary: dict) -> str:
    schedule = summary.get("schedule", "1f1b")
    where = "stage" if schedule == "1f1b" else "rank"
    measured = ", ".join(f"{where} {s} {b:.1%}" for s, b in summary["measured"].items())
    return f"bubble {measured} ({SCHEDULE_NAMES[schedule]} theory {summary['theory']:.1%})"


def write_chrome_trace(ranks: list[dict], path: Path) -> None:
    events = []
    for r in ranks:
        events.append({"ph": "M", "name": "process_name", "pid": r["stage"], "args": {"name": f"stage {r['stage']}"}})
        for e in r["events"]:
            args = {k: v for k, v in e.items() if k not in ("name", "start", "end", "step")}
            events.append(
                {
                    "ph": "X",
                    "name": e["name"],
                    "pid": r["stage"],
                    "tid": r["dp"],
                    "ts": e["start"] * 1e6,
                    "dur": (e["end"] - e["start"]) * 1e6,
                    "args": args,
                }
            )
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def draw_gantt(ranks: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    stages = sorted({r["stage"] for r in ranks})
    fig, ax = plt.subplots(figsize=(13, 1.4 + 0.7 * len(stages)))
    for r in ranks:
        if r["dp"] != 0:
            continue
        for e in r["events"]:
            ax.broken_barh(
                [(e["start"] * 1e3, (e["end"] - e["start"]) * 1e3)],
                (r["stage"] - 0.4, 0.8),
                color=COLOURS.get(e["name"], "black"),
                hatch="//" if e.get("phase") == 1 else None,  # DualPipeV's phase 1: the stages back towards rank 0
            )
            if e["name"] in COMPUTE and "buffer_id" in e:
                ax.text(
                    (e["start"] + e["end"]) / 2 * 1e3,
                    r["stage"],
                    ("F" if e["name"] == "ForwardPass" else "B") + (str(e["phase"]) if "phase" in e else ""),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white",
                )
    ax.set_yticks(stages, [f"rank {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began")
    ax.set_title(title, fontsize=9)
    ax.legend(
        handles=[Patch(color=c, label=n) for n, c in COLOURS.items()],
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
