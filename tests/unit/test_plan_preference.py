"""The planner's reference pass for preference data (train/planning/reference_pass.py): its lines under the plan,
their numbers from the shapes, and nothing printed for the other data formats."""

import pytest
from transformers import CONFIG_MAPPING

from models.architecture import discover
from tests.helpers import ds_config, tiny_llama, write_ds_config
from tests.unit.test_plan import _default_lora
from train.plan import main as plan_main
from train.planning.memory_model import plan_stages
from train.planning.reference_pass import plan_reference_pass

STEPS, GLOBAL, MICRO, SEQ, GPUS = 100, 32, 2, 512, 2


def _plan(tmp_path, capsys, data_format: str) -> list[str]:
    ds = write_ds_config(tmp_path / "ds.json", GLOBAL, MICRO, bf16={"enabled": True})
    args = ["--model-config", "llama-3.2-1b", "--gpus-per-node", GPUS, "--gpu", "H100", "--deepspeed_config", ds]
    args += ["--seq-len", SEQ, "--train-steps", STEPS, "--data-format", data_format]
    assert plan_main([str(a) for a in args]) == 0
    return capsys.readouterr().out.splitlines()


def test_preference_plans_print_the_reference_pass_from_the_shapes(tmp_path, capsys):
    """Llama-3.2-1B (d 2048, 16 layers, 32 heads and 8 key/value heads of 64, SwiGLU 8192, tied 128,256-token
    head) on 2 H100s in bf16: one forward per token is 2 N + 4 L a s FLOPs (a third of models/flops.py's 6 N +
    12 L a s), over a global batch of blocks, at 40% of 2 x 989 TFLOP/s; the table 8 bytes x 2 answers per pair
    of every block of the 100 steps; eval_batch's last stage two bf16 logits, their fp32 copy and log-softmax."""
    d, kv, ff, layers, vocab = 2048, 8 * 64, 8192, 16, 128256
    matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + vocab * d
    forward = (2 * matmul + 4 * layers * d * SEQ) * GLOBAL * SEQ
    seconds = forward / (GPUS * 989e12 * 0.4)
    table = STEPS * GLOBAL * 2 * 8
    eval_bytes = MICRO * SEQ * vocab * (2 * 2 + 4 + 4)
    preference = _plan(tmp_path, capsys, "preference")
    time_line, memory_line = (line for line in preference if line.startswith("reference "))
    assert f"{forward / 1e15:.3g} PFLOP and {seconds:.3g} s per step's blocks at 40% MFU" in time_line
    assert f"if the {STEPS} steps are one epoch, {STEPS * seconds:,.0f} s, 25% of reference + training" in time_line
    assert f"{STEPS * GLOBAL:,} blocks ({STEPS} steps, one epoch) x 2 slots x 8 B = " in memory_line
    assert f"= {table / 2**20:.3g} MiB per pair of the fullest block" in memory_line
    assert f"fp32 log-softmax, {eval_bytes / 2**30:.3g} GiB, below training's " in memory_line
    step = next(line for line in preference if line.startswith("bubble "))
    assert float(step.split("step time at 40% MFU: ")[1].split(" s")[0]) == pytest.approx(3 * seconds, abs=0.006)
    for other in ("text", "prompt-completion", "chat"):
        lines = _plan(tmp_path, capsys, other)
        assert lines == [line for line in preference if not line.startswith("reference ")], other


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_pass_activations_stay_below_trainings_on_the_head_stage(dtype, micro_batches, lora):
    """A tied Llama (vocabulary 4,096) on 2 stages, 32-token blocks: eval_batch's logits (two buffers, fp32 copy,
    log-softmax: 12 bytes a logit in both dtypes) against what training's head stage holds (its logits and fp32
    log-softmax, the loss's 8-byte backward: at least w + 12)."""
    arch = discover(CONFIG_MAPPING["llama"](**tiny_llama(vocab_size=4096, tie_word_embeddings=True)))
    ds = ds_config(2 * micro_batches, 2, bf16={"enabled": dtype == "bf16"})
    adapters = _default_lora(arch) if lora else None
    plans = plan_stages(arch, ds, stages=2, data_parallel=1, seq_len=32, method="flops", adapters=adapters)
    ref = plan_reference_pass(
        arch, ds, plans, data_parallel=1, seq_len=32, train_steps=10, flops_step=3.0, step_time=6.0
    )
    assert ref.eval_bytes == 2 * 32 * 4096 * 12
    assert ref.train_bytes == plans[1].memory["activations"] > ref.eval_bytes
    assert (ref.flops_per_step, ref.seconds_per_step) == (1.0, 2.0)
    assert ref.table_bytes_per_pair == 10 * 2 * micro_batches * 16
