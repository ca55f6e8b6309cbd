"""Known-harmless library messages, filtered where each is emitted (its logger, or its warning by message, category
and module), installed once when the `train` package is imported: before any `python -m train.X` imports DeepSpeed.
Every other warning and log line is shown as the library emits it.

* DeepSpeed 0.19.8 (accelerator/real_accelerator.py), its logger: "Setting accelerator to CPU. If you have GPU or
  other accelerator, we were unable to detect it." Its auto-detection found no GPU on a machine without one; every
  command outside launch.sh printed it (launch.sh sets DS_ACCELERATOR=cpu, DeepSpeed's own way to say so).
* transformers 5.24 (modeling_utils.py), FutureWarning: "`is_gradient_checkpointing` is deprecated ...". peft
  0.21.2 reads the old property in `get_peft_model` and `PeftModel`: every LoRA run and adapter export printed it.
* bitsandbytes 0.50.2 (backends/cpu/ops.py), its logger: "Failed to load CPU gemm_4bit_forward from
  kernels-community: ...". An optional fused CPU kernel from the hub (the `kernels` package); bitsandbytes uses its
  own CPU path without it.
"""

import logging
import warnings


class DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_library_noise() -> None:
    # Loggers by name: logging.getLogger returns the object the library adds its handlers to later.
    logging.getLogger("DeepSpeed").addFilter(DropMessages("Setting accelerator to CPU."))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community")
    )
    warnings.filterwarnings(
        "ignore",
        message="`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
