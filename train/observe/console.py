"""What a run prints besides the metrics: the model line, each rank's line about its layers, and one DeepSpeed
warning dropped."""

import logging

from deepspeed.utils import logger as ds_logger

from models.architecture import ranges_text
from train.config.ds_config import BatchLayout


class DropMessage(logging.Filter):
    """Drops one known-harmless library message, leaving every other warning visible."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# deepspeed.initialize reads the LR before the scheduler's first step and warns about it.
ds_logger.addFilter(DropMessage("Attempting to get learning rate from scheduler before it has started"))


def topology_line(topology: dict) -> str:
    """The layout for the model line: stages x replicas and the layer bounds, or under DualPipeV each rank's two
    stages."""
    line = f"{topology['pipeline_stages']} stages x {topology['data_parallel']} data-parallel"
    if topology.get("tensor_parallel", 1) > 1:
        line += f" x {topology['tensor_parallel']} tensor-parallel"
    if topology["schedule"] == "1f1b":
        return f"{line}, layer bounds {topology['stage_layer_bounds']}"
    held = "; ".join(f"rank {s['stage']} {ranges_text(s['layer_bounds'])}" for s in topology["stages"])
    return f"{line.replace('stages', 'pipeline ranks')}, DualPipeV: layers {held}"


def model_line(record: dict, *, model_type: str, lora: bool, batch: BatchLayout) -> str:
    """The model line of a run's record (`run_config.json`): family, parameters, layout, batch, attention."""
    trains = f" ({record['trainable_parameters']:,} trainable: LoRA)" if lora else ""
    return (
        f"model: {model_type}, {record['parameters']:,} parameters{trains}, "
        f"{topology_line(record['topology'])}, {batch.num_micro_batches} micro-batches of {batch.micro_batch_size}, "
        f"{record['attention']} attention"
    )


def lora_line(rank: int, *, adapted: int, layers: str, trainable: int, held: int) -> str:
    """A rank's line about its adapters: the adapted modules and what trains of what it holds."""
    return (
        f"rank {rank}: LoRA on {adapted} modules of layers {layers}: {trainable:,} trainable of "
        f"{held:,} parameters ({trainable / held:.2%})\n"
    )
