"""Instruction and chat examples -> token sequences labelled only on their answers -> fixed-shape blocks.

Formats (`--data-format`): `prompt-completion` (two string columns) and `chat` (a column of `{role, content}`
lists, rendered with the tokenizer's chat template or `--chat-template`). Labels are -100 everywhere but on
the answers: the completion, or every assistant turn's content as the template renders it and the
end-of-turn text it writes after it (so the model learns to stop). Each example is followed by EOS, labelled
only after a completion. The first token of an example is never labelled, so no answer token is predicted from
the example before it.

Every block holds `seq_len` tokens, the shape DeepSpeed's pipeline buffers are built for: examples are packed
nearly in order, each into the first of the last few blocks with room for it (`--packing pack`), or one per
block (`--packing pad`); the rest of a block is padding, right-sided and labelled -100, so causal attention
keeps it invisible. Each token's position in its example is stored beside it (the padding counts as one more
example), so that under `--attention document` (the default for these formats) a packed example sees only
itself, at the positions it would have alone. An example longer than
`seq_len` is cut to it or dropped (`--overlong`); one left with no answer token is skipped. Both are
counted and printed.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from models.loss import IGNORE_INDEX
from train.data.sources import Source, load_columns
from train.errors import ConfigError, first_line

KEPT, TRUNCATED, TOO_LONG, NO_ANSWER, MALFORMED = range(5)
MAP_BATCH = 1000
PACK_BATCH = 10_000
OPEN_BLOCKS = 8  # blocks an example may still join (packing)


@dataclass(frozen=True)
class DataFormat:
    """How records become training blocks (the `--data-format` flags, resolved once)."""

    kind: str = "text"  # text | prompt-completion | chat
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    chat_template: str | None = None  # the text of --chat-template; None: the tokenizer's own
    packing: str = "pack"  # pack | pad
    overlong: str = "truncate"  # truncate | drop

    @property
    def masked(self) -> bool:
        """Whether labels differ from the inputs (instruction and chat data)."""
        return self.kind != "text"

    def columns(self) -> dict[str, tuple[str, str]]:
        """{column in the data: (the name used here, the flag that names it)}."""
        if self.kind == "text":
            return {self.text_column: ("text", "--text-column")}
        if self.kind == "prompt-completion":
            return {
                self.prompt_column: ("prompt", "--prompt-column"),
                self.completion_column: ("completion", "--completion-column"),
            }
        return {self.messages_column: ("messages", "--messages-column")}

    def cache_fields(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """What the blocks depend on, for the cache key (the template that will really be used included)."""
        fields = asdict(self)
        if self.kind == "chat":
            fields["chat_template"] = chat_template_of(self, tokenizer)
        return fields


TEXT = DataFormat()


def chat_template_of(data_format: DataFormat, tokenizer: PreTrainedTokenizerBase) -> str:
    template = data_format.chat_template or tokenizer.chat_template
    if isinstance(template, dict):  # a tokenizer with named templates
        template = template.get("default")
    if not template:
        raise ConfigError(
            f"--data-format chat: the tokenizer {tokenizer.name_or_path} has no chat template; pass "
            "--chat-template FILE (a Jinja template) or a tokenizer that has one"
        )
    return template


# Stands in for an assistant turn's content to find where the template puts it (a private-use character, kept by
# `trim` and by every template seen; never in real data, and the text is only rendered, never tokenized).
CONTENT_PROBE = "\ue000pipegpt-answer\ue000"


def chat_text_and_spans(messages: list, tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: each from where the template puts
    the turn's content to the end of the conversation rendered through that turn (the end-of-turn text the
    template writes after the content). Whatever the template writes before the content (a default system prompt,
    the role header, a generation prompt inside the message loop) or between turns is not in a span, also for a
    conversation that starts with the assistant or holds consecutive assistant turns.

    The start is found by rendering the conversation up to the turn with a probe in place of its content. Where
    the template renders a turn differently once later turns follow (Qwen3 drops an empty think block from
    earlier turns), the turn is found by its content in the whole rendering, followed by the end-of-turn text
    the template writes after it."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {role, content} records")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # datasets fills absent keys

    def render(turns: list) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)

    text, spans = render(messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = render([*messages[:i], {**message, "content": CONTENT_PROBE}])
        before, _, after = probe.partition(CONTENT_PROBE)
        through = render(messages[: i + 1])
        if _ and text.startswith(before) and text.startswith(through) and len(through) >= len(before):
            spans.append((len(before), len(through)))
            continue
        content = str(message.get("content", "")).strip()
        found = text.find(content, spans[-1][1] if spans else 0) if content else -1
        if found < 0 or not _:
            raise ValueError(f"the chat template renders turn {i} so that its answer cannot be located")
        end = found + len(content)
        spans.append((found, end + len(after) if text.startswith(after, end) else end))
    return text, spans


def label_answers(offsets: list, spans: list[tuple[int, int]], input_ids: list[int]) -> list[int]:
    """Labels: the token where it overlaps an answer span (as transformers' assistant masks), else -100."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for j, (token_start, token_end) in enumerate(offsets):
        if token_end > token_start and any(token_end > s and token_start < e for s, e in spans):
            labels[j] = input_ids[j]
    return labels


def encode_examples(batch: dict, tokenizer, data_format: DataFormat, seq_len: int, template: str | None) -> dict:
    """A `datasets.map` batch of records -> input_ids, labels, status (KEPT ... MALFORMED) and problem."""
    texts, spans, problems = [], [], []
    for k in range(len(next(iter(batch.values())))):
        try:
            if data_format.kind == "chat":
                text, answer = chat_text_and_spans(batch["messages"][k], tokenizer, template)
            else:
                prompt, completion = batch["prompt"][k] or "", batch["completion"][k] or ""
                text, answer = prompt + completion, [(len(prompt), len(prompt + completion))]
            problem = ""
        except Exception as e:  # a malformed record or a template error: reported after the map, in one line
            text, answer, problem = "", [], f"{type(e).__name__}: {first_line(e)}"
        texts.append(text)
        spans.append(answer)
        problems.append(problem)
    # Chat templates write their own BOS; a prompt gets the tokenizer's special tokens like any text.
    encoded = tokenizer(texts, add_special_tokens=data_format.kind != "chat", return_offsets_mapping=True)
    eos, out = tokenizer.eos_token_id, {"input_ids": [], "labels": [], "status": [], "problem": problems}
    for ids, offsets, answer, problem in zip(
        encoded["input_ids"], encoded["offset_mapping"], spans, problems, strict=True
    ):
        labels = label_answers(offsets, answer, ids)
        if labels:
            labels[0] = IGNORE_INDEX
        ids, labels = ids + [eos], labels + [eos if data_format.kind == "prompt-completion" else IGNORE_INDEX]
        status = MALFORMED if problem else KEPT
        if status == KEPT and len(ids) > seq_len:
            status = TOO_LONG if data_format.overlong == "drop" else TRUNCATED
            ids, labels = ids[:seq_len], labels[:seq_len]
        if status in (KEPT, TRUNCATED) and all(label == IGNORE_INDEX for label in labels):
            status = NO_ANSWER
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
    return out


def pack_examples(batch: dict, seq_len: int, one_per_block: bool, pad_id: int) -> dict:
    """A `datasets.map` batch of kept examples -> blocks of exactly `seq_len` tokens.

    Each example goes into the first of the last `OPEN_BLOCKS` blocks that has room for it, else into a new
    block (the oldest open one is then closed): near to in-order packing, which keeps the validation blocks
    at the end of a source unbiased, while short examples fill the gaps that long ones leave."""
    blocks: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "loss_tokens": [], "examples": []}
    open_blocks: list[tuple[list[int], list[int], list[int]]] = []  # (ids, labels, the lengths of its examples)

    def close_block(ids: list[int], labels: list[int], lengths: list[int]) -> None:
        padding = seq_len - len(ids)
        blocks["input_ids"].append(ids + [pad_id] * padding)
        blocks["labels"].append(labels + [IGNORE_INDEX] * padding)
        blocks["position_ids"].append([p for length in (*lengths, padding) for p in range(length)])
        # The loss predicts labels[t + 1] from position t: a label at position 0 is never counted.
        blocks["loss_tokens"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
        blocks["examples"].append(len(lengths))

    for example_ids, example_labels in zip(batch["input_ids"], batch["labels"], strict=True):
        fits = [b for b in open_blocks if not one_per_block and len(b[0]) + len(example_ids) <= seq_len]
        if not fits:
            if len(open_blocks) >= (1 if one_per_block else OPEN_BLOCKS):
                close_block(*open_blocks.pop(0))
            open_blocks.append(([], [], []))
            fits = open_blocks[-1:]
        ids, labels, lengths = fits[0]
        ids += example_ids
        labels += example_labels
        lengths.append(len(example_ids))
    for block in open_blocks:
        close_block(*block)
    return blocks


def encode_records(
    records: Dataset,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    num_proc: int | None,
) -> Dataset:
    """Instruction or chat records -> input_ids, labels, status and problem per record (`encode_examples`)."""
    if not tokenizer.is_fast:  # answers are located by the character offsets of the tokens
        raise ConfigError(
            f"--data-format {data_format.kind} needs a fast (Rust) tokenizer; {tokenizer.name_or_path} is not"
        )
    template = chat_template_of(data_format, tokenizer) if data_format.kind == "chat" else None
    return records.map(
        encode_examples,
        fn_kwargs=dict(tokenizer=tokenizer, data_format=data_format, seq_len=seq_len, template=template),
        batched=True,
        batch_size=MAP_BATCH,
        remove_columns=records.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 and len(records) > MAP_BATCH * num_proc else None,
        desc="rendering and tokenizing examples",
    )


def example_blocks(
    source: Source,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    num_proc: int | None,
    work_dir: Path | None = None,
) -> tuple[Dataset, dict]:
    """All blocks of one instruction or chat source, and their counts (examples kept, cut, skipped; tokens)."""
    records = load_columns(source, data_format.columns(), work_dir)
    encoded = encode_records(records, data_format, tokenizer, seq_len, num_proc)
    return pack_encoded(source, encoded, data_format, tokenizer, seq_len)


def pack_encoded(
    source: Source, encoded: Dataset, data_format: DataFormat, tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> tuple[Dataset, dict]:
    """Encoded records (`encode_records`, in order) -> blocks and their counts; malformed records stop here."""
    status = np.asarray(encoded["status"])
    if (status == MALFORMED).any():
        first = int(np.flatnonzero(status == MALFORMED)[0])
        raise ConfigError(
            f"{source.spec}: {(status == MALFORMED).sum()} malformed examples; the first, record {first}: "
            f"{encoded[first]['problem']}"
        )
    kept = encoded.select(np.flatnonzero((status == KEPT) | (status == TRUNCATED))).remove_columns(
        ["status", "problem"]
    )
    counts = {
        name: int((status == code).sum()) for code, name in enumerate(("kept", "truncated", "dropped", "skipped"))
    }
    counts["kept"] += counts["truncated"]
    if len(kept) == 0:
        raise ConfigError(
            f"{source.spec}: no example has an answer token within --seq-len {seq_len}: nothing to train on"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks = kept.map(
        pack_examples,
        fn_kwargs=dict(seq_len=seq_len, one_per_block=data_format.packing == "pad", pad_id=pad_id),
        batched=True,
        batch_size=PACK_BATCH,
        remove_columns=kept.column_names,
        features=block_features(seq_len),
        desc=f"{'packing' if data_format.packing == 'pack' else 'padding'} examples into {seq_len}-token blocks",
    )
    return blocks, {**counts, **block_stats(blocks, kept, seq_len)}


def block_features(seq_len: int) -> Features:
    return Features(
        {
            "input_ids": Sequence(Value("int32"), length=seq_len),
            "labels": Sequence(Value("int32"), length=seq_len),
            "position_ids": Sequence(Value("int32"), length=seq_len),  # in its example (padding: one more)
            "loss_tokens": Value("int32"),  # the positions the loss counts (labels[1:] that are not -100)
            "examples": Value("int32"),
        }
    )


def block_stats(blocks: Dataset, kept: Dataset, seq_len: int) -> dict:
    """Answer tokens (those the loss counts) and example tokens, as fractions of all block tokens."""
    block_tokens = len(blocks) * seq_len
    answer_tokens = int(np.sum(blocks["loss_tokens"]))
    example_tokens = pc.sum(pc.list_value_length(kept.with_format("arrow")["input_ids"])).as_py()
    return {
        "blocks": len(blocks),
        "tokens": block_tokens,
        "answer_tokens": answer_tokens,
        "answer_fraction": answer_tokens / block_tokens,
        "fill_fraction": example_tokens / block_tokens,
    }


def describe(spec: str, stats: dict, data_format: DataFormat, seq_len: int) -> str:
    how = "packed" if data_format.packing == "pack" else "padded"
    return (
        f"{spec}: {stats['kept']:,} examples in {stats['blocks']:,} blocks of {seq_len} tokens ({how})"
        f": {stats['answer_fraction']:.1%} answer tokens, {stats['fill_fraction']:.1%} filled; "
        f"{stats['truncated']} truncated and {stats['dropped']} dropped (longer than --seq-len, --overlong), "
        f"{stats['skipped']} skipped (no answer token)"
    )
