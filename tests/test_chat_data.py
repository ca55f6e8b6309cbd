"""Instruction and chat data: labels only on the answers, fixed-shape blocks, counted skips, one-line errors, and
the loss over a global batch of masked examples equal to Hugging Face's."""

import json

import deepspeed
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from models.architecture import discover
from models.hf_weights import load_hf_weights
from models.loss import IGNORE_INDEX
from models.pipeline import build_pipeline
from tests.helpers import CHATML, tiny_gpt2, write_ds_config
from train.data.batches import TrainMicroBatches
from train.data.examples import TEXT, DataFormat, chat_template_of, encode_examples, example_blocks
from train.data.packing import cache_key, packed_dataset
from train.data.sources import resolve_sources
from train.errors import ConfigError

CHAT = DataFormat("chat")
PROMPT_COMPLETION = DataFormat("prompt-completion")


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer_dir):
    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


def encode(tokenizer, data_format, records: dict, seq_len: int = 512) -> dict:
    template = chat_template_of(data_format, tokenizer) if data_format.kind == "chat" else None
    return encode_examples(records, tokenizer, data_format, seq_len, template)


TWO_EXCHANGES = [
    {"role": "system", "content": "You are a scribe."},
    {"role": "user", "content": "In the beginning"},
    {"role": "assistant", "content": "God created the heaven."},
    {"role": "user", "content": "And the earth"},
    {"role": "assistant", "content": "was without form."},
]


def labelled_text(tokenizer, input_ids, labels) -> str:
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels, strict=True))
    return tokenizer.decode([token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])


def test_chat_labels_are_the_assistant_turns_and_their_end_of_turn(tokenizer):
    messages = TWO_EXCHANGES
    out = encode(tokenizer, CHAT, {"messages": [messages]})
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False) + "<|endoftext|>"
    # The separating EOS is not an answer: the template's end-of-turn already teaches the model to stop.
    assert labelled_text(tokenizer, ids, labels) == "God created the heaven.<|im_end|>\nwas without form.<|im_end|>\n"


# Like Qwen3's template: only the last assistant turn carries an (empty) think block, so an earlier turn renders
# differently once later turns follow.
THINKING = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_turns_a_template_renders_differently_later_are_found_by_their_content(tokenizer):
    out = encode(tokenizer, DataFormat("chat", chat_template=THINKING), {"messages": [TWO_EXCHANGES]})
    assert out["status"] == [0]
    assert labelled_text(tokenizer, out["input_ids"][0], out["labels"][0]) == (
        "God created the heaven.<|im_end|>\n<think>\n\n</think>\n\nwas without form.<|im_end|>\n"
    )


def test_prompt_completion_labels_are_the_completion_and_eos(tokenizer):
    out = encode(tokenizer, PROMPT_COMPLETION, {"prompt": ["Who led them out?"], "completion": [" Moses."]})
    assert tokenizer.decode(out["input_ids"][0]) == "Who led them out? Moses.<|endoftext|>"
    assert labelled_text(tokenizer, out["input_ids"][0], out["labels"][0]) == " Moses.<|endoftext|>"


def test_overlong_examples_are_cut_or_dropped_and_examples_without_answers_skipped(tokenizer):
    records = {"prompt": ["a " * 40, "b " * 5, "short"], "completion": [" yes", "c " * 40, ""]}
    cut = encode(tokenizer, PROMPT_COMPLETION, records, seq_len=30)
    dropped = encode(tokenizer, DataFormat("prompt-completion", overlong="drop"), records, seq_len=30)
    # 1: its answer is beyond the cut; 2: cut inside the answer; 3: only EOS is labelled (a stop after "short").
    assert cut["status"] == [3, 1, 0] and dropped["status"] == [2, 2, 0]
    assert len(cut["input_ids"][1]) == 30
    no_answer = encode(tokenizer, CHAT, {"messages": [[{"role": "user", "content": "Hello?"}]]})
    assert no_answer["status"] == [3]


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_packed_blocks_have_one_shape_and_keep_every_example_whole(tokenizer, chat_corpus):
    (source,) = resolve_sources([str(chat_corpus)])
    packed, stats = example_blocks(source, CHAT, tokenizer, 128, None)
    padded, padded_stats = example_blocks(source, DataFormat("chat", packing="pad"), tokenizer, 128, None)
    template = chat_template_of(CHAT, tokenizer)
    records = [json.loads(line) for line in open(chat_corpus)]
    examples = encode(tokenizer, CHAT, {"messages": [r["messages"] for r in records]}, seq_len=128)
    kept = [i for i, status in enumerate(examples["status"]) if status in (0, 1)]
    assert stats["kept"] == padded_stats["kept"] == len(kept) and stats["truncated"] > 0
    for blocks in (packed, padded):
        ids, labels = torch.tensor(blocks["input_ids"]), torch.tensor(blocks["labels"])
        assert ids.shape[1] == labels.shape[1] == 128
        assert (labels[:, 0] == IGNORE_INDEX).all()
        assert torch.equal(torch.tensor(blocks["loss_tokens"]), (labels[:, 1:] != IGNORE_INDEX).sum(1).int())
        # No answer token is predicted from another example: the token before it is never a separating EOS.
        before = ids[:, :-1][labels[:, 1:] != IGNORE_INDEX]
        assert not (before == tokenizer.eos_token_id).any()
    # The blocks are the kept examples, whole and nearly in order, then padding.
    kept_ids = [examples["input_ids"][i] for i in kept]
    for blocks, one_per_block in ((packed, False), (padded, True)):
        expected = pack_as_documented(kept_ids, 128, one_per_block)
        flat = [[t for example in b for t in example] for b in expected]
        assert blocks["input_ids"] == [b + [tokenizer.pad_token_id] * (128 - len(b)) for b in flat]
        # Each example's positions count from 0, and so do the padding's (a document of its own).
        lengths = [[len(example) for example in b] + [128 - len(f)] for b, f in zip(expected, flat, strict=True)]
        assert blocks["position_ids"] == [[p for n in b for p in range(n)] for b in lengths]
    assert max(padded["examples"]) == 1 and len(padded) == len(kept)
    assert len(packed) < len(padded) and stats["answer_fraction"] > padded_stats["answer_fraction"]
    lengths = sum(len(ids) for ids in kept_ids)
    assert stats["fill_fraction"] == lengths / (128 * len(packed)) and padded_stats["fill_fraction"] == lengths / (
        128 * len(padded)
    )
    assert template == CHATML


def pack_as_documented(examples: list[list[int]], seq_len: int, one_per_block: bool) -> list[list[list[int]]]:
    """The packing rule, written out: the first of the last 8 blocks with room, else a new block. Each block is
    the list of its examples."""
    closed, open_blocks = [], []
    for example in examples:
        fits = [b for b in open_blocks if not one_per_block and sum(map(len, b)) + len(example) <= seq_len]
        if not fits:
            if len(open_blocks) == (1 if one_per_block else 8):
                closed.append(open_blocks.pop(0))
            open_blocks.append([])
            fits = open_blocks[-1:]
        fits[0].append(example)
    return closed + open_blocks


def test_one_line_errors_and_counted_skips(tokenizer, tokenizer_dir, tmp_path):
    plain = AutoTokenizer.from_pretrained(tokenizer_dir)  # no chat template
    with pytest.raises(ConfigError, match="has no chat template; pass --chat-template"):
        chat_template_of(CHAT, plain)
    assert chat_template_of(DataFormat("chat", chat_template=CHATML), plain) == CHATML
    (source,) = resolve_sources([str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}]))])
    with pytest.raises(ConfigError, match="no column 'messages'.*--messages-column"):
        example_blocks(source, CHAT, tokenizer, 64, None)
    with pytest.raises(ConfigError, match="no column 'prompt'.*--prompt-column"):
        example_blocks(source, PROMPT_COMPLETION, tokenizer, 64, None)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "hello"}, {"messages": "again"}])
    with pytest.raises(ConfigError, match="2 malformed examples; the first, record 0: .*list of"):
        example_blocks(resolve_sources([str(bad)])[0], CHAT, tokenizer, 64, None)
    unanswered = [{"messages": [{"role": "user", "content": "Anyone?"}]}]
    none = write_jsonl(tmp_path / "none.jsonl", unanswered)
    with pytest.raises(ConfigError, match="no example has an answer token"):
        example_blocks(resolve_sources([str(none)])[0], CHAT, tokenizer, 64, None)
    answered = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    some = write_jsonl(tmp_path / "some.jsonl", unanswered * 3 + answered * 5)
    _, stats = example_blocks(resolve_sources([str(some)])[0], CHAT, tokenizer, 64, None)
    assert (stats["kept"], stats["skipped"]) == (5, 3)


def test_cache_key_follows_the_template_and_the_masking_choices(tokenizer, chat_corpus):
    (source,) = resolve_sources([str(chat_corpus)])
    keys = {
        cache_key(source, data_format, tokenizer, 64)
        for data_format in (
            CHAT,
            DataFormat("chat", packing="pad"),
            DataFormat("chat", overlong="drop"),
            DataFormat("chat", chat_template=CHATML.replace("\\n", " ")),
            PROMPT_COMPLETION,
            TEXT,
        )
    }
    assert len(keys) == 6
    assert cache_key(source, DataFormat("chat", chat_template=CHATML), tokenizer, 64) == cache_key(
        source, CHAT, tokenizer, 64
    )  # the tokenizer's own template, given again: the same blocks


def test_masked_loss_over_a_global_batch_equals_hf(tokenizer, chat_corpus, tmp_path, one_rank_group):
    """DeepSpeed's train_batch over 4 micro-batches of padded chat examples (each with its own number of
    answer tokens) reports what `model(input_ids, labels=labels).loss` gives over all of them at once."""
    splits = packed_dataset(
        resolve_sources([str(chat_corpus)]),
        DataFormat("chat", packing="pad"),
        tokenizer,
        seq_len=64,
        val_fraction=0.1,
        cache_dir=tmp_path / "c",
    )
    batches = TrainMicroBatches(
        blocks=splits["train"],
        micro_batch_size=2,
        num_micro_batches=4,
        dp_rank=0,
        dp_size=1,
        seed=3,
        document_attention=True,  # the default for chat data; one example per block, so HF's causal loss holds
    )
    feed = iter(batches)
    micro_batches = [next(feed) for _ in range(4)]
    counts = {int((labels[0][:, 1:] != IGNORE_INDEX).sum()) for _, labels in micro_batches}
    assert len(counts) > 1, "the micro-batches should hold different numbers of answer tokens"
    torch.manual_seed(0)
    config = tiny_gpt2(layers=2, width=32, heads=2, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    hf.save_pretrained(tmp_path / "hf")
    input_ids = torch.cat([ids for (ids, _), _ in micro_batches])
    labels = torch.cat([labels for _, (labels, _) in micro_batches])
    with torch.no_grad():
        expected = hf(input_ids, labels=labels).loss.item()
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=64)
    load_hf_weights(pipe, tmp_path / "hf", arch)
    ds_config = json.loads(write_ds_config(tmp_path / "ds.json", 8, 2).read_text().replace('"auto"', "10"))
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config)
    assert engine.train_batch(iter(micro_batches)).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
