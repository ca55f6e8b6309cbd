"""Sources of every format through `datasets`, packing, caching and the per-rank batch order."""

import json

import pandas as pd
import pytest
import torch
from datasets import Dataset

from tests.cases import DOCS, write_all_formats
from train.data.batches import TrainMicroBatches
from train.data.examples import TEXT
from train.data.packing import packed_source, tokenize_and_pack
from train.data.sources import embedded_corpus, load_texts, resolve_sources
from train.data.splits import packed_dataset
from train.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from train.errors import ConfigError


def test_every_format_folder_and_glob(tmp_path):
    folder = write_all_formats(tmp_path / "data")
    (by_folder,) = resolve_sources([str(folder)])
    assert sorted(by_folder.files) == ["csv", "json", "parquet", "text"]
    texts = load_texts(by_folder, "text")
    assert texts.column_names == ["text"]
    assert sum(t == DOCS[0] for t in texts["text"]) == 4
    assert list(resolve_sources([str(folder / "*.jsonl")])[0].files) == ["json"]


def test_embedded_corpus_is_the_king_james_bible():
    texts = load_texts(resolve_sources([embedded_corpus()])[0], "text")
    assert len(texts) > 30_000
    assert texts[0]["text"].startswith("In the beginning God created")


def test_unreadable_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no data files match"):
        resolve_sources([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_sources([str(tmp_path / "x.docx")])


def test_packing_separates_documents_with_eos(tmp_path, tokenizer_dir):
    folder = write_all_formats(tmp_path / "data")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    splits = packed_dataset(
        resolve_sources([str(folder / "b.jsonl")]),
        TEXT,
        tokenizer,
        seq_len=7,
        val_fraction=0.2,
        cache_dir=tmp_path / "c",
    )
    blocks = torch.cat([splits["train"][:]["input_ids"], splits["validation"][:]["input_ids"]]).flatten().tolist()
    expected = []
    for doc in DOCS[:2]:  # the whitespace-only document is skipped
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert blocks == expected[: len(expected) // 7 * 7]
    assert splits["train"][:]["input_ids"].shape[1] == 7
    # Positions count from 0 at every block's first token and after every EOS (a document's first token).
    positions = torch.cat([splits["train"][:]["position_ids"], splits["validation"][:]["position_ids"]]).flatten()
    position = []
    for t in range(len(blocks)):
        position.append(0 if t % 7 == 0 or blocks[t - 1] == tokenizer.eos_token_id else position[-1] + 1)
    assert positions.tolist() == position
    assert any(p == 0 and t % 7 for t, p in enumerate(position)), "no document starts inside a block"


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer_dir, corpus):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    data = tmp_path / "corpus.jsonl"
    data.write_text(corpus.read_text())
    cache = tmp_path / "cache"
    first = packed_dataset(resolve_sources([str(data)]), TEXT, tokenizer, seq_len=32, val_fraction=0.1, cache_dir=cache)
    again = packed_dataset(resolve_sources([str(data)]), TEXT, tokenizer, seq_len=32, val_fraction=0.1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1, "second call re-tokenized instead of reading the cache"
    assert torch.equal(first["train"][:]["input_ids"], again["train"][:]["input_ids"])
    with open(data, "a") as f:
        f.write(json.dumps({"text": "Amen."}) + "\n")
    packed_dataset(resolve_sources([str(data)]), TEXT, tokenizer, seq_len=32, val_fraction=0.1, cache_dir=cache)
    packed_dataset(resolve_sources([str(data)]), TEXT, tokenizer, seq_len=64, val_fraction=0.1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3, "a changed file or seq_len was served from a stale cache"
    other = train_bpe_tokenizer(iter([DOCS[:2]]), vocab_size=300, out_dir=tmp_path / "other_tokenizer")
    packed_dataset(resolve_sources([str(data)]), TEXT, other, seq_len=64, val_fraction=0.1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4, "another tokenizer was served a stale cache"


def test_weighted_mixture_and_explicit_validation(tmp_path, tokenizer_dir, corpus):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    lines = corpus.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2000]) + "\n")
    pd.DataFrame({"body": [json.loads(x)["text"] for x in lines[2000:2500]]}).to_parquet(tmp_path / "b.parquet")
    (tmp_path / "val.txt").write_text("\n".join(json.loads(x)["text"] for x in lines[3500:]) + "\n")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="every --data entry a weight"):
        resolve_sources([f"{tmp_path / 'a.jsonl'}:0.5", str(tmp_path / "b.parquet")])
    a = packed_dataset(
        resolve_sources([str(tmp_path / "a.jsonl")]), TEXT, tokenizer, seq_len=32, val_fraction=0.1, cache_dir=cache
    )["train"]
    sources = resolve_sources([f"{tmp_path / 'a.jsonl'}:0.5", f"{tmp_path / 'b.parquet'}:0.5"])
    with pytest.raises(ConfigError, match="has no column 'text'"):
        packed_dataset(sources, TEXT, tokenizer, seq_len=32, val_fraction=0.1, cache_dir=cache)
    (tmp_path / "b.parquet").rename(tmp_path / "b2.parquet")
    pd.DataFrame({"text": [json.loads(x)["text"] for x in lines[2000:2500]]}).to_parquet(tmp_path / "b.parquet")
    sources = resolve_sources([f"{tmp_path / 'a.jsonl'}:0.5", f"{tmp_path / 'b.parquet'}:0.5"])
    val = resolve_sources([str(tmp_path / "val.txt")])
    splits = packed_dataset(
        sources, TEXT, tokenizer, seq_len=32, val_fraction=0.1, cache_dir=cache, val_sources=val, seed=3
    )
    train = splits["train"][:]["input_ids"]
    in_a = {
        tuple(r)
        for r in packed_dataset(
            resolve_sources([str(tmp_path / "a.jsonl")]),
            TEXT,
            tokenizer,
            seq_len=32,
            val_fraction=0.0001,
            cache_dir=cache,
        )["train"][:]["input_ids"].tolist()
    }
    from_a = sum(tuple(r) in in_a for r in train.tolist())
    assert abs(from_a / len(train) - 0.5) < 0.02, "weights 0.5/0.5 not honoured"
    assert len(a) < len(train)
    val_text = tokenizer.decode(splits["validation"][:]["input_ids"][0])
    assert val_text.split()[0] in (tmp_path / "val.txt").read_text()


def test_a_compressed_source_cut_short_is_one_line_naming_it(tmp_path):
    import gzip

    records = "".join(json.dumps({"text": f"verse {i} " * 20}) + "\n" for i in range(2000)).encode()
    whole = gzip.compress(records)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="cut.jsonl.gz") as caught:
        load_texts(resolve_sources([str(tmp_path / "cut.jsonl.gz")])[0])
    assert "\n" not in str(caught.value)


def test_a_metrics_file_cut_off_by_a_killed_run_is_rewound_without_its_partial_line(tmp_path):
    from train.observe.metrics import readable_lines

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"step": 3, "lo')
    assert [json.loads(line)["step"] for line in readable_lines(path)] == [1, 2]


def test_non_utf8_and_empty_sources_are_one_line_errors(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe not utf-8\n")
    with pytest.raises(ConfigError, match="convert it to UTF-8"):
        packed_dataset(
            resolve_sources([str(tmp_path / "bad.txt")]),
            TEXT,
            tokenizer,
            seq_len=8,
            val_fraction=0.1,
            cache_dir=tmp_path / "c",
        )
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    with pytest.raises(ConfigError, match="blank.txt"):
        packed_dataset(
            resolve_sources([str(tmp_path / "blank.txt")]),
            TEXT,
            tokenizer,
            seq_len=8,
            val_fraction=0.1,
            cache_dir=tmp_path / "c",
        )


def test_malformed_record_read_by_the_ranks_is_one_line(tmp_path):
    """The preflight peeks at the first records only; the ranks read everything (`load_texts`)."""
    lines = [json.dumps({"text": f"verse {i}"}) for i in range(5000)] + ['{"text": "broken",, }']
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"big.jsonl as json .*fix or remove the malformed record"):
        load_texts(resolve_sources([str(tmp_path / "big.jsonl")])[0], "text")


def test_too_small_sources_are_one_line_errors(tmp_path, tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    (tmp_path / "short.txt").write_text("In the beginning\n")
    with pytest.raises(ConfigError, match="holds fewer than 64 tokens of text"):
        packed_dataset(
            resolve_sources([str(tmp_path / "short.txt")]),
            TEXT,
            tokenizer,
            seq_len=64,
            val_fraction=0.1,
            cache_dir=tmp_path / "c",
        )
    one_block = len(tokenizer("In the beginning", add_special_tokens=False)["input_ids"]) + 1  # and EOS
    with pytest.raises(ConfigError, match=f"packs into only 1 blocks of {one_block} tokens: too small"):
        packed_dataset(
            resolve_sources([str(tmp_path / "short.txt")]),
            TEXT,
            tokenizer,
            seq_len=one_block,
            val_fraction=0.1,
            cache_dir=tmp_path / "c",
        )


def numbered_blocks(n: int) -> Dataset:
    """Block i holds the token i, so indices can be read back from batches."""
    return Dataset.from_dict({"input_ids": [[i] for i in range(n)]}).with_format("torch")


def consumed(dp_rank: int, dp_size: int, steps: int, start_step: int = 0) -> list[list[int]]:
    """Block indices each step feeds one replica: global batch 12 = micro-batch 2 x (6 / dp_size) x dp_size."""
    micro_batches = 6 // dp_size
    batches = TrainMicroBatches(
        blocks=numbered_blocks(100),
        micro_batch_size=2,
        num_micro_batches=micro_batches,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=5,
        document_attention=False,
        start_step=start_step,
    )
    it = iter(batches)
    return [[int(t) for _ in range(micro_batches) for t in next(it)[0][0].flatten()] for _ in range(steps)]


def test_replicas_are_disjoint_and_cover_the_global_batch():
    replicas = [consumed(r, 2, steps=20) for r in range(2)]
    one_replica = consumed(0, 1, steps=20)
    for step in range(20):
        a, b = replicas[0][step], replicas[1][step]
        assert not set(a) & set(b)
        assert a + b == one_replica[step]


def test_epochs_wrap_with_a_fresh_shuffle_and_resume_is_exact():
    steps = consumed(0, 1, steps=16)  # 100 // 12 = 8 steps per epoch
    first_epoch = [i for s in steps[:8] for i in s]
    assert len(set(first_epoch)) == 96
    assert steps[8] != steps[0]
    assert consumed(0, 1, steps=6, start_step=10) == steps[10:16]


def test_blocks_do_not_depend_on_the_number_of_processes(tmp_path, tokenizer_dir, corpus):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    texts = load_texts(resolve_sources([str(corpus)])[0], "text")
    one, left_one = tokenize_and_pack(texts, tokenizer, 64, num_proc=None)
    two, left_two = tokenize_and_pack(texts, tokenizer, 64, num_proc=2)
    assert left_one == left_two < 64
    assert one["input_ids"][:] == two["input_ids"][:]
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts["text"] if t.strip())
    assert len(one) * 64 + left_one == n_tokens


def test_preparation_leaves_only_the_packed_cache_on_disk(tmp_path, tokenizer_dir, corpus, monkeypatch):
    """`datasets`' Arrow copies, extracted archives and tokenized records go into a work folder that is removed:
    nothing lands in its own cache (read from HF_DATASETS_CACHE at import, so patched in its config)."""
    import gzip

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    (tmp_path / "kjv.jsonl.gz").write_bytes(gzip.compress(corpus.read_bytes()))
    cache = tmp_path / "cache"
    sources = resolve_sources([str(corpus), str(tmp_path / "kjv.jsonl.gz")])
    splits = packed_dataset(
        sources, TEXT, load_tokenizer(str(tokenizer_dir)), seq_len=64, val_fraction=0.1, cache_dir=cache
    )
    assert len(splits["train"]) > 1000
    assert not (tmp_path / "hf_datasets").exists() or not any((tmp_path / "hf_datasets").rglob("*.arrow"))
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and not any(".work-" in name or ".tmp" in name for name in entries), entries
    packed = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert packed < 2.5 * 2 * corpus.stat().st_size  # the blocks themselves (int32 tokens and positions), no copies


def test_evaluation_defaults_to_a_fixed_token_count_and_large_models_skip_evaluation_samples(one_rank_group, capsys):
    from datasets import DatasetDict

    from train.data.splits import EVAL_TOKENS, evaluation_blocks
    from train.observe.evaluate import evaluation_sample_tokens

    def splits(validation: int) -> DatasetDict:
        return DatasetDict(train=numbered_blocks(64), validation=numbered_blocks(validation))

    # 2^20 tokens: 4,096 blocks of 256 from a large split, in whole global batches; all of a small split.
    assert evaluation_blocks(splits(10_000), 24, 256, None) == EVAL_TOKENS // 256 // 24 * 24
    assert evaluation_blocks(splits(100), 24, 256, None) == 96
    assert evaluation_blocks(splits(10_000), 24, 256, 48) == 48
    # A block longer than the default's tokens still evaluates one global batch.
    assert evaluation_blocks(splits(100), 8, 2**21, None) == 8
    assert evaluation_sample_tokens(None, 50_000_000) == 40 and capsys.readouterr().out == ""
    assert evaluation_sample_tokens(7, 500_000_000) == 7
    assert evaluation_sample_tokens(None, 500_000_000) == 0
    assert "--sample-tokens N turns them on" in capsys.readouterr().out


def test_a_work_folder_left_by_a_killed_preparation_is_removed_by_the_next(tmp_path, tokenizer_dir, corpus):
    import socket
    import subprocess

    from train.data.packing import cache_entry

    tokenizer, (source,) = load_tokenizer(str(tokenizer_dir)), resolve_sources([str(corpus)])
    entry = cache_entry(tmp_path, source, TEXT, tokenizer, seq_len=64)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{entry.name}.work-{socket.gethostname()}-{dead.pid}-x1"
    (stale / "datasets").mkdir(parents=True)
    (stale / "datasets" / "copy.arrow").write_bytes(b"0" * 1000)
    packed_source(source, TEXT, tokenizer, seq_len=64, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]


def test_a_damaged_cache_entry_is_one_line_naming_it(tmp_path, tokenizer_dir, corpus):
    tokenizer, (source,) = load_tokenizer(str(tokenizer_dir)), resolve_sources([str(corpus)])
    packed_source(source, TEXT, tokenizer, seq_len=64, cache_dir=tmp_path)
    (entry,) = tmp_path.iterdir()
    arrow = next(entry.glob("*.arrow"))
    with open(arrow, "r+b") as f:  # a copy cut short
        f.truncate(arrow.stat().st_size // 2)
    with pytest.raises(ConfigError, match=rf"data cache entry {entry} is damaged \({arrow.name}: .* remove the folder"):
        packed_source(source, TEXT, tokenizer, seq_len=64, cache_dir=tmp_path)
