"""Preference pairs (`--data-format preference`) -> token ids as trl 1.16's DPOTrainer makes them -> blocks.

The tokenization rule is TRL's (`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`):

* strings: the EOS text is appended to each answer that does not end with it; `prompt`, `prompt + chosen` and
  `prompt + rejected` are tokenized with the tokenizer's special tokens;
* conversations: the prompt turns rendered with the generation prompt, and prompt + chosen turns and prompt +
  rejected turns rendered whole, tokenized by the chat template; without a prompt column, the prompt is the turns
  that chosen and rejected share (TRL's `extract_prompt`);
* the answer starts where the tokenized prompt and the two tokenized prompt + answer sequences stop agreeing
  (TRL's `common_prefix_length`); the log-probability of an answer sums its tokens from there to the end (the EOS
  or the template's end-of-turn included, nothing of the prompt);
* a sequence longer than TRL's `max_length`, here `--seq-len` / 2 so that a pair always fits one block, is cut to
  its start (`truncation_mode="keep_start"`, `--overlong truncate`) or its pair dropped (`--overlong drop`); a pair
  whose prompt fills `max_length` has no answer token left and is skipped, as TRL drops it.

A pair's two documents go side by side into one block, so they always meet in one micro-batch on the last stage
(models/preference_loss.py reads the labels tuple this makes).
"""

import numpy as np
from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from models.errors import first_line
from models.loss import IGNORE_INDEX
from train.data.examples import KEPT, MALFORMED, NO_ANSWER, TOO_LONG, TRUNCATED, checked_turns

OPEN_BLOCKS = 8  # blocks a pair may still join (packing), as for instruction data


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def shared_turns(chosen: list, rejected: list) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) of two whole conversations: the prompt is the turns they share (TRL's
    `extract_prompt`)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def check_answers(prompt, chosen, rejected) -> None:
    """One line for a pair that cannot be trained on: a null, an empty answer, equal answers."""
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None or not isinstance(value, str | list):
            raise ValueError(f"the {name} is {type(value).__name__}, not text or a conversation")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"the {name} answer is empty: remove the pair")
    if chosen == rejected:
        raise ValueError("the chosen and rejected answers are equal (no preference to learn): remove the pair")


def pair_token_ids(prompt, chosen, rejected, tokenizer: PreTrainedTokenizerBase, template: str | None) -> tuple:
    """(prompt_ids, chosen_ids, rejected_ids) of one pair, as TRL tokenizes it (the module's rule). `prompt` None:
    chosen and rejected are whole conversations."""
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = shared_turns(checked_turns(chosen, tokenizer, template or ""), rejected)
    check_answers(prompt, chosen, rejected)
    if isinstance(chosen, list):
        if template is None:
            raise ValueError("a conversation needs a chat template: the tokenizer has none; pass --chat-template")
        prompt = checked_turns(prompt, tokenizer, template) if isinstance(prompt, list) else prompt

        def encode(turns: list, generation_prompt: bool = False) -> list[int]:
            out = tokenizer.apply_chat_template(
                turns, chat_template=template, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
            )
            return list(out["input_ids"])

        prompt_ids = encode(prompt, generation_prompt=True)
        with_chosen, with_rejected = (
            encode(prompt + checked_turns(chosen, tokenizer, template)),
            encode(prompt + checked_turns(rejected, tokenizer, template)),
        )
    else:
        eos = tokenizer.eos_token
        chosen, rejected = (a if a.endswith(eos) else a + eos for a in (chosen, rejected))
        prompt_ids = tokenizer(prompt)["input_ids"]
        with_chosen, with_rejected = tokenizer(prompt + chosen)["input_ids"], tokenizer(prompt + rejected)["input_ids"]
    start = min(common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected))
    return prompt_ids[:start], with_chosen[start:], with_rejected[start:]


def pair_documents(prompt_ids: list, chosen_ids: list, rejected_ids: list, max_length: int, overlong: str) -> tuple:
    """(status, [(ids, completion mask) of prompt + chosen, of prompt + rejected]) cut to `max_length` as TRL's
    collator cuts them (keep_start)."""
    if len(prompt_ids) >= max_length:
        return NO_ANSWER, []
    docs = [(prompt_ids + answer, [0] * len(prompt_ids) + [1] * len(answer)) for answer in (chosen_ids, rejected_ids)]
    if all(len(ids) <= max_length for ids, _ in docs):
        return KEPT, docs
    if overlong == "drop":
        return TOO_LONG, []
    return TRUNCATED, [(ids[:max_length], mask[:max_length]) for ids, mask in docs]


def encode_pairs(batch: dict, tokenizer, seq_len: int, overlong: str, template: str | None) -> dict:
    """A `datasets.map` batch of records (pair_prompt, chosen, rejected) -> each pair's two documents (`docs`: ids;
    `masks`: completion masks; chosen then rejected), status (KEPT ... MALFORMED) and problem."""
    out: dict[str, list] = {"docs": [], "masks": [], "status": [], "problem": []}
    prompts = batch.get("pair_prompt") or [None] * len(batch["chosen"])
    for prompt, chosen, rejected in zip(prompts, batch["chosen"], batch["rejected"], strict=True):
        try:
            ids = pair_token_ids(prompt, chosen, rejected, tokenizer, template)
            status, docs = pair_documents(*ids, max_length=seq_len // 2, overlong=overlong)
            problem = ""
        except Exception as e:  # reported after the map, in one line (train/data/example_packing.py)
            status, docs, problem = MALFORMED, [], f"{type(e).__name__}: {first_line(e)}"
        out["docs"].append([ids for ids, _ in docs])
        out["masks"].append([mask for _, mask in docs])
        out["status"].append(status)
        out["problem"].append(problem)
    return out


def document_rows(docs: list, masks: list, pair: int) -> tuple[list, list, list, list]:
    """A pair's two documents as block columns: ids, labels (answer tokens but a document's first, which nothing
    before it predicts), positions from 0, answer slots (2 x pair, 2 x pair + 1 on every answer token)."""
    ids, labels, positions, slots = [], [], [], []
    for side, (doc, mask) in enumerate(zip(docs, masks, strict=True)):
        ids += doc
        labels += [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(doc[1:], mask[1:], strict=True)]
        positions += range(len(doc))
        slots += [2 * pair + side if m else -1 for m in mask]
    return ids, labels, positions, slots


def pack_pairs(batch: dict, seq_len: int, one_per_block: bool, pad_id: int) -> dict:
    """A `datasets.map` batch of kept pairs -> blocks of `seq_len` tokens, each pair whole in one block (the first
    of the last `OPEN_BLOCKS` with room, as train/data/example_packing.py packs examples); `loss_tokens` is the
    block's pairs, what the loss averages over."""
    names = ("input_ids", "labels", "position_ids", "answer_slots")
    blocks: dict[str, list] = {name: [] for name in (*names, "loss_tokens", "examples")}
    open_blocks: list[tuple[list, list, list, list, list[int]]] = []  # columns, and the pair count in a 1-list

    def close(ids, labels, positions, slots, pairs) -> None:
        padding = seq_len - len(ids)
        for name, column, fill in zip(
            names, (ids, labels, positions, slots), (pad_id, IGNORE_INDEX, None, -1), strict=True
        ):
            blocks[name].append(column + (list(range(padding)) if fill is None else [fill] * padding))
        blocks["loss_tokens"].append(pairs[0])
        blocks["examples"].append(pairs[0])

    for docs, masks in zip(batch["docs"], batch["masks"], strict=True):
        size = sum(len(doc) for doc in docs)
        fits = [b for b in open_blocks if not one_per_block and len(b[0]) + size <= seq_len]
        if not fits:
            if len(open_blocks) >= (1 if one_per_block else OPEN_BLOCKS):
                close(*open_blocks.pop(0))
            open_blocks.append(([], [], [], [], [0]))
            fits = open_blocks[-1:]
        block = fits[0]
        for column, values in zip(block[:4], document_rows(docs, masks, block[4][0]), strict=True):
            column += values
        block[4][0] += 1
    for block in open_blocks:
        close(*block)
    return blocks


def encode_pair_records(records, data_format, tokenizer: PreTrainedTokenizerBase, *, seq_len: int, num_proc) -> Dataset:
    """Preference records -> each pair's documents, status and problem (`encode_pairs`), in order."""
    template = data_format.chat_template or tokenizer.chat_template
    template = template.get("default") if isinstance(template, dict) else template
    return records.map(
        encode_pairs,
        fn_kwargs=dict(tokenizer=tokenizer, seq_len=seq_len, overlong=data_format.overlong, template=template),
        batched=True,
        batch_size=1000,
        remove_columns=records.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 and len(records) > 1000 * num_proc else None,
        desc="tokenizing preference pairs",
    )


def pair_features(seq_len: int) -> Features:
    columns = ("input_ids", "labels", "position_ids", "answer_slots")
    return Features(
        {name: Sequence(Value("int32"), length=seq_len) for name in columns}
        | {"loss_tokens": Value("int32"), "examples": Value("int32")}  # both: the block's pairs
    )


def pack_pair_records(kept: Dataset, data_format, pad_id: int, seq_len: int) -> tuple[Dataset, dict]:
    """Kept pairs -> blocks (`pack_pairs`) and their counts."""
    blocks = kept.map(
        pack_pairs,
        fn_kwargs=dict(seq_len=seq_len, one_per_block=data_format.packing == "pad", pad_id=pad_id),
        batched=True,
        batch_size=10_000,
        remove_columns=kept.column_names,
        features=pair_features(seq_len),
        desc=f"{'packing' if data_format.packing == 'pack' else 'padding'} pairs into {seq_len}-token blocks",
    )
    slots = np.asarray(blocks["answer_slots"])
    return blocks, {"blocks": len(blocks), "tokens": slots.size, "answer_fraction": float((slots >= 0).mean())}


def describe_pairs(spec: str, stats: dict, data_format, seq_len: int) -> str:
    return (
        f"{spec}: {stats['kept']:,} preference pairs in {stats['blocks']:,} blocks of {seq_len} tokens "
        f"({data_format.packing}): {stats['answer_fraction']:.1%} answer tokens; {stats['truncated']} truncated and "
        f"{stats['dropped']} dropped (longer than --seq-len / 2, --overlong), {stats['skipped']} skipped (the prompt "
        "fills --seq-len / 2)"
    )
