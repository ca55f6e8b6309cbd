"""The pipeline schedules' arithmetic (which stages a rank holds, the fewest micro-batches) and their theory, read
off DeepSpeed's own instruction streams: bubble and micro-batches in flight.

`deepspeed.runtime.pipe.schedule.TrainSchedule` (1F1B) and `DualPipeVSchedule` yield, per pipeline rank, the
instructions its engine executes. Replaying them with unit costs gives what the schedules promise without
running a model:

- the bubble: every stage's forward takes 1, its backward `backward_cost` (2: the weight and the input
  gradient), communication is free but each send meets its receive (a rendezvous, as NCCL's and gloo's p2p
  are); the data dependencies between stages are those sends. The idle share of the makespan, per rank. For 1F1B it is
  (p - 1) / (m + p - 1) whatever the costs; DualPipeV keeps weight gradients inside its backward (DeepSpeed
  0.19.8: no zero-bubble W pass), so its bubble is what interleaving its two phases alone saves.
- the micro-batches in flight: per rank and phase, forwards run less backwards run, at every point of the
  rank's own stream; what the activation memory of a stage is multiplied by.
"""

import functools

from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    CommitP2P,
    DualPipeVSchedule,
    ForwardPass,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
    TrainSchedule,
)

SCHEDULE_NAMES = {"1f1b": "1F1B", "dualpipev": "DualPipeV"}
COMMUNICATION = {  # instruction -> (what travels, towards the next stage (+1) or the previous (-1), sends?)
    SendActivation: ("activation", 1, True),
    RecvActivation: ("activation", -1, False),
    SendGrad: ("gradient", -1, True),
    RecvGrad: ("gradient", 1, False),
}


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "dualpipev" else 1


def fewest_micro_batches(schedule: str, ranks: int) -> int:
    """The fewest micro-batches a step (or a forward-only pass) of `schedule` runs on `ranks` pipeline ranks."""
    return 2 * ranks if schedule == "dualpipev" else 1


def rank_layer_ranges(bounds: list[int], ranks: int, schedule: str) -> list[list[tuple[int, int]]]:
    """Per pipeline rank, [start, stop) of each stage it holds, from the bounds of all `ranks x stages_per_rank`
    stages: stage r under 1F1B; stages r (phase 0) and 2 x ranks - 1 - r (phase 1) under DualPipeV."""
    held = [[r, 2 * ranks - 1 - r] if schedule == "dualpipev" else [r] for r in range(ranks)]
    return [[(int(bounds[s]), int(bounds[s + 1])) for s in stages] for stages in held]


def instruction_streams(schedule: str, ranks: int, micro_batches: int) -> list[list]:
    """Per pipeline rank, the instructions DeepSpeed's schedule gives its engine, in order."""
    cls = DualPipeVSchedule if schedule == "dualpipev" else TrainSchedule
    return [
        [cmd for step in cls(micro_batches=micro_batches, stages=ranks, stage_id=rank).steps() for cmd in step]
        for rank in range(ranks)
    ]


@functools.lru_cache
def compute_streams(schedule: str, ranks: int, micro_batches: int) -> tuple[list[tuple[str, int]], ...]:
    """Per pipeline rank, its forward ("F") and backward ("B") passes in order, each with its phase (0 under 1F1B);
    cached: the planner reads it once per rank."""
    return tuple(
        [("F" if isinstance(cmd, ForwardPass) else "B", phase_of(cmd)) for cmd in stream if is_compute(cmd)]
        for stream in instruction_streams(schedule, ranks, micro_batches)
    )


def is_compute(cmd) -> bool:
    return isinstance(cmd, ForwardPass | BackwardPass)


def phase_of(cmd) -> int:
    return cmd.kwargs.get("phase", 0)


def peer_of(cmd, rank: int) -> tuple[str, int, int, int]:
    """(what, phase, sender, receiver) of a send or receive: DualPipeV's phase 1 flows towards rank 0."""
    what, towards, sends = COMMUNICATION[type(cmd)]
    phase = phase_of(cmd)
    other = rank + (towards if phase == 0 else -towards)
    return (what, phase, rank, other) if sends else (what, phase, other, rank)


@functools.lru_cache
def simulated_bubble(schedule: str, ranks: int, micro_batches: int, backward_cost: float = 2.0) -> list[float]:
    """Per rank, the idle share of the step when the schedule's passes take unit costs (module docstring).

    Communication is free but a rendezvous: an operation completes when both sides have posted it. 1F1B's sends and
    receives block where they stand; DualPipeV queues them and posts them at its next `CommitP2P`, which waits
    for all of them."""
    streams = instruction_streams(schedule, ranks, micro_batches)
    clock, position, busy = [0.0] * ranks, [0] * ranks, [0.0] * ranks
    pending: list[list[tuple]] = [[] for _ in range(ranks)]  # queued (DualPipeV) operations, by match key
    posted: dict[tuple, float] = {}  # match key -> when its side reached the commit that posts it
    sequence: dict[tuple, int] = {}
    matches: dict[tuple[int, int], tuple] = {}  # (rank, position) -> its operation's match key

    def key(cmd, rank: int) -> tuple:
        link = peer_of(cmd, rank)
        side = (link, rank)
        sequence[side] = sequence.get(side, 0) + 1
        return (*link, sequence[side])  # the k-th send of a link meets the k-th receive

    def commit(rank: int, ops: list[tuple]) -> bool:
        """Post `ops` at this rank's clock; True (and the clock moved on) when the peers posted theirs."""
        for op in ops:
            posted.setdefault((op, rank), clock[rank])
        peers = [(op, op[3] if op[2] == rank else op[2]) for op in ops]
        if any(peer not in posted for peer in peers):
            return False
        clock[rank] = max([clock[rank]] + [posted[peer] for peer in peers])
        return True

    while any(position[r] < len(streams[r]) for r in range(ranks)):
        progressed = False
        for rank in range(ranks):
            while position[rank] < len(streams[rank]):
                cmd = streams[rank][position[rank]]
                if is_compute(cmd):
                    cost = 1.0 if isinstance(cmd, ForwardPass) else backward_cost
                    clock[rank] += cost
                    busy[rank] += cost
                elif type(cmd) in COMMUNICATION:
                    if (rank, position[rank]) not in matches:
                        matches[rank, position[rank]] = key(cmd, rank)
                    match = matches[rank, position[rank]]
                    if schedule == "dualpipev":
                        pending[rank].append(match)
                    elif not commit(rank, [match]):
                        break
                elif isinstance(cmd, CommitP2P):
                    if not commit(rank, pending[rank]):
                        break
                    pending[rank] = []
                position[rank] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"the {schedule} schedule deadlocks for {ranks} ranks and {micro_batches} micro-batches")
    makespan = max(clock)
    return [1 - b / makespan for b in busy]


def bubble_theory(schedule: str, ranks: int, micro_batches: int) -> float:
    """The schedule's bubble: 1F1B's (p - 1) / (m + p - 1); DualPipeV's from its instruction streams (backward =
    2 forwards), the largest over its ranks."""
    if schedule == "1f1b" or ranks == 1:
        return (ranks - 1) / (micro_batches + ranks - 1)
    return max(simulated_bubble(schedule, ranks, micro_batches))


def peak_in_flight(schedule: str, ranks: int, micro_batches: int, rank: int, phase_bytes: list[float]) -> float:
    """The most activation bytes `rank` holds at once: over its stream, the largest sum over its phases of the
    micro-batches in flight (forwards run less backwards run) times `phase_bytes[phase]`, one micro-batch's."""
    in_flight, peak = [0] * len(phase_bytes), 0.0
    for kind, phase in compute_streams(schedule, ranks, micro_batches)[rank]:
        in_flight[phase] += 1 if kind == "F" else -1
        peak = max(peak, sum(n * b for n, b in zip(in_flight, phase_bytes, strict=True)))
    return peak
