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
from tests.cases import write_jsonl
from tests.helpers import CHATML, tiny_gpt2, write_ds_config
from train.data.batches import TrainMicroBatches
from train.data.example_packing import example_blocks
from train.data.examples import TEXT, DataFormat, chat_template_of, encode_examples
from train.data.packing import cache_key
from train.data.sources import resolve_sources
from train.data.splits import packed_dataset
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
    # The think block is the template's, not the answer's: only the contents and their end-of-turn are labelled.
    assert labelled_text(tokenizer, out["input_ids"][0], out["labels"][0]) == (
        "God created the heaven.<|im_end|>\nwas without form.<|im_end|>\n"
    )


# Three template styles, written here: Llama-3 headers with a default system prompt and `trim`, Zephyr tags with
# the tokenizer's EOS, and a template whose generation prompt sits inside the message loop (after every user turn).
LLAMA3_STYLE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\n\nYou are helpful."
    "<|eot_id|>' }}{% endif %}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR_STYLE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
PROMPT_IN_LOOP = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% if message['role'] == 'user' "
    "%}{{ '<|assistant|>' }}{% endif %}{% endif %}{% endfor %}"
)
SHAPES = {
    "assistant first": [
        {"role": "assistant", "content": "Let there be light."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "There was light."},
    ],
    "consecutive assistant turns": [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "One."},
        {"role": "assistant", "content": "Two."},
    ],
    "system in the middle": [
        {"role": "user", "content": "Speak."},
        {"role": "assistant", "content": "I speak."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Done."},
    ],
}
# What is labelled, written out by hand: each answer's content and the end-of-turn text its template writes after it.
EXPECTED = {
    (CHATML, "assistant first"): "Let there be light.<|im_end|>\nThere was light.<|im_end|>\n",
    (CHATML, "consecutive assistant turns"): "One.<|im_end|>\nTwo.<|im_end|>\n",
    (CHATML, "system in the middle"): "I speak.<|im_end|>\nDone.<|im_end|>\n",
    (LLAMA3_STYLE, "assistant first"): "Let there be light.<|eot_id|>There was light.<|eot_id|>",
    (LLAMA3_STYLE, "consecutive assistant turns"): "One.<|eot_id|>Two.<|eot_id|>",
    (LLAMA3_STYLE, "system in the middle"): "I speak.<|eot_id|>Done.<|eot_id|>",
    (ZEPHYR_STYLE, "assistant first"): "Let there be light.<|endoftext|>\nThere was light.<|endoftext|>\n",
    (ZEPHYR_STYLE, "consecutive assistant turns"): "One.<|endoftext|>\nTwo.<|endoftext|>\n",
    (ZEPHYR_STYLE, "system in the middle"): "I speak.<|endoftext|>\nDone.<|endoftext|>\n",
    (PROMPT_IN_LOOP, "consecutive assistant turns"): "One.<|end|>Two.<|end|>",
    (PROMPT_IN_LOOP, "system in the middle"): "I speak.<|end|>Done.<|end|>",
}


@pytest.fixture(scope="module")
def template_tokenizer(chat_tokenizer_dir):
    """The chat tokenizer, with the other templates' markers as special tokens (so that none merges with text)."""
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end|>"]
    tokenizer.add_tokens(markers + [f"<|{role}|>" for role in ("system", "user", "assistant")], special_tokens=True)
    return tokenizer


@pytest.mark.parametrize("template, shape", list(EXPECTED), ids=[f"{len(t)}-{s}" for t, s in EXPECTED])
def test_answer_masks_hold_for_every_conversation_shape(template_tokenizer, template, shape):
    """The labels are the answers' contents and end-of-turn text, never a default system prompt, a role header, a
    generation prompt or what stands between turns, whatever the conversation's shape."""
    out = encode(template_tokenizer, DataFormat("chat", chat_template=template), {"messages": [SHAPES[shape]]})
    assert out["status"] == [0]
    assert labelled_text(template_tokenizer, out["input_ids"][0], out["labels"][0]) == EXPECTED[(template, shape)]


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
    with pytest.raises(ConfigError, match="2 malformed examples; the first, record 1: .*list of"):
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


def test_a_chat_template_given_by_file_travels_with_the_run(chat_tokenizer_dir, chat_corpus, tmp_path):
    """`--chat-template FILE` trains with that template and keeps it in the run's tokenizer/ (which every export
    copies), with the model's context as the tokenizer's length limit."""
    import train.prepare

    template = CHATML.replace("'<|im_end|>' ", "'<|im_end|><|im_end|>' ")  # not the tokenizer's own template
    assert template != CHATML
    (tmp_path / "template.jinja").write_text(template)
    flags = ["--data-format", "chat", "--data", chat_corpus, "--tokenizer", chat_tokenizer_dir, "--chat-template"]
    flags += [tmp_path / "template.jinja", "--seq-len", 128, "--output-dir", tmp_path / "run"]
    assert train.prepare.main([*map(str, flags), "--data-cache-dir", str(tmp_path / "cache")]) == 0
    kept = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert kept.chat_template == template
    assert kept.model_max_length == 256  # gpt2-tiny's positions
    rendered = kept.apply_chat_template(TWO_EXCHANGES, tokenize=False)
    assert rendered == kept.apply_chat_template(TWO_EXCHANGES, chat_template=template, tokenize=False)
    assert "<|im_end|><|im_end|>" in rendered
