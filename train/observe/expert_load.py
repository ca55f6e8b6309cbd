"""Expert load of a mixture of experts: how many tokens each MoE layer's router sent to each expert.

The pipeline counts the picks of its training forwards (`models/expert_load.py`). Each rank holds the rows of its
own MoE layers; one all-reduce of the [MoE layers, E] int64 table over the whole world sums the stages' rows and the
data-parallel replicas' batches into the global batch's. The counts stay on the device between those reductions,
which happen only where something is logged: in `StepMeter.metrics` on a logged step (the compact metrics, beside
the other collectives of that call) and at an evaluation (the table since the previous one). Every rank makes both
calls at the same points of the loop; a dense model has no `ExpertLoad` and makes no collective.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from models.expert_load import ExpertLayers, StagePicks
from train.distributed.setup import say

EXPERT_LOAD_FILE = "expert_load.jsonl"  # in the output folder; rewound on resume with metrics.jsonl (metrics.py)


def load_summary(counts: list[list[int]], layers: tuple[int, ...]) -> dict:
    """The compact metrics of one step's [MoE layers][E] picks. A layer's imbalance is its busiest expert's picks
    over the mean (picks / E): 1.0 is perfect balance, E / top_k a router that sends every token to the same top_k
    experts. `expert_load_max` is the worst layer's (`expert_load_max_layer`, its decoder index),
    `expert_load_mean` the mean over layers, `expert_load_idle` the experts (over all layers) that got no token."""
    ratios = [imbalance(row) for row in counts]
    worst = max(range(len(ratios)), key=ratios.__getitem__)
    return {
        "expert_load_max": ratios[worst],
        "expert_load_max_layer": layers[worst],
        "expert_load_mean": sum(ratios) / len(ratios),
        "expert_load_idle": sum(row.count(0) for row in counts),
    }


def imbalance(row: list[int]) -> float:
    """The busiest expert's picks over the mean per expert (1.0 when the layer saw no token)."""
    return max(row) * len(row) / sum(row) if sum(row) else 1.0


def layer_rows(counts: list[list[int]], layers: tuple[int, ...]) -> list[dict]:
    """The evaluation table: per MoE layer its picks per expert, their total (tokens x top_k), the least and most
    loaded expert's share, the imbalance and the dead experts (no token since the previous evaluation)."""
    rows = []
    for layer, row in zip(layers, counts, strict=True):
        picks = sum(row)
        rows.append(
            {
                "layer": layer,
                "counts": row,
                "picks": picks,
                "min_share": min(row) / picks if picks else 0.0,
                "max_share": max(row) / picks if picks else 0.0,
                "imbalance": imbalance(row),
                "dead": row.count(0),
            }
        )
    return rows


def table_text(rows: list[dict], *, first_step: int, step: int, experts: ExpertLayers) -> str:
    """The evaluation table as the console prints it: one line per MoE layer (the counts per expert are in the file)."""
    collapsed = experts.num_experts / experts.top_k
    lines = [
        f"expert load, steps {first_step}-{step} ({experts.num_experts} experts, top-{experts.top_k}; max/mean 1.00 is "
        f"balanced, {collapsed:.2f} every token on the same {experts.top_k}; shares of the layer's picks):",
        f"  {'layer':>5} {'picks':>14} {'least':>7} {'most':>7} {'max/mean':>8} {'dead':>5}",
    ]
    for row in rows:
        lines.append(
            f"  {row['layer']:>5} {row['picks']:>14,} {row['min_share']:>7.2%} {row['max_share']:>7.2%} "
            f"{row['imbalance']:>8.2f} {row['dead']:>5}"
        )
    return "\n".join(lines)


class ExpertLoad:
    """The expert load of one run: the compact metrics of a logged step, the per-layer table at evaluations (printed,
    and written by the rank that writes the metrics to `EXPERT_LOAD_FILE`, one line per evaluation)."""

    def __init__(self, picks: StagePicks, *, output_dir: Path, writes: bool, resume_step: int = 0, counts: bool = True):
        """`counts`: False on a tensor-parallel rank but its slice group's first, whose replicated routers made the
        same picks (counted once)."""
        assert picks.experts is not None, "a dense model has no expert load"
        self.picks, self.experts, self.counts = picks, picks.experts, counts
        self.device = get_accelerator().current_device_name()  # NCCL reduces device tensors only
        self.step = self._zeros()  # this step's picks (this rank's rows)
        self.window = self._zeros()  # since the previous evaluation
        self.first_step = resume_step + 1  # the first step of the window
        self.path = output_dir / EXPERT_LOAD_FILE if writes else None

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.experts.layers), self.experts.num_experts, dtype=torch.int64, device=self.device)

    def _fold(self) -> None:
        """Move what the layers counted since the last fold into this step's and the window's tables."""
        picks = self.picks.take(self.device)
        self.step += picks
        self.window += picks

    def begin_step(self) -> None:
        self._fold()  # nothing is counted between steps; the previous step's picks are in the window either way
        self.step.zero_()

    def _global(self, table: torch.Tensor) -> list[list[int]]:
        """A table summed over every rank: all stages' rows, all replicas' batches (a collective)."""
        total = table.clone() if self.counts else torch.zeros_like(table)
        dist.all_reduce(total)
        return total.tolist()

    def step_metrics(self) -> dict:
        """The step's compact metrics over its global batch (a collective)."""
        self._fold()
        return load_summary(self._global(self.step), self.experts.layers)

    def evaluation(self, step: int) -> None:
        """The table of the steps since the previous evaluation, printed and written (a collective)."""
        self._fold()
        rows = layer_rows(self._global(self.window), self.experts.layers)
        self.window.zero_()
        say(table_text(rows, first_step=self.first_step, step=step, experts=self.experts))
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "first_step": self.first_step, "layers": rows}) + "\n")
        self.first_step = step + 1


def expert_load_of(engine, *, output_dir: Path, writes: bool, start_step: int) -> ExpertLoad | None:
    """A mixture of experts' expert load, counted by the pipeline of `engine`; None for a dense model (nothing
    counted, no collective)."""
    picks = engine.module.expert_picks
    if picks.experts is None:
        return None
    counts = engine.grid.get_slice_parallel_rank() == 0  # tensor-parallel ranks route alike: counted once
    return ExpertLoad(picks, output_dir=output_dir, writes=writes, resume_step=start_step, counts=counts)
