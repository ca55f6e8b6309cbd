"""Fine-tuning on chat data over real ranks: pp=2 trains pp=1's losses, both end stages feed the same labels in
the configured shape, the logged answer tokens are the blocks', and a resumed run continues exactly."""

import json

import pytest
from transformers import AutoTokenizer

from tests.helpers import launch, read_metrics, small_run_args, tiny_gpt2, write_ds_config, write_json
from train.data.examples import DataFormat
from train.data.sources import resolve_sources
from train.data.splits import packed_dataset

STEPS, SEQ_LEN, MICRO_BATCH = 6, 128, 2


@pytest.fixture(scope="module")
def chat_runs(chat_corpus, chat_tokenizer_dir, tmp_path_factory):
    """6 steps of chat fine-tuning (packed, global batch 8 of micro-batches of 2) as pp=1, pp=2 and 2 data-parallel
    replicas, and pp=2 again resumed from its step-3 checkpoint."""
    tmp = tmp_path_factory.mktemp("chat_runs")
    write_json(tmp / "model.json", tiny_gpt2(positions=SEQ_LEN))
    args = small_run_args(
        chat_corpus,
        chat_tokenizer_dir,
        tmp,
        write_ds_config(tmp / "ds.json", 8, MICRO_BATCH),
        tmp / "model.json",
        STEPS,
        data_format="chat",
        seq_len=SEQ_LEN,
        eval_blocks=8,
        trace_batches=True,
        save_interval=3,
    )
    runs = {name: tmp / name for name in ("pp1", "pp2", "dp2", "pp2_resumed")}
    launch([*args, "--pipeline-stages", 1, "--output-dir", runs["pp1"]], 1)
    launch([*args, "--pipeline-stages", 2, "--output-dir", runs["pp2"]], 2)
    launch([*args, "--pipeline-stages", 1, "--output-dir", runs["dp2"]], 2)
    resume = ["--load", runs["pp2"] / "checkpoints" / "step_3", "--output-dir", runs["pp2_resumed"]]
    launch([*args, "--pipeline-stages", 2, *resume], 2)
    return tmp, runs


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_two_stages_or_two_replicas_train_the_losses_of_one_rank(chat_runs, layout):
    """Replicas hold different numbers of answer tokens: their losses are weighted by them, not averaged. Chat data
    trains under document attention by default: the positions cross the stage boundary."""
    _, runs = chat_runs
    assert json.loads((runs[layout] / "run_config.json").read_text())["attention"] == "document"
    pp1, other = read_metrics(runs["pp1"]), read_metrics(runs[layout])
    assert len(pp1) == len(other) == STEPS and pp1[-1]["loss"] < pp1[0]["loss"]
    for ours, reference in zip(other, pp1, strict=True):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert ours["answer_tokens"] == reference["answer_tokens"]
    assert other[-1]["eval_loss"] == pytest.approx(pp1[-1]["eval_loss"], rel=1e-5)


def test_both_end_stages_feed_the_same_labels_in_the_configured_shape(chat_runs):
    _, runs = chat_runs
    first, last = (
        [json.loads(line) for line in (runs["pp2"] / "batches" / f"stage{stage}_dp0.jsonl").read_text().splitlines()]
        for stage in (0, 1)
    )
    assert len(first) == STEPS * 4 and first == last
    assert all(record["shape"] == [MICRO_BATCH, SEQ_LEN] for record in first)
    assert len({record["labels"] for record in first}) == len(first)  # the digests tell micro-batches apart


def test_logged_answer_tokens_are_those_of_the_steps_blocks(chat_runs, chat_corpus, chat_tokenizer_dir):
    tmp, runs = chat_runs
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    train = packed_dataset(
        resolve_sources([str(chat_corpus)]),
        DataFormat("chat"),
        tokenizer,
        seq_len=SEQ_LEN,
        val_fraction=0.05,
        cache_dir=tmp / "cache",
    )["train"]
    trace = [json.loads(line) for line in (runs["pp1"] / "batches" / "stage0_dp0.jsonl").read_text().splitlines()]
    for metrics in read_metrics(runs["pp1"]):
        blocks = [b for record in trace if record["step"] == metrics["step"] for b in record["blocks"]]
        assert metrics["answer_tokens"] == int(train[blocks]["loss_tokens"].sum())
        assert metrics["masked_fraction"] == pytest.approx(1 - metrics["answer_tokens"] / (8 * SEQ_LEN))


def test_samples_continue_held_out_chat_prompts(chat_runs):
    _, runs = chat_runs
    samples = [json.loads(line)["sample"] for line in (runs["pp2"] / "samples.jsonl").read_text().splitlines()]
    assert samples and all("<|im_start|>user\nContinue:" in s and "<|im_start|>assistant\n" in s for s in samples)


def test_resumed_chat_run_continues_exactly(chat_runs):
    _, runs = chat_runs
    whole, resumed = read_metrics(runs["pp2"]), read_metrics(runs["pp2_resumed"])
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[3:]]
