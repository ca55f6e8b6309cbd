"""The known-harmless library messages (train/observe/quiet.py) are dropped where emitted, and nothing else is."""

import logging
import warnings

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

import train  # noqa: F401 (installs the filters, as every `python -m train.X` does)
from tests.helpers import tiny_llama


def record(logger: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(logger, logging.WARNING, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    "logger, message",
    [
        ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please"),
    ],
)
def test_the_named_log_lines_are_dropped_by_their_loggers_and_others_are_kept(logger, message):
    assert not logging.getLogger(logger).filter(record(logger, message))
    assert logging.getLogger(logger).filter(record(logger, "Setting ds_accelerator to cuda (auto detect)"))


def test_transformers_deprecation_read_by_peft_is_silent_and_other_future_warnings_are_not():
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(**{k: v for k, v in tiny_llama().items() if k != "model_type"})
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # below the filters train installed, which catch_warnings keeps
        import train.observe.quiet

        train.observe.quiet.quiet_known_library_noise()
        assert model.is_gradient_checkpointing is False  # what peft 0.21.2 reads
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another deprecation"]
