"""The inventory of bad input (docs/inputs.md): every row one error line from the preflight, before any rank."""

import json

import pytest

from tests.helpers import CHATML, REPO, tiny_gpt2, write_ds_config, write_file, write_json
from tests.test_bad_input import run_preflight
from train.config.args import DEFAULT_MODEL_CONFIG


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
