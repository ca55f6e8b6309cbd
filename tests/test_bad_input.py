"""Bad input: one clear error line, exit code 2, before any rank starts working."""

import json
import os

import pytest

from tests.helpers import REPO, free_port, launch, run_process_group, write_ds_config
from train.preflight import main as preflight


@pytest.fixture
def good(tmp_path, corpus, tokenizer_dir):
    return {"config": write_ds_config(tmp_path / "ds.json"), "data": corpus, "tokenizer": tokenizer_dir}


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


def test_seq_len_above_the_sliding_window(capsys, good, tmp_path):
    config = model_json(tmp_path, model_type="mistral", sliding_window=64)
    line = run_preflight(
        capsys,
        2,
        "--model-config",
        config,
        "--seq-len",
        128,
        "--deepspeed_config",
        good["config"],
        "--data",
        good["data"],
    )
    assert "--seq-len 128 exceeds the model's 64-token sliding attention window" in line


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


@pytest.mark.ranks
def test_launch_stops_before_starting_ranks(good, tmp_path):
    proc = launch(["--deepspeed_config", tmp_path / "nope.json", "--data", good["data"]], ranks=2, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read DeepSpeed config")
    assert "spawned" not in proc.stdout + proc.stderr


@pytest.mark.ranks
def test_ranks_launched_directly_fail_together_with_one_line(good, tmp_path):
    """Without launch.sh's preflight, the ranks detect the bad column and all exit, none hangs.

    The ranks also find the lock of a JIT build of DeepSpeed's shared-memory all-reduce that never ends
    (as a killed build leaves it): CPU ranks must not build or wait for that op, training does not use it."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "In the beginning"}) + "\n")
    (tmp_path / "ext" / "deepspeed_shm_comm").mkdir(parents=True)
    (tmp_path / "ext" / "deepspeed_shm_comm" / "lock").touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = run_process_group(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            free_port(),
            "--module",
            "train.main",
            "--data",
            tmp_path / "c.jsonl",
            "--deepspeed_config",
            good["config"],
            "--output-dir",
            tmp_path / "run",
        ],
        env,
        timeout=180,
    )
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "has no column 'text'" in errors[0], proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.ranks
def test_corpus_smaller_than_one_global_batch_stops_every_rank(good, tmp_path):
    """Only the ranks know how many blocks the data packs into: every rank stops with the same line, no traceback."""
    (tmp_path / "small.jsonl").write_text(
        "".join(json.dumps({"text": "In the beginning God created"}) + "\n" for _ in range(40))
    )
    proc = launch(
        [
            "--data",
            tmp_path / "small.jsonl",
            "--tokenizer",
            good["tokenizer"],
            "--seq-len",
            32,
            "--deepspeed_config",
            good["config"],
            "--output-dir",
            tmp_path / "run",
            "--wandb-mode",
            "disabled",
            "--data-cache-dir",
            tmp_path / "cache",
        ],
        ranks=2,
        check=False,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "do not fill one global batch" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


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
    from train.distributed import _drop_arch_suffixes_deepspeed_cannot_parse

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
def _file(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _tiny_gpt2(path, vocab_size=100, **config_changes):
    """A save_pretrained GPT-2 folder; `config_changes` are written into its config.json afterwards."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=256, bos_token_id=0, eos_token_id=0
        )
    ).save_pretrained(path)
    if config_changes:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **config_changes}))
    return path


def _tokenizer_without_eos(path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "in": 1, "the": 2, "beginning": 3}
    PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]"
    ).save_pretrained(path)
    return path


def _dir(path):
    path.mkdir(parents=True)
    return path


INVENTORY = [
    ("flag-type", lambda t, g: ["--seq-len", "abc"], "argument --seq-len: invalid int value"),
    ("flag-unknown", lambda t, g: ["--sequence-length", 128], "unrecognized arguments: --sequence-length"),
    ("flag-range-steps", lambda t, g: ["--train-steps", 0], "--train-steps must be at least 1"),
    ("flag-range-seq-len", lambda t, g: ["--seq-len", -5], "--seq-len must be at least 1"),
    ("flag-range-save-interval", lambda t, g: ["--save-interval", -5], "--save-interval must be at least 0"),
    ("flag-range-seed", lambda t, g: ["--seed", -1], "--seed must be at least 0"),
    ("flag-range-vocab-size", lambda t, g: ["--vocab-size", 100], "--vocab-size must be at least 257"),
    ("flag-range-peak-tflops", lambda t, g: ["--peak-tflops", 0], "--peak-tflops must be positive"),
    ("flag-range-val-fraction", lambda t, g: ["--val-fraction", 1.5], "--val-fraction must be between 0 and 1"),
    ("flag-range-checkpointing", lambda t, g: ["--activation-checkpoint-interval", -1], "must be 0 (off) or positive"),
    ("flag-partition-method", lambda t, g: ["--partition-method", "best"], "--partition-method 'best'"),
    ("flag-stages-zero", lambda t, g: ["--pipeline-stages", 0], "--pipeline-stages must be at least 1"),
    ("ds-not-object", lambda t, g: ["--deepspeed_config", _file(t / "l.json", "[1, 2]")], "must be a JSON object"),
    (
        "ds-no-micro-batch",
        lambda t, g: ["--deepspeed_config", _file(t / "m.json", '{"train_batch_size": 8}')],
        "must set train_micro_batch_size_per_gpu",
    ),
    (
        "ds-two-precisions",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(t / "p.json", bf16={"enabled": True}, fp16={"enabled": True}),
        ],
        "enables both bf16 and fp16",
    ),
    (
        "ds-batch-size-string",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "b.json", train_batch="8")],
        '"train_batch_size" must be a whole number, not "8"',
    ),
    (
        "ds-section-not-object",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "f.json", bf16=True)],
        '"bf16" must be an object',
    ),
    (
        "ds-zero-stage-string",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "z.json", zero_optimization={"stage": "1"})],
        '"zero_optimization.stage" must be a whole number',
    ),
    (
        "ds-unknown-optimizer",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(t / "o.json", optimizer={"type": "AdamWW", "params": {"lr": 1e-3}}),
        ],
        "unknown optimizer type 'AdamWW'",
    ),
    (
        "ds-unknown-scheduler",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "s.json", scheduler={"type": "Cosine", "params": {}})],
        "unknown scheduler type 'Cosine'",
    ),
    (
        "ds-wall-clock",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "w.json", wall_clock_breakdown=True)],
        "wall_clock_breakdown crashes DeepSpeed",
    ),
    ("model-config-bad-json", lambda t, g: ["--model-config", _file(t / "c.json", "{'n_layer': 4}")], "cannot read"),
    (
        "model-config-no-type",
        lambda t, g: ["--model-config", _file(t / "c.json", '{"n_layer": 4}')],
        "has no model_type",
    ),
    (
        "model-mistyped-folder",
        lambda t, g: ["--model", "runs/my-modle"],
        "--model runs/my-modle: no such local folder, and the Hugging Face Hub did not serve it",
    ),
    ("model-missing-path", lambda t, g: ["--model", t / "nowhere" / "model"], "no such folder; check the path"),
    ("model-no-config", lambda t, g: ["--model", _dir(t / "empty")], "has no config.json"),
    (
        "model-no-safetensors",
        lambda t, g: ["--model", _file(t / "m" / "config.json", '{"model_type": "gpt2"}').parent],
        "has no model.safetensors",
    ),
    (
        "model-weights-do-not-fit-config",
        lambda t, g: ["--model", _tiny_gpt2(t / "m", n_embd=64)],
        "the weights and the config do not belong together",
    ),
    (
        "model-tokenizer-larger-than-embedding",
        lambda t, g: ["--model", _tiny_gpt2(t / "m"), "--tokenizer", g["tokenizer"]],
        "512 tokens but the model's embedding only 100",
    ),
    ("tokenizer-without-eos", lambda t, g: ["--tokenizer", _tokenizer_without_eos(t / "tok")], "has no EOS token"),
    ("tokenizer-missing-folder", lambda t, g: ["--tokenizer", t / "no" / "tokenizer"], "--tokenizer"),
    (
        "tokenizer-hub-unreachable",
        lambda t, g: ["--tokenizer", "some-org/some-tokenizer"],
        "the Hugging Face Hub did not serve it",
    ),
    ("tokenizer-empty-folder", lambda t, g: ["--tokenizer", _dir(t / "tok")], "cannot load a tokenizer from it"),
    ("data-glob-no-match", lambda t, g: ["--data", t / "*.jsonl"], "no data files match"),
    ("data-folder-empty", lambda t, g: ["--data", _dir(t / "d")], "holds no"),
    ("data-extension", lambda t, g: ["--data", _file(t / "x.docx", "x")], "cannot read"),
    (
        "data-malformed-json",
        lambda t, g: ["--data", _file(t / "b.jsonl", '{"text": "a"}\n{"text": "b",, }\n')],
        "fix or remove the malformed record",
    ),
    ("data-weights-partial", lambda t, g: ["--data", f"{g['data']}:0.5", g["data"]], "give every --data entry"),
    ("data-weight-not-positive", lambda t, g: ["--data", f"{g['data']}:-1"], "a mixing weight must be positive"),
    (
        "data-hub-unreachable",
        lambda t, g: ["--data", "wikitext#wikitext-2-raw-v1@train"],
        "--data wikitext: no such local folder, and the Hugging Face Hub did not serve it",
    ),
    ("val-data-missing", lambda t, g: ["--val-data", t / "val.jsonl"], "data file not found"),
    ("load-missing-folder", lambda t, g: ["--load", t / "old" / "checkpoints"], "--load"),
    ("load-no-checkpoint", lambda t, g: ["--load", _dir(t / "ck")], "holds no checkpoint"),
    (
        "load-incomplete",
        lambda t, g: ["--load", _file(t / "ck" / "step_5" / "mp_rank_00_model_states.pt", "").parent],
        "is incomplete",
    ),
    ("output-dir-under-a-file", lambda t, g: ["--output-dir", _file(t / "a_file", "") / "run"], "is a file"),
]


@pytest.mark.parametrize("make_args,expected", [r[1:] for r in INVENTORY], ids=[r[0] for r in INVENTORY])
def test_inventory_row_is_one_error_line_before_any_rank(capsys, good, tmp_path, make_args, expected):
    args = make_args(tmp_path, good)
    capsys.readouterr()  # what making the inputs printed (save_pretrained's progress bar)
    defaults = {"--deepspeed_config": good["config"], "--data": good["data"], "--output-dir": tmp_path / "out"}
    given = [str(a) for a in args]
    extra = [str(x) for flag, value in defaults.items() if flag not in given for x in (flag, value)]
    before = set(tmp_path.rglob("*"))
    line = run_preflight(capsys, 2, *given, *extra, "--data-cache-dir", tmp_path / "cache")
    assert expected in line, line
    assert set(tmp_path.rglob("*")) == before, "the preflight wrote something"


def test_every_inventory_row_is_documented():
    documented = (REPO / "docs" / "inputs.md").read_text()
    assert all(f"`{row}`" in documented for row, _, _ in INVENTORY)


@pytest.mark.parametrize(
    "flag,name",
    [("--model", "runs/my-modle"), ("--tokenizer", "some-org/tok"), ("--data", "wikitext#wikitext-2-raw-v1@train")],
)
@pytest.mark.ranks
def test_hub_names_fail_within_seconds_when_the_hub_is_unreachable(good, tmp_path, flag, name):
    """Not in offline mode: the preflight asks the hub once (5 s at most) instead of the libraries' ~20 s of
    retries. This machine has no route to the hub, like a compute node without internet."""
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf_home"))  # an empty cache
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.preflight",
            "--world-size",
            "2",
            flag,
            name,
            "--deepspeed_config",
            str(good["config"]),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "no such local folder, and the Hugging Face Hub did not serve it" in errors[0]
    assert "Traceback" not in proc.stderr and seconds < 20, seconds  # Python start-up and imports: ~5 s here


def test_config_json_without_special_tokens_makes_no_warning(capsys, good, tmp_path):
    """A small-vocabulary GPT-2 config.json without bos/eos ids: transformers' default 50256 used to make every
    rank warn 'bos_token_id must be None or an integer within the vocabulary'."""
    config = _file(
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


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"NUM_GPUS": "two"}, "NUM_GPUS 'two' must be a whole number"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT 'http' is not a port number"),
        ({"HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE /nonexistent/hostfile does not exist"),
        ({"HOSTFILE": "BAD"}, "every line must read 'hostname slots=N'"),
        ({"MASTER_PORT": "BUSY"}, "is in use"),
    ],
    ids=[
        "env-num-gpus",
        "env-master-port-type",
        "env-hostfile-missing",
        "env-hostfile-malformed",
        "env-master-port-in-use",
    ],
)
@pytest.mark.ranks
def test_launcher_environment_rows(good, tmp_path, env, expected):
    import socket

    env = dict(env)
    if env.get("HOSTFILE") == "BAD":
        env["HOSTFILE"] = str(_file(tmp_path / "hosts", "node0 slots=2\nnode1\n"))
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        if env.get("MASTER_PORT") == "BUSY":
            env["MASTER_PORT"] = str(busy.getsockname()[1])
        proc = launch(
            ["--deepspeed_config", good["config"], "--data", good["data"], "--output-dir", tmp_path / "out"],
            ranks=2,
            check=False,
            env=env,
        )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "spawned" not in proc.stdout + proc.stderr
