"""Bad input: one clear error line, exit code 2, before any rank starts working. The inventory of docs/inputs.md
(`INVENTORY`): every row one error line from the preflight, and every row documented."""

import json
import os

import pytest

from tests.helpers import CHATML, REPO, run_preflight, tiny_gpt2, write_ds_config, write_file, write_json
from train.config.args import DEFAULT_MODEL_CONFIG
from train.preflight import main as preflight


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


def test_unsupported_model_type_says_why_and_where_the_supported_ones_are(capsys, good, tmp_path):
    config = model_json(tmp_path, model_type="opt")
    line = run_preflight(
        capsys, 2, "--model-config", config, "--deepspeed_config", good["config"], "--data", good["data"]
    )
    assert "model_type 'opt' is not supported: its base model holds 0 lists of layers" in line  # OPT's are nested
    assert "docs/families.md" in line


def test_a_router_loss_coefficient_for_a_model_without_a_router_loss_is_refused(capsys, good, tmp_path):
    """transformers' DeepSeek-V3 (and a dense model) adds no router loss: the flag would change nothing."""
    config = model_json(tmp_path, model_type="deepseek_v3", n_routed_experts=4, num_experts_per_tok=2)
    flags = ["--model-config", config, "--router-aux-loss-coef", "0.01"]
    line = run_preflight(capsys, 2, *flags, "--deepspeed_config", good["config"], "--data", good["data"])
    assert "--router-aux-loss-coef: transformers' deepseek_v3 adds no router loss" in line


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


def _chatml(tmp):
    return write_file(tmp / "chatml.jinja", CHATML)


def _full_checkpoint(root, model_type: str | None = None, **trained_with):
    """A complete (manifest-verified) checkpoint tag of a full-training run, as far as the preflight reads it:
    the default model (or `model_type`'s preset), and what else it was trained with (seq_len, data_format)."""
    from models.presets import preset_config

    config = preset_config(DEFAULT_MODEL_CONFIG if model_type in (None, "gpt2") else model_type).to_dict()
    manifest = {"step": 1, "layout": {"pipeline_stages": 2, "data_parallel": 1}, "model_config": config}
    write_file(root / "step_1" / "pipegpt_manifest.json", json.dumps({**manifest, **trained_with, "files": {}}))
    write_file(root / "latest", "step_1")
    return root


def _turn(role: str, text: str) -> dict:
    """A turn whose content is a list of text parts (the OpenAI form)."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _truncated(path):
    """`path` cut to half its bytes, as an interrupted copy or download leaves it."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return path


def _empty_manifest(root):
    write_file(root / "step_1" / "pipegpt_manifest.json", "")
    write_file(root / "latest", "step_1")
    return root


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
    ("flag-range-dist-timeout", lambda t, g: ["--dist-timeout", 0], "--dist-timeout must be at least 1"),
    ("flag-partition-method", lambda t, g: ["--partition-method", "best"], "--partition-method 'best'"),
    (
        "flag-compile-backend",
        lambda t, g: ["--compile", "--compile-backend", "tensorrt_nope"],
        "--compile-backend 'tensorrt_nope' is not a torch.compile backend",
    ),
    ("flag-stages-zero", lambda t, g: ["--pipeline-stages", 0], "--pipeline-stages must be at least 1"),
    ("flag-schedule", lambda t, g: ["--schedule", "zero-bubble"], "argument --schedule: invalid choice"),
    (
        "flag-streaming-shuffled",
        lambda t, g: ["--streaming", "--data-order", "shuffled"],
        "--streaming reads its blocks in order",
    ),
    (
        "dualpipev-micro-batches",
        lambda t, g: ["--schedule", "dualpipev", "--deepspeed_config", write_ds_config(t / "d.json", train_batch=6)],
        "--schedule dualpipev needs at least 2 x 2 = 4 micro-batches per step, the DeepSpeed config gives 3",
    ),
    (
        "dualpipev-one-rank",
        lambda t, g: ["--schedule", "dualpipev", "--pipeline-stages", 1],
        "--schedule dualpipev needs --pipeline-stages 2 or more",
    ),
    (
        "dualpipev-stages-over-layers",
        lambda t, g: ["--schedule", "dualpipev", "--model-config", write_json(t / "m.json", tiny_gpt2(n_layer=3))],
        "cuts the model into 2 x 2 = 4 stages, more than its 3 decoder layers",
    ),
    (
        "dualpipev-dynamic-shape",
        lambda t, g: [
            "--schedule",
            "dualpipev",
            "--deepspeed_config",
            write_ds_config(t / "s.json", pipeline={"dynamic_shape": True}),
        ],
        'set "pipeline": {"dynamic_shape": false}',
    ),
    ("ds-not-object", lambda t, g: ["--deepspeed_config", write_file(t / "l.json", "[1, 2]")], "must be a JSON object"),
    (
        "ds-no-micro-batch",
        lambda t, g: ["--deepspeed_config", write_file(t / "m.json", '{"train_batch_size": 8}')],
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
    (
        "ds-unknown-key",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "k.json", seed=1)],
        'DeepSpeed 0.19.8 does not know "seed"',
    ),
    (
        "ds-unknown-nested-key",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "n.json", checkpoint={"load_universl": True})],
        'does not know "checkpoint.load_universl"; did you mean "load_universal"?',
    ),
    (
        "ds-compile-enabled",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "c.json", compile={"enabled": True})],
        '"compile.enabled": Extra inputs are not permitted',
    ),
    (
        "ds-ill-typed-key",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(t / "i.json", zero_optimization={"stage": 1, "reduce_bucket_size": "big"}),
        ],
        '"zero_optimization.reduce_bucket_size": Input should be a valid integer',
    ),
    (
        "ds-ill-typed-scalar",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(t / "a.json", activation_checkpointing={"partition_activations": "yes"}),
        ],
        '"activation_checkpointing.partition_activations" must be true or false',
    ),
    (
        "ds-optimizer-param-string",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(t / "o.json", optimizer={"type": "AdamW", "params": {"lr": "3e-4"}}),
        ],
        '"optimizer.params.lr" must be a number',
    ),
    (
        "ds-scheduler-param-unknown",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(
                t / "s.json", scheduler={"type": "WarmupLR", "params": {"warmup_steps": 3, "warmup_type": "linear"}}
            ),
        ],
        '"scheduler.params.warmup_steps" is not a parameter of WarmupLR; did you mean "warmup_num_steps"?',
    ),
    (
        "model-config-bad-json",
        lambda t, g: ["--model-config", write_file(t / "c.json", "{'n_layer': 4}")],
        "cannot read",
    ),
    (
        "model-config-no-type",
        lambda t, g: ["--model-config", write_file(t / "c.json", '{"n_layer": 4}')],
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
        lambda t, g: ["--model", write_file(t / "m" / "config.json", '{"model_type": "gpt2"}').parent],
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
    ("data-extension", lambda t, g: ["--data", write_file(t / "x.docx", "x")], "cannot read"),
    (
        "data-malformed-json",
        lambda t, g: ["--data", write_file(t / "b.jsonl", '{"text": "a"}\n{"text": "b",, }\n')],
        "fix or remove the malformed record",
    ),
    ("data-weights-partial", lambda t, g: ["--data", f"{g['data']}:0.5", g["data"]], "give every --data entry"),
    ("data-weight-not-positive", lambda t, g: ["--data", f"{g['data']}:-1"], "a mixing weight must be positive"),
    (
        "data-hub-unreachable",
        lambda t, g: ["--data", "wikitext#wikitext-2-raw-v1@train"],
        "--data wikitext: no such local folder, and the Hugging Face Hub did not serve it",
    ),
    ("chat-without-tokenizer", lambda t, g: ["--data-format", "chat"], "needs a pretrained tokenizer"),
    (
        "chat-template-missing-file",
        lambda t, g: ["--data-format", "chat", "--tokenizer", g["tokenizer"], "--chat-template", t / "chat.jinja"],
        "--chat-template",
    ),
    (
        "chat-tokenizer-without-template",
        lambda t, g: ["--data-format", "chat", "--tokenizer", g["tokenizer"]],
        "has no chat template; pass --chat-template",
    ),
    (
        "chat-missing-column",
        lambda t, g: ["--data-format", "chat", "--tokenizer", g["tokenizer"], "--chat-template", _chatml(t)],
        "no column 'messages'",
    ),
    (
        "prompt-completion-missing-column",
        lambda t, g: ["--data-format", "prompt-completion", "--tokenizer", g["tokenizer"]],
        "no column 'prompt'",
    ),
    ("val-data-missing", lambda t, g: ["--val-data", t / "val.jsonl"], "data file not found"),
    ("load-missing-folder", lambda t, g: ["--load", t / "old" / "checkpoints"], "--load"),
    ("load-no-checkpoint", lambda t, g: ["--load", _dir(t / "ck")], "holds no checkpoint"),
    (
        "load-incomplete",
        lambda t, g: ["--load", write_file(t / "ck" / "step_5" / "mp_rank_00_model_states.pt", "").parent],
        "is incomplete",
    ),
    (
        "lora-rank-zero",
        lambda t, g: ["--model", _tiny_gpt2(t / "m", 512), "--tokenizer", g["tokenizer"], "--lora-rank", 0],
        "--lora-rank must be at least 1",
    ),
    ("lora-without-model", lambda t, g: ["--lora-rank", 8], "LoRA trains adapters on a pretrained base model"),
    ("lora-flag-without-rank", lambda t, g: ["--lora-alpha", 16], "--lora-alpha without --lora-rank"),
    (
        "lora-target-missing",
        lambda t, g: [
            *("--model", _tiny_gpt2(t / "m", 512), "--tokenizer", g["tokenizer"], "--lora-rank", 4),
            *("--lora-target-modules", "q_proj"),
        ],
        "LoRA target modules q_proj: not found in this gpt2 model; its linear layers: c_attn, c_fc, c_proj, lm_head",
    ),
    (
        "lora-tied-head",
        lambda t, g: [
            *("--model", _tiny_gpt2(t / "m", 512), "--tokenizer", g["tokenizer"], "--lora-rank", 4),
            *("--lora-target-modules", "c_attn", "lm_head"),
        ],
        "this model ties its LM head to the embedding",
    ),
    (
        "lora-peft-config-unreadable",
        lambda t, g: [
            "--model",
            _tiny_gpt2(t / "m", 512),
            "--tokenizer",
            g["tokenizer"],
            "--peft-config",
            t / "a.json",
        ],
        "--peft-config",
    ),
    (
        "lora-peft-config-not-lora",
        lambda t, g: [
            *("--model", _tiny_gpt2(t / "m", 512), "--tokenizer", g["tokenizer"], "--peft-config"),
            write_file(t / "ia3" / "adapter_config.json", '{"peft_type": "IA3"}'),
        ],
        "a IA3 adapter; pipegpt trains LoRA adapters",
    ),
    (
        "lora-stage-without-adapters",
        lambda t, g: [
            *("--model", _tiny_gpt2(t / "m", 512), "--tokenizer", g["tokenizer"], "--peft-config"),
            write_file(
                t / "p" / "adapter_config.json", '{"r": 4, "target_modules": ["c_attn"], "layers_to_transform": [0]}'
            ),
        ],
        "pipeline stage 1 (layers 2-4) holds no LoRA adapter",
    ),
    (
        "lora-on-full-checkpoint",
        lambda t, g: [
            *("--model", _tiny_gpt2(t / "m", 512), "--tokenizer", g["tokenizer"], "--lora-rank", 4, "--load"),
            _full_checkpoint(t / "ck"),
        ],
        "--load names a checkpoint of full training",
    ),
    ("output-dir-under-a-file", lambda t, g: ["--output-dir", write_file(t / "a_file", "") / "run"], "is a file"),
    (
        "model-config-wrong-type",
        lambda t, g: ["--model-config", write_file(t / "c.json", '{"model_type": "gpt2", "n_layer": "4"}')],
        "Field 'n_layer' expected int, got str",
    ),
    (
        "model-truncated-safetensors",
        lambda t, g: [
            "--model",
            _truncated(_tiny_gpt2(t / "m", 512) / "model.safetensors").parent,
            "--tokenizer",
            g["tokenizer"],
        ],
        "model.safetensors cannot be read",
    ),
    (
        "ds-zero0-clipping-pipeline",
        lambda t, g: ["--deepspeed_config", write_ds_config(t / "z0.json", zero_optimization={"stage": 0})],
        "ZeRO stage 0 with more than one pipeline stage clips by the gradient norm of stage 0 alone",
    ),
    (
        "load-empty-manifest",
        lambda t, g: ["--load", _empty_manifest(t / "ck")],
        "pipegpt_manifest.json is unreadable (JSONDecodeError)",
    ),
    (
        "load-other-seq-len",
        lambda t, g: ["--seq-len", 64, "--load", _full_checkpoint(t / "ck", seq_len=128)],
        "the checkpoint was trained with --seq-len 128, not 64: pass --seq-len 128",
    ),
    (
        "load-other-data-format",
        lambda t, g: ["--load", _full_checkpoint(t / "ck", data_format="chat")],
        "the checkpoint was trained on --data-format chat, not text",
    ),
    (
        "load-other-attention",
        lambda t, g: ["--load", _full_checkpoint(t / "ck", attention="document")],
        "the checkpoint was trained with --attention document, not causal (which changes what every token sees): "
        "pass --attention document (or --reset-optimizer",
    ),
    (
        "load-other-seed",
        lambda t, g: [
            "--load",
            _full_checkpoint(t / "ck", data_order={"seed": 1, "order": "shuffled", "stream_sources": None}),
        ],  # noqa: E501
        "the checkpoint shuffled its data with --seed 1, not 1234: pass --seed 1 (or --reset-optimizer",
    ),
    (
        "load-other-stream-data",
        lambda t, g: [
            "--streaming",
            "--load",
            _full_checkpoint(
                t / "ck", data_order={"seed": 1234, "order": "sequential", "stream_sources": [[["/x.jsonl", 1, 1]]]}
            ),
        ],
        "the checkpoint streamed other data (its files, their sizes or modification times differ",
    ),
    (
        "output-dir-holds-a-run",
        lambda t, g: ["--output-dir", _dir(t / "run" / "checkpoints" / "step_3").parent.parent],
        "holds another run's checkpoints (step_3): resume it with --load",
    ),
    (
        "val-data-is-data",
        lambda t, g: ["--val-data", g["data"]],
        "is also --val-data: validation would be trained on",
    ),
    (
        "data-text-not-string",
        lambda t, g: ["--data", write_file(t / "n.jsonl", '{"text": 7}\n{"text": 8}\n')],
        "n.jsonl: record 1, column 'text' holds int 7, not text",
    ),
    (
        "prompt-completion-null",
        lambda t, g: [
            *("--data-format", "prompt-completion", "--tokenizer", g["tokenizer"], "--data"),
            write_file(t / "pc.jsonl", '{"prompt": "Say", "completion": null}\n'),
        ],
        "record 1, column 'completion' holds NoneType None, not text",
    ),
    (
        "chat-content-parts-not-joined",
        lambda t, g: [
            *("--data-format", "chat", "--tokenizer", g["tokenizer"], "--chat-template", _chatml(t), "--data"),
            write_file(t / "c.jsonl", json.dumps({"messages": [_turn("user", "Hi"), _turn("assistant", "Ho")]}) + "\n"),
        ],
        "record 1 is not a conversation pipegpt can train on: turn 0: content is a list of parts, which the chat "
        "template does not join",
    ),
    (
        "chat-template-json",
        lambda t, g: [
            *("--data-format", "chat", "--tokenizer", g["tokenizer"], "--chat-template"),
            write_json(t / "tokenizer_config.json", {"chat_template": CHATML}),
        ],
        "tokenizer_config.json is a JSON file, not a Jinja template",
    ),
    (
        "chat-template-renders-no-content",
        lambda t, g: [
            *("--data-format", "chat", "--tokenizer", g["tokenizer"], "--chat-template"),
            write_file(t / "fixed.jinja", "{% for message in messages %}<turn>{% endfor %}"),
        ],
        "--chat-template does not render a conversation's messages",
    ),
    (
        "flag-no-effect-4bit",
        lambda t, g: ["--bnb-4bit-quant-type", "fp4"],
        "--bnb-4bit-quant-type has no effect without --load-in-4bit",
    ),
    (
        "flag-no-effect-sampling",
        lambda t, g: ["--sample-tokens", 0, "--sample-prompt", "In the beginning"],
        "--sample-prompt has no effect with --sample-tokens 0",
    ),
    (
        "flag-no-effect-val-fraction",
        lambda t, g: ["--val-data", write_file(t / "v.jsonl", '{"text": "a"}\n'), "--val-fraction", 0.1],
        "--val-fraction has no effect with --val-data",
    ),
    (
        "flag-no-effect-column",
        lambda t, g: ["--messages-column", "conversation"],
        "--messages-column has no effect with --data-format text",
    ),
    (
        "ds-optimizer-lr-negative",
        lambda t, g: [
            "--deepspeed_config",
            write_ds_config(t / "o.json", optimizer={"type": "AdamW", "params": {"lr": -0.001}}),
        ],
        '"optimizer.params" rejected by torch.optim.AdamW: Invalid learning rate: -0.001',
    ),
    ("flag-partition-regex", lambda t, g: ["--partition-method", "type:[Block"], "type:[Block': not a regex"),
    (
        "load-other-model-config",
        lambda t, g: ["--model-config", "llama-tiny", "--load", _full_checkpoint(t / "ck", model_type="gpt2")],
        "the model config differs from the checkpoint's (",
    ),
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


def test_dualpipev_with_too_few_micro_batches_is_the_whole_line(capsys, good, tmp_path):
    """3 micro-batches on 2 pipeline ranks: DeepSpeed's DualPipeV needs 4; the line names the problem and both fixes
    (launch.sh stops on any preflight line before a rank starts: test_bad_input_launch.py)."""
    config = write_json(tmp_path / "ds.json", {**json.loads(good["config"].read_text()), "train_batch_size": 6})
    line = run_preflight(capsys, 2, "--schedule", "dualpipev", "--deepspeed_config", config, "--data", good["data"])
    assert line == (
        "error: --schedule dualpipev needs at least 2 x 2 = 4 micro-batches per step, the DeepSpeed config gives 3: "
        "raise gradient_accumulation_steps (train_batch_size) to 4, or use --schedule 1f1b"
    )
