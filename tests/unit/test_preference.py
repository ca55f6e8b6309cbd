"""Preference pairs: token ids as trl 1.16's DPOTrainer makes them, pairs packed whole into blocks, and the
pipeline's loss and metrics on a packed block equal to DPOTrainer's own `_compute_loss` on the same pairs."""

import json
from collections import defaultdict

import deepspeed
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

from models.architecture import discover
from models.hf_weights import load_hf_weights
from models.pipeline import build_pipeline
from models.preference_loss import PreferenceLoss, metrics_from_sums
from tests.helpers import ds_config, run_preflight
from tests.preference_reference import document_logps, plain_dpo_loss
from train.data.batches import TrainMicroBatches
from train.data.examples import KEPT, MALFORMED, NO_ANSWER, TRUNCATED
from train.data.preference import encode_pairs, pack_pairs, pair_token_ids
from train.observe.metrics import MetricsLog, WandbSettings
from train.preference.reference import reference_pass, reference_steps

STRINGS = [
    {"prompt": "In the beginning", "chosen": " God created the heaven", "rejected": " the earth was"},
    {"prompt": "And God said,", "chosen": " Let there be light", "rejected": " and there was"},
    {"prompt": "And the evening", "chosen": " and the morning were the first day.", "rejected": " void"},
]
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


@pytest.fixture(scope="module")
def trainer(tokenizer, tmp_path_factory):
    """DPOTrainer on a tiny random llama, its reference log-probabilities precomputed (as ours are), then the
    model moved off them so that the rewards are not 0."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config)
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        report_to=[],
        use_cpu=True,
        precompute_ref_log_probs=True,
        max_length=None,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(STRINGS), processing_class=tokenizer)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return trainer


def trl_ids(trainer, records: list[dict]) -> list[tuple]:
    dataset = trainer._prepare_dataset(Dataset.from_list(records), trainer.processing_class, trainer.args, "test")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]


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


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_metrics_of_a_packed_block_equal_trl(trainer, tokenizer, tmp_path, loss_type, one_rank_group):
    """Three pairs packed into one block of the pipeline: the loss (mean over pairs) and TRL's six metrics equal
    DPOTrainer's `_compute_loss` on the same pairs, model and reference log-probabilities."""
    trainer.loss_types, trainer.loss_weights, trainer._metrics = [loss_type], [1.0], {"train": defaultdict(list)}
    batch = trainer.data_collator(list(trainer.train_dataset))
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, batch, False).item()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    trainer.model.save_pretrained(tmp_path / "hf")
    arch = discover(trainer.model.config)
    blocks = packed(tokenizer, STRINGS, seq_len=128)
    assert blocks["loss_tokens"] == [3], "the three pairs share one block"
    reference = torch.zeros(1, 6, dtype=torch.float64)
    reference[0, 0::2], reference[0, 1::2] = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    loss_fn = PreferenceLoss(loss_type=loss_type, beta=trainer.beta, reference=reference)
    pipe = build_pipeline(arch, num_stages=1, seq_len=128, loss_fn=loss_fn)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    rows = {k: torch.tensor(v) for k, v in blocks.items()}
    labels = (rows["labels"], torch.tensor(1 / 3), rows["answer_slots"], torch.tensor([0]))
    with torch.no_grad():
        loss = pipe.loss_fn(pipe.eval()((rows["input_ids"], rows["position_ids"])), labels).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    ours = metrics_from_sums(loss_fn.take_sums())
    assert ours.pop("pairs") == 3 and ours.keys() == trl_metrics.keys()
    for name, value in trl_metrics.items():
        assert ours[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_pairs_pack_whole_and_pad_one_per_block(tokenizer):
    pad = packed(tokenizer, STRINGS, seq_len=64, one_per_block=True)
    assert pad["loss_tokens"] == [1, 1, 1]
    pack = packed(tokenizer, STRINGS, seq_len=64)
    assert sum(pack["loss_tokens"]) == 3 and len(pack["loss_tokens"]) < 3
    for slots, positions in zip(pack["answer_slots"], pack["position_ids"], strict=True):
        pairs = {s // 2 for s in slots if s >= 0}
        assert {s for s in slots if s >= 0} == {2 * p + side for p in pairs for side in (0, 1)}  # both answers
        assert len(slots) == len(positions) == 64


def test_reference_pass_and_training_through_the_engine_equal_a_plain_loop(tokenizer, tmp_path, one_rank_group):
    """The reference pass (forward only, before step 1) through a DeepSpeed pipeline engine gives every answer's
    log-probability under the starting weights, and 2 training steps of 2 micro-batches holding different numbers of
    pairs train the losses of a plain PyTorch loop (AdamW) computing TRL's loss on the HF model."""
    records = [dict(r, prompt=f"{r['prompt']} {i}") for i in range(4) for r in STRINGS]
    plain = Dataset.from_dict(packed(tokenizer, records, seq_len=48))
    blocks = plain.with_format("torch")  # as the run reads its packed cache
    assert len(set(plain["loss_tokens"])) > 1 and len(plain) >= 8
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    hf = LlamaForCausalLM(config)
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


def test_the_progress_line_shows_the_reward_accuracy_and_margin(tmp_path, capsys):
    log = MetricsLog(output_dir=tmp_path, enabled=True, total_steps=6, interval=1,
                     wandb=WandbSettings(project=None, run_name=None, mode="disabled"), run_config={})  # fmt: skip
    metrics = {"loss": 0.6, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 10.0, "eval_loss": 0.7, "eval_ppl": 2.0}
    metrics |= {"rewards/accuracies": 0.75, "rewards/margins": 0.125, "eval_rewards/accuracies": 0.5}
    log.progress(3, metrics | {"eval_rewards/margins": -0.25})
    log.finish()
    line = capsys.readouterr().out
    assert "| rewards: accuracy 0.75 margin 0.1250 | val rewards: accuracy 0.50 margin -0.2500 | val loss" in line
