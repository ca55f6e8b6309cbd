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


# How each filtered message begins (the docstring says why each is harmless); tests assert no run prints them.
ACCELERATOR_CPU = "Setting accelerator to CPU."
KERNELS_GEMM_4BIT = "Failed to load CPU gemm_4bit_forward from kernels-community"
GRADIENT_CHECKPOINTING_DEPRECATED = "`is_gradient_checkpointing` is deprecated"
FILTERED = (ACCELERATOR_CPU, KERNELS_GEMM_4BIT, GRADIENT_CHECKPOINTING_DEPRECATED)


def quiet_known_library_noise() -> None:
    # Loggers by name: logging.getLogger returns the object the library adds its handlers to later.
    logging.getLogger("DeepSpeed").addFilter(DropMessages(ACCELERATOR_CPU))
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropMessages(KERNELS_GEMM_4BIT))
    warnings.filterwarnings(
        "ignore",
        message=GRADIENT_CHECKPOINTING_DEPRECATED,
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
