"""Instruction and chat examples -> token sequences labelled only on their answers, and the data formats.

Formats (`--data-format`): `prompt-completion` (two string columns) and `chat` (a column of `{role, content}`
lists, rendered with the tokenizer's chat template or `--chat-template`). Labels are -100 everywhere but on
the answers: the completion, or every assistant turn's content as the template renders it and the
end-of-turn text it writes after it (so the model learns to stop). Each example is followed by EOS, labelled
only after a completion. The first token of an example is never labelled, so no answer token is predicted from
the example before it.

An example longer than `seq_len` is cut to it or dropped (`--overlong`); one left with no answer token is marked
to be skipped. train/data/example_packing.py packs the kept examples into blocks and counts the others.
"""

import functools
from dataclasses import asdict, dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from models.loss import IGNORE_INDEX
from train.errors import ConfigError, first_line

KEPT, TRUNCATED, TOO_LONG, NO_ANSWER, MALFORMED = range(5)
MAP_BATCH = 1000


@dataclass(frozen=True)
class DataFormat:
    """How records become training blocks (the `--data-format` flags, resolved once)."""

    kind: str = "text"  # text | prompt-completion | chat | preference (train/data/preference.py)
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    chat_template: str | None = None  # the text of --chat-template; None: the tokenizer's own
    packing: str = "pack"  # pack | pad
    overlong: str = "truncate"  # truncate | drop

    @property
    def masked(self) -> bool:
        """Whether labels differ from the inputs (instruction and chat data)."""
        return self.kind != "text"

    @property
    def perplexity(self) -> bool:
        """Whether the loss is a mean token cross-entropy, whose exp is a perplexity (`ppl`, `eval_ppl`): not for
        preference data, whose loss is a mean pair loss (docs/preference.md)."""
        return self.kind != "preference"

    def columns(self) -> dict[str, tuple[str, str]]:
        """{column in the data: (the name used here, the flag that names it)}."""
        if self.kind == "text":
            return {self.text_column: ("text", "--text-column")}
        if self.kind == "prompt-completion":
            return {
                self.prompt_column: ("prompt", "--prompt-column"),
                self.completion_column: ("completion", "--completion-column"),
            }
        if self.kind == "preference":  # no --prompt-column (""): chosen and rejected are whole conversations
            # Read as "pair_prompt": a string or a conversation (TEXT_COLUMNS would refuse a list as "prompt").
            prompt = {self.prompt_column: ("pair_prompt", "--prompt-column")} if self.prompt_column else {}
            return prompt | {
                self.chosen_column: ("chosen", "--chosen-column"),
                self.rejected_column: ("rejected", "--rejected-column"),
            }
        return {self.messages_column: ("messages", "--messages-column")}

    def cache_fields(self, tokenizer: PreTrainedTokenizerBase) -> dict:
        """What the blocks depend on, for the cache key (the template that will really be used included)."""
        fields = asdict(self)
        if self.kind == "chat":
            fields["chat_template"] = chat_template_of(self, tokenizer)
        if self.kind == "preference":  # conversations are rendered with it; string pairs do not need one
            fields["chat_template"] = self.chat_template or tokenizer.chat_template
        return fields


TEXT = DataFormat()


def chat_template_of(data_format: DataFormat, tokenizer: PreTrainedTokenizerBase) -> str:
    """The template the chat data is rendered with, checked to render a conversation's content."""
    template = data_format.chat_template or tokenizer.chat_template
    if isinstance(template, dict):  # a tokenizer with named templates
        template = template.get("default")
    if not template:
        raise ConfigError(
            f"--data-format chat: the tokenizer {tokenizer.name_or_path} has no chat template; pass "
            "--chat-template FILE (a Jinja template) or a tokenizer that has one"
        )
    which = "--chat-template" if data_format.chat_template else f"the chat template of {tokenizer.name_or_path}"
    check_renders_content(template, tokenizer, which)
    return template


# Stands in for an assistant turn's content to find where the template puts it (a private-use character, kept by
# `trim` and by every template seen; never in real data, and the text is only rendered, never tokenized).
CONTENT_PROBE = "\ue000pipegpt-answer\ue000"
USER_PROBE = "\ue000pipegpt-question\ue000"


def as_parts(text: str) -> list[dict]:
    """`text` as a list of content parts (the OpenAI form that transformers' multimodal templates iterate)."""
    return [{"type": "text", "text": text}]


@functools.lru_cache(maxsize=8)
def renders(template: str, tokenizer: PreTrainedTokenizerBase, parts: bool) -> bool:
    """Whether `template` renders both turns' content of a probe conversation (content as strings or as parts);
    a list of parts rendered as Python text (`[{'type': 'text', ...}]`) does not count."""
    turns = [{"role": "user", "content": USER_PROBE}, {"role": "assistant", "content": CONTENT_PROBE}]
    turns = [{**turn, "content": as_parts(turn["content"])} for turn in turns] if parts else turns
    try:
        text = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)
    except Exception:  # a template that cannot take this form (jinja's errors, or its own raise_exception)
        return False
    return USER_PROBE in text and CONTENT_PROBE in text and "'type'" not in text


def check_renders_content(template: str, tokenizer: PreTrainedTokenizerBase, which: str) -> None:
    """A chat template renders what the messages say (a file that is some other text, a template that writes only
    fixed text, renders nothing the conversation holds): else one line."""
    if not renders(template, tokenizer, parts=False) and not renders(template, tokenizer, parts=True):
        raise ConfigError(
            f"{which} does not render a conversation's messages (a user and an assistant turn rendered without "
            "their content, or failed): pass a Jinja chat template that writes each message's content"
        )


def checked_turns(messages: list, tokenizer, template: str) -> list[dict]:
    """The conversation's turns with absent keys dropped, each content a string or a list of text parts; a list
    of parts only where the template joins them (renders them, not their Python text). ValueError otherwise."""
    turns = []
    for i, message in enumerate(messages):
        turn = {k: v for k, v in message.items() if v is not None}  # datasets fills absent keys with None
        content = turn.get("content")
        if isinstance(content, list):
            parts = [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p for p in content]
            if bad := [p for p in parts if not (isinstance(p, dict) and p.get("type") == "text" and "text" in p)]:
                kind = bad[0].get("type") if isinstance(bad[0], dict) else type(bad[0]).__name__
                raise ValueError(f"turn {i}: a content part of type {kind!r}; only text parts can be trained on")
            if not all(isinstance(p["text"], str) for p in parts):
                raise ValueError(f"turn {i}: a text part whose text is not a string")
            if not renders(template, tokenizer, parts=True):
                raise ValueError(
                    f"turn {i}: content is a list of parts, which the chat template does not join (it would render "
                    "their Python text): pass a --chat-template that iterates content parts, or make content a string"
                )
            turn["content"] = parts
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"turn {i}: content is {type(content).__name__}, not text or a list of text parts")
        turns.append(turn)
    return turns


def content_text(content: str | list | None) -> str:
    """A turn's content as text: its text parts joined as templates join them (one after another)."""
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


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
    messages = checked_turns(messages, tokenizer, template)

    def render(turns: list) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)

    text, spans = render(messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        in_parts = isinstance(message.get("content"), list)
        probe = render([*messages[:i], {**message, "content": as_parts(CONTENT_PROBE) if in_parts else CONTENT_PROBE}])
        before, _, after = probe.partition(CONTENT_PROBE)
        through = render(messages[: i + 1])
        if _ and text.startswith(before) and text.startswith(through) and len(through) >= len(before):
            spans.append((len(before), len(through)))
            continue
        content = content_text(message.get("content")).strip()
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
                prompt, completion = batch["prompt"][k], batch["completion"][k]
                if not isinstance(prompt, str) or not isinstance(completion, str):  # a null: never trained as ""
                    which = "prompt" if not isinstance(prompt, str) else "completion"
                    raise ValueError(f"the {which} is {type(batch[which][k]).__name__}, not text")
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


def encode_records(
    records: Dataset,
    data_format: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
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
