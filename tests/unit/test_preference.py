"""Preference pairs: token ids as trl 1.16's DPOTrainer makes them, pairs packed whole into blocks, and the
pipeline's reference log-probabilities, loss and metrics equal to DPOTrainer's own (`_compute_loss`) on the same
pairs: full fine-tuning and LoRA (from zero and from an adapter), pairs packed or one per block."""

import json
import math

import deepspeed
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.architecture import discover
from models.hf_weights import load_hf_weights
from models.lora import WEIGHTS_FILE, load_initial_adapters, read_peft_config
from models.pipeline import build_pipeline
from models.preference_loss import PreferenceLoss, metrics_from_sums
from tests.cases import peft_reference, pipeline_with_adapters
from tests.helpers import ds_config, read_metrics, run_preflight
from tests.preference_reference import document_logps, plain_dpo_loss
from tests.preference_trl import assert_loss_equals_trl, dpo_trainer, move_off_the_reference, trl_ids, trl_reference
from train.data.batches import TrainMicroBatches
from train.data.examples import KEPT, MALFORMED, NO_ANSWER, TEXT, TRUNCATED, DataFormat
from train.data.preference import encode_pairs, pack_pairs, pair_token_ids
from train.observe.metrics import MetricsLog, StepMeter, WandbSettings, eval_metrics
from train.preference.reference import reference_pass, reference_steps

STRINGS = [
    {"prompt": "In the beginning", "chosen": " God created the heaven", "rejected": " the earth was"},
    {"prompt": "And God said,", "chosen": " Let there be light", "rejected": " and there was"},
    {"prompt": "And the evening", "chosen": " and the morning were the first day.", "rejected": " void"},
]
PREFERENCE = DataFormat(kind="preference")
TURNS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "In the beginning"}],
        "chosen": [{"role": "assistant", "content": "God created the heaven."}],
        "rejected": [{"role": "assistant", "content": "And darkness."}],
    }
]


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer_dir):
    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_llama_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LLAMA))


@pytest.fixture(scope="module")
def trainer(tokenizer, tmp_path_factory):
    """DPOTrainer on a tiny random llama, then the model moved off its reference."""
    trainer = dpo_trainer(tiny_llama_model(tokenizer), tokenizer, tmp_path_factory.mktemp("trl"), STRINGS)
    move_off_the_reference(trainer.model.parameters())
    return trainer


def test_pairs_tokenize_as_trl_does(trainer, tokenizer):
    """Strings (EOS appended), conversations with a prompt, and whole conversations sharing their prompt turns."""
    template = tokenizer.chat_template
    whole = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in TURNS]
    for records in (STRINGS, TURNS, whole):
        ours = [pair_token_ids(r.get("prompt"), r["chosen"], r["rejected"], tokenizer, template) for r in records]
        assert ours == trl_ids(trainer, records)
    prompt, chosen, _ = pair_token_ids(
        TURNS[0]["prompt"], TURNS[0]["chosen"], TURNS[0]["rejected"], tokenizer, template
    )
    assert tokenizer.decode(chosen) == "God created the heaven.<|im_end|>\n"  # the end of turn counts
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")  # the generation prompt does not


def test_bad_pairs_are_one_line_each_and_long_ones_cut_as_trl(tokenizer):
    records = {
        "pair_prompt": [
            "a",
            "a",
            "a",
            "a",
            "In the beginning",
            "In the beginning God created the heaven and the earth",
        ],
        "chosen": ["", " b", None, " b", " God created the heaven and the earth", " and"],
        "rejected": [" c", " b", " c", " c", " the", " or"],
    }
    out = encode_pairs(records, tokenizer, seq_len=24, overlong="truncate", template=None)
    assert out["status"] == [MALFORMED, MALFORMED, MALFORMED, KEPT, TRUNCATED, NO_ANSWER]
    assert out["problem"][0] == "ValueError: the chosen answer is empty: remove the pair"
    assert "equal" in out["problem"][1] and "NoneType" in out["problem"][2]
    docs = out["docs"][4]  # TRL's keep_start: each sequence cut to max_length = --seq-len / 2
    assert [len(d) for d in docs] == [12, min(12, len(tokenizer("In the beginning the<|endoftext|>")["input_ids"]))]


def packed(tokenizer, records: list[dict], seq_len: int, one_per_block: bool = False) -> dict:
    columns = {"pair_prompt": [r["prompt"] for r in records]} | {
        k: [r[k] for r in records] for k in ("chosen", "rejected")
    }
    encoded = encode_pairs(columns, tokenizer, seq_len=seq_len, overlong="truncate", template=None)
    return pack_pairs(encoded, seq_len=seq_len, one_per_block=one_per_block, pad_id=0)


def blocks_of(tokenizer, packing: str) -> dict:
    """STRINGS in 128-token blocks: all three pairs in one (`pack`), or one per block (`pad`)."""
    blocks = packed(tokenizer, STRINGS, seq_len=128, one_per_block=packing == "pad")
    assert blocks["loss_tokens"] == ([3] if packing == "pack" else [1, 1, 1])
    return blocks


@pytest.mark.parametrize("packing", ["pack", "pad"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_metrics_of_packed_blocks_equal_trl(trainer, tokenizer, tmp_path, loss_type, packing, one_rank_group):
    """Three pairs packed into one block of the pipeline, or one per block: the loss (mean over pairs) and TRL's six
    metrics equal DPOTrainer's `_compute_loss` on the same pairs, model and reference log-probabilities."""
    blocks = blocks_of(tokenizer, packing)
    reference = trl_reference(trainer, blocks)
    trainer.model.save_pretrained(tmp_path / "hf")
    arch = discover(trainer.model.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=128)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    assert_loss_equals_trl(trainer, pipe, blocks, reference, loss_type)


@pytest.fixture(scope="module", params=["from zero", "from an adapter"])
def lora_trainer(request, tokenizer, tmp_path_factory):
    """DPOTrainer on a peft model, as trl 1.16 takes one: "from zero", the base and a `peft_config` (its adapters
    start at lora_B = 0: the reference is the base); "from an adapter", a `PeftModel` of an adapter whose lora_B is
    random (trl copies it as the reference adapter "ref": the reference is that adapter). Then its trained adapter
    "default" moved off the reference and saved (folder/moved). Returns (trainer, folder, from_zero)."""
    folder = tmp_path_factory.mktemp("lora")
    peft_reference("llama", dict(LLAMA, vocab_size=len(tokenizer)), folder)  # folder/base, folder/adapter
    base = AutoModelForCausalLM.from_pretrained(folder / "base")
    from_zero = request.param == "from zero"
    if from_zero:
        trainer = dpo_trainer(
            base, tokenizer, folder / "trl", STRINGS, peft_config=read_peft_config(folder / "adapter")[0]
        )
    else:
        model = PeftModel.from_pretrained(base, folder / "adapter", is_trainable=True)
        trainer = dpo_trainer(model, tokenizer, folder / "trl", STRINGS)
    move_off_the_reference(p for name, p in trainer.model.named_parameters() if ".default." in name)
    trainer.model.save_pretrained(folder / "moved", selected_adapters=["default"])
    return trainer, folder, from_zero


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_lora_reference_loss_and_metrics_equal_trl_on_a_peft_model(lora_trainer, tokenizer, packing, one_rank_group):
    """LoRA as --peft-config builds it (from zero: its config alone): the reference pass through a DeepSpeed engine
    gives TRL's precomputed reference log-probabilities pair by pair, and with the adapters moved as TRL's were,
    the loss and metrics (sigmoid, ipo) equal DPOTrainer's, pairs packed or one per block."""
    trainer, folder, from_zero = lora_trainer
    arch = discover(trainer.model.config)
    pipe, _, _ = pipeline_with_adapters(folder, arch, from_zero=from_zero)
    pipe.loss_fn = loss_fn = PreferenceLoss(beta=trainer.beta)
    trainable = [p for p in pipe.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=trainable, config=ds_config(1, 1, scheduler=None))
    blocks = blocks_of(tokenizer, packing)
    feed = dict(micro_batch_size=1, num_micro_batches=1, dp_rank=0, dp_size=1, document_attention=True)
    data = Dataset.from_dict(blocks).with_format("torch")
    table = reference_pass(engine, loss_fn, reference_steps(data, **feed), keys=len(data))
    expected = trl_reference(trainer, blocks)
    torch.testing.assert_close(table, expected, rtol=1e-5, atol=0)
    base, base_table = AutoModelForCausalLM.from_pretrained(folder / "base"), torch.zeros_like(table)
    with torch.no_grad():  # the base model's, each document alone
        for key in range(len(data)):
            for slot, (logp, _) in document_logps(base, data[key]).items():
                base_table[key, slot] = logp
    if from_zero:
        torch.testing.assert_close(table, base_table, rtol=1e-5, atol=0)
    else:  # the reference is the starting adapter, not the base: a reference that ignored it would fail above
        assert (table - base_table).abs().min() > 1e-3
    layers = arch.pipeline_layers()
    for index, module in pipe.stage_modules():  # TRL's moved adapter, as --peft-config would load it
        load_initial_adapters(module, layers[index], folder / "moved" / WEIGHTS_FILE)
    for loss_type in ("sigmoid", "ipo"):
        assert_loss_equals_trl(trainer, pipe, blocks, table, loss_type)


def test_pairs_pack_whole_and_pad_one_per_block(tokenizer):
    pad = packed(tokenizer, STRINGS, seq_len=64, one_per_block=True)
    assert pad["loss_tokens"] == [1, 1, 1]
    pack = packed(tokenizer, STRINGS, seq_len=64)
    assert sum(pack["loss_tokens"]) == 3 and len(pack["loss_tokens"]) < 3
    for slots, positions in zip(pack["answer_slots"], pack["position_ids"], strict=True):
        pairs = {s // 2 for s in slots if s >= 0}
        assert {s for s in slots if s >= 0} == {2 * p + side for p in pairs for side in (0, 1)}  # both answers
        assert len(slots) == len(positions) == 64


def test_the_reference_pass_records_every_block_once_over_the_replicas(tokenizer):
    """The replicas' tables are summed: the blocks that fill up the pass's last step (read again from the start)
    carry the key -1 and are not recorded, so every block is recorded by exactly one replica."""
    records = [dict(r, prompt=f"{r['prompt']} {i}") for i in range(4) for r in STRINGS]
    blocks = Dataset.from_dict(packed(tokenizer, records, seq_len=48)).with_format("torch")
    feed = dict(micro_batch_size=2, num_micro_batches=2, dp_size=2, document_attention=True)
    keys = [key for dp_rank in (0, 1) for step in reference_steps(blocks, dp_rank=dp_rank, **feed)
            for _, labels in step for key in labels[3].tolist()]  # fmt: skip
    assert len(blocks) % 8, "the blocks should not fill the last step of 2 replicas x 2 x 2"
    assert sorted(k for k in keys if k >= 0) == list(range(len(blocks)))
    assert keys.count(-1) == -len(blocks) % 8


def test_reference_pass_and_training_through_the_engine_equal_a_plain_loop(tokenizer, tmp_path, one_rank_group):
    """The reference pass (forward only, before step 1) through a DeepSpeed pipeline engine gives every answer's
    log-probability under the starting weights, and 2 training steps of 2 micro-batches holding different numbers of
    pairs train the losses of a plain PyTorch loop (AdamW) computing TRL's loss on the HF model."""
    records = [dict(r, prompt=f"{r['prompt']} {i}") for i in range(4) for r in STRINGS]
    plain = Dataset.from_dict(packed(tokenizer, records, seq_len=48))
    blocks = plain.with_format("torch")  # as the run reads its packed cache
    assert len(set(plain["loss_tokens"])) > 1 and len(plain) >= 8
    hf = tiny_llama_model(tokenizer)
    hf.save_pretrained(tmp_path / "hf")
    arch = discover(hf.config)
    loss_fn = PreferenceLoss(loss_type="sigmoid", beta=0.1)
    pipe = build_pipeline(arch, num_stages=1, seq_len=48, loss_fn=loss_fn)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    config = ds_config(4, 2, scheduler=None, gradient_clipping=None)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=config)
    feed = dict(micro_batch_size=2, num_micro_batches=2, dp_rank=0, dp_size=1, document_attention=True)
    table = reference_pass(engine, loss_fn, reference_steps(blocks, **feed), keys=len(blocks))
    with torch.no_grad():
        for key in (0, len(table) - 1):  # the first block, and the last (filling the reference pass's last step)
            for slot, (logp, _) in document_logps(hf, plain[key]).items():
                assert table[key, slot].item() == pytest.approx(logp.item(), rel=1e-5)
    loss_fn.reference = table
    batches = TrainMicroBatches(blocks=blocks, seed=0, shuffle=False, **feed)
    data = iter(batches)
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-3, weight_decay=0.1)
    for step in range(2):
        ours = engine.train_batch(data).item()
        keys = [k for micro_batch in batches.step_indices(step) for k in micro_batch]
        loss = plain_dpo_loss(hf.train(), [plain[k] for k in keys], keys, table, "sigmoid")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert ours == pytest.approx(loss.item(), rel=1e-5), step
    assert metrics_from_sums(loss_fn.take_sums())["logps/chosen"] < 0
    meter = StepMeter(engine=engine, global_batch=4, seq_len=48, flops_per_token=1.0, peak_tflops=None,
                      memory_before_model=0, perplexity=PREFERENCE.perplexity)  # fmt: skip
    logged = meter.metrics(ours, 0.5, seconds=1.0, data_wait=0.0, answer_tokens=None, timeline=None, last_step=False)
    assert logged["loss"] == ours and "ppl" not in logged  # a mean pair loss: its exp is no perplexity


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "a", "chosen": " b", "rejected": " b"}, "record 1 is not a pair pipegpt can train on: the chosen "
         "and rejected answers are equal (no preference to learn): remove the pair"),
        ({"prompt": "a", "chosen": " ", "rejected": " b"}, "the chosen answer is empty: remove the pair"),
        ({"prompt": "a", "answer": " b", "rejected": " c"}, "has no column 'chosen'"),
    ],
)  # fmt: skip
def test_the_preflight_refuses_a_bad_first_pair_in_one_line(
    capsys, good, chat_tokenizer_dir, tmp_path, record, expected
):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(record) + "\n")
    line = run_preflight(capsys, 2, "--deepspeed_config", good["config"], "--data", data, "--data-format",
                         "preference", "--tokenizer", chat_tokenizer_dir, "--output-dir", tmp_path / "run")  # fmt: skip
    assert expected in line
    if "column" in expected:
        assert "--chosen-column" in line


def test_the_progress_line_shows_the_reward_accuracy_and_margin_and_no_perplexity(tmp_path, capsys):
    """A preference run's line and metrics.jsonl show its rewards and no `ppl`/`eval_ppl`; other formats keep them."""
    log = MetricsLog(output_dir=tmp_path, enabled=True, total_steps=6, interval=1,
                     wandb=WandbSettings(project=None, run_name=None, mode="disabled"), run_config={})  # fmt: skip
    metrics = {"loss": 0.6, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 10.0}
    rewards = {"rewards/accuracies": 0.75, "rewards/margins": 0.125, "eval_rewards/accuracies": 0.5}
    log.log(3, metrics | rewards | {"eval_rewards/margins": -0.25} | eval_metrics(0.7, PREFERENCE.perplexity))
    log.log(4, metrics | eval_metrics(0.7, TEXT.perplexity))
    log.finish()
    preference, text = capsys.readouterr().out.strip().splitlines()
    assert preference.endswith("| rewards: accuracy 0.75 margin 0.1250 | val rewards: accuracy 0.50 margin -0.2500 "
                               "| val loss 0.7000")  # fmt: skip
    assert text.endswith(f"| val loss 0.7000 ppl {math.exp(0.7):.2f}")
    records = read_metrics(tmp_path)
    assert "eval_ppl" not in records[0] and records[1]["eval_ppl"] == pytest.approx(math.exp(0.7))
