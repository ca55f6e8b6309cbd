"""Bad input: one clear error line, exit code 2, before any rank starts working."""

import json
import os

from tests.helpers import write_ds_config, write_file
from train.preflight import main as preflight


def run_preflight(capsys, world_size: int, *args) -> str:
    code = preflight(["--world-size", str(world_size), *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_deepspeed_config(capsys, good, tmp_path):
    line = run_preflight(capsys, 2, "--deepspeed_config", tmp_path / "nope.json", "--data", good["data"])
    assert "cannot read DeepSpeed config" in line and "nope.json" in line


def test_invalid_deepspeed_json(capsys, good, tmp_path):
    (tmp_path / "bad.json").write_text('{"train_batch_size": 8,, }')
    line = run_preflight(capsys, 2, "--deepspeed_config", tmp_path / "bad.json", "--data", good["data"])
    assert "not valid JSON" in line and "line 1" in line


def test_batch_sizes_that_do_not_multiply_out(capsys, good, tmp_path):
    config = write_ds_config(tmp_path / "b.json", train_batch=10, micro=4)
    line = run_preflight(capsys, 2, "--deepspeed_config", config, "--data", good["data"])
    assert "train_batch_size 10 is not divisible" in line


def test_explicit_accumulation_that_contradicts_the_batch(capsys, good, tmp_path):
    config = write_ds_config(tmp_path / "b.json", train_batch=16, micro=2, gradient_accumulation_steps=2)
    line = run_preflight(capsys, 4, "--deepspeed_config", config, "--data", good["data"])
    assert "train_batch_size 16 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2" in line


def test_world_size_not_divisible_by_stages(capsys, good):
    line = run_preflight(capsys, 3, "--deepspeed_config", good["config"], "--data", good["data"])
    assert "world size 3 is not divisible by --pipeline-stages 2" in line


def test_more_stages_than_layers(capsys, good):
    line = run_preflight(
        capsys, 5, "--pipeline-stages", 5, "--deepspeed_config", good["config"], "--data", good["data"]
    )
    assert "more than the model's 4 decoder layers" in line


def test_zero_stage_2_with_pipeline(capsys, good, tmp_path):
    config = write_ds_config(tmp_path / "z.json", zero_optimization={"stage": 2})
    line = run_preflight(capsys, 2, "--deepspeed_config", config, "--data", good["data"])
    assert "ZeRO stage 2 is incompatible with pipeline parallelism" in line


def test_eval_blocks_under_one_global_batch(capsys, good):
    line = run_preflight(capsys, 2, "--deepspeed_config", good["config"], "--data", good["data"], "--eval-blocks", 3)
    assert "--eval-blocks 3 is under one global batch" in line


def test_seq_len_above_model_positions(capsys, good):
    line = run_preflight(capsys, 2, "--seq-len", 1024, "--deepspeed_config", good["config"], "--data", good["data"])
    assert "--seq-len 1024 exceeds the model's 256 positions" in line


def model_json(tmp_path, **settings):
    path = tmp_path / "model.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "max_position_embeddings": 256,
                **settings,
            }
        )
    )
    return path


def test_unsupported_model_type_lists_the_supported_ones(capsys, good, tmp_path):
    config = model_json(tmp_path, model_type="opt")
    line = run_preflight(
        capsys, 2, "--model-config", config, "--deepspeed_config", good["config"], "--data", good["data"]
    )
    assert "model_type 'opt' is not supported" in line and "llama" in line and "gpt_neox" in line


def test_eager_attention_is_refused(capsys, good, tmp_path):
    config = model_json(tmp_path, model_type="llama", attn_implementation="eager")
    line = run_preflight(
        capsys, 2, "--model-config", config, "--deepspeed_config", good["config"], "--data", good["data"]
    )
    assert "'eager' attention" in line and "sdpa" in line


def test_missing_data_file(capsys, good, tmp_path):
    line = run_preflight(capsys, 2, "--deepspeed_config", good["config"], "--data", tmp_path / "missing.jsonl")
    assert "data file not found" in line and "missing.jsonl" in line


def test_missing_text_column(capsys, good, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "In the beginning"}) + "\n")
    line = run_preflight(capsys, 2, "--deepspeed_config", good["config"], "--data", tmp_path / "c.jsonl")
    assert "has no column 'text'" in line and "--text-column" in line


def test_unknown_preset(capsys, good):
    line = run_preflight(capsys, 2, "--model-config", "gpt5", "--deepspeed_config", good["config"])
    assert "neither a preset" in line


def test_stale_jit_build_lock_is_named(capsys, good, tmp_path, monkeypatch):
    lock = tmp_path / "ext" / "fused_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert preflight(["--world-size", "2", "--deepspeed_config", str(good["config"]), "--data", str(good["data"])]) == 0
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith(f"warning: {lock} is ") and "delete it" in warning


def test_cuda_arch_suffixes_deepspeed_cannot_parse_are_dropped(monkeypatch, capsys):
    """CUDA images set TORCH_CUDA_ARCH_LIST="9.0a"; DeepSpeed 0.19.8's JIT build of FusedAdam crashes on it
    (int("0a"), seen on a lent H200). The sanitised list is one DeepSpeed's own sort accepts."""
    from train.distributed.setup import _drop_arch_suffixes_deepspeed_cannot_parse

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0f+PTX")
    _drop_arch_suffixes_deepspeed_cannot_parse()
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    assert archs == "8.0;9.0 10.0+PTX"
    ccs = archs.replace(" ", ";").split(";")
    assert sorted(ccs, key=lambda cc: tuple(int(part.split("+")[0]) for part in cc.split(".")))  # DeepSpeed's key
    assert "9.0a" in capsys.readouterr().out


# The inventory of inputs (docs/inputs.md): one row per way an input can be bad, checked by the one-process
# preflight that launch.sh runs before any rank. Each row: (id, flags given the good DeepSpeed JSON and data
# and a scratch folder, what the error line must say). Every case also passes --output-dir and --data-cache-dir
# inside the scratch folder, and nothing may be written there.
def test_config_json_without_special_tokens_makes_no_warning(capsys, good, tmp_path):
    """A small-vocabulary GPT-2 config.json without bos/eos ids: transformers' default 50256 used to make every
    rank warn 'bos_token_id must be None or an integer within the vocabulary'."""
    config = write_file(
        tmp_path / "c.json",
        json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 512}),
    )
    assert (
        preflight(
            [
                "--world-size",
                "2",
                "--model-config",
                str(config),
                "--deepspeed_config",
                str(good["config"]),
                "--data",
                str(good["data"]),
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "token_id" not in captured.err + captured.out


def test_an_empty_message_while_the_model_config_loads_is_one_line(capsys, good, monkeypatch):
    """transformers (or any library) raising an exception with an empty message while the model config resolves:
    one `error:` line naming the exception's type, exit 2, no traceback (PIPEGPT_FAULT=empty-error:config)."""
    monkeypatch.setenv("PIPEGPT_FAULT", "empty-error:config")
    line = run_preflight(capsys, 2, "--deepspeed_config", good["config"], "--data", good["data"])
    assert line == "error: ValueError"


def test_4bit_without_lora_and_without_bitsandbytes_are_one_line(capsys, good, tmp_path):
    """`--load-in-4bit` needs LoRA (a 4-bit base cannot train), and bitsandbytes; both are one line before any rank
    (bitsandbytes is hidden from a fresh preflight process, as on a machine without it)."""
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.test_inputs_inventory import _tiny_gpt2

    line = run_preflight(capsys, 2, "--deepspeed_config", good["config"], "--data", good["data"], "--load-in-4bit")
    assert line == "error: --load-in-4bit without --lora-rank: pass --lora-rank R to train LoRA adapters"
    model = _tiny_gpt2(tmp_path / "m", 512)
    hide = (
        "import sys; sys.modules['bitsandbytes'] = None; from train.preflight import main; sys.exit(main(sys.argv[1:]))"
    )
    flags = ["--world-size", "2", "--deepspeed_config", good["config"], "--data", good["data"], "--model", model]
    flags += ["--tokenizer", good["tokenizer"], "--lora-rank", "4", "--load-in-4bit"]
    proc = subprocess.run(
        [sys.executable, "-c", hide, *map(str, flags)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("error: --load-in-4bit needs bitsandbytes") and "pip install bitsandbytes" in errors[0]


def test_commands_without_an_output_folder_end_in_one_line(tmp_path):
    """train.generate on a folder that does not exist, and train.export on one that holds no checkpoint."""
    import subprocess
    import sys

    for command in (["train.generate", tmp_path / "nothing"], ["train.export", tmp_path, "--out", tmp_path / "o"]):
        done = subprocess.run([sys.executable, "-m", *map(str, command)], capture_output=True, text=True)
        lines = (done.stdout + done.stderr).strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (command, lines)
