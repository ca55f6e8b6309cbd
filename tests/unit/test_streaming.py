"""`--streaming` in-process: the stream's blocks are the cached blocks, and resuming from any block's saved
position gives the blocks that followed it (the multi-rank runs are in tests/integration/test_streaming_training.py)."""

import itertools
import json
import pickle

import numpy as np
import pytest

import train.data.example_packing as example_packing_module
import train.data.streaming as streaming_module
from tests.cases import write_all_formats, write_jsonl
from train.data.batches import StreamMicroBatches, TrainMicroBatches
from train.data.examples import TEXT, DataFormat
from train.data.packing import packed_source
from train.data.sources import resolve_sources
from train.data.streaming import BlockStream, SourceBlocks, streaming_data
from train.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from train.errors import ConfigError

FORMATS = {
    "text": TEXT,
    "chat": DataFormat("chat"),
    "chat-pad": DataFormat("chat", packing="pad"),
    "prompt-completion": DataFormat("prompt-completion"),
}


@pytest.fixture
def small_batches(monkeypatch):
    """Records read 7 at a time and examples packed 50 at a time, so that a few hundred records cross many batch
    and packing-group boundaries (the blocks must not depend on the first, and the stream must pack as the cache
    does for the second)."""
    monkeypatch.setattr(streaming_module, "STREAM_BATCH", 7)
    monkeypatch.setattr(streaming_module, "PACK_BATCH", 50)
    monkeypatch.setattr(example_packing_module, "PACK_BATCH", 50)


def source_for(kind: str, tmp_path, corpus, chat_corpus):
    if kind.startswith("chat"):
        return resolve_sources([str(chat_corpus)])[0]
    if kind == "prompt-completion":
        records = [json.loads(line)["messages"] for line in itertools.islice(open(chat_corpus), 300)]
        rows = [{"prompt": r[-2]["content"] + "\\n", "completion": r[-1]["content"]} for r in records]
        return resolve_sources([str(write_jsonl(tmp_path / "pc.jsonl", rows))])[0]
    return resolve_sources([str(corpus)])[0]


def as_lists(blocks) -> list[dict]:
    return [{key: np.asarray(value).tolist() for key, value in block.items()} for block in blocks]


@pytest.mark.parametrize("kind", list(FORMATS))
def test_stream_blocks_are_the_cached_blocks_and_resume_anywhere(
    kind, small_batches, tmp_path, corpus, chat_corpus, chat_tokenizer_dir
):
    tokenizer = load_tokenizer(str(chat_tokenizer_dir))
    source, data_format = source_for(kind, tmp_path, corpus, chat_corpus), FORMATS[kind]
    cached = packed_source(source, data_format, tokenizer, seq_len=64, cache_dir=tmp_path / "cache").with_format(
        "numpy"
    )
    streamed = list(SourceBlocks(source, data_format, tokenizer, 64).blocks())
    assert len(streamed) == len(cached) > 40
    assert as_lists(block for block, _ in streamed) == as_lists(cached[i] for i in range(len(cached)))
    # Resuming after block k (its position through pickle, as a checkpoint keeps it) gives blocks k+1, k+2, ...
    # A resumed stream's own positions resume again (a run resumed twice).
    for k in (0, 5, 6, 23, len(streamed) // 2, len(streamed) - 4):
        position = pickle.loads(pickle.dumps(streamed[k][1]))
        resumed = list(itertools.islice(SourceBlocks(source, data_format, tokenizer, 64).blocks(position), 8))
        assert as_lists(b for b, _ in resumed) == as_lists(b for b, _ in streamed[k + 1 : k + 9]), k
        again = SourceBlocks(source, data_format, tokenizer, 64).blocks(pickle.loads(pickle.dumps(resumed[1][1])))
        assert as_lists(b for b, _ in itertools.islice(again, 2)) == as_lists(b for b, _ in streamed[k + 3 : k + 5]), k


def test_every_file_format_of_a_folder_streams_as_it_caches(tmp_path, tokenizer_dir):
    (source,) = resolve_sources([str(write_all_formats(tmp_path / "data"))])
    tokenizer = load_tokenizer(str(tokenizer_dir))
    cached = packed_source(source, TEXT, tokenizer, seq_len=5, cache_dir=tmp_path / "cache")
    streamed = [block for block, _ in SourceBlocks(source, TEXT, tokenizer, 5).blocks()]
    assert as_lists(streamed) == as_lists(cached.with_format("numpy")[i] for i in range(len(cached)))


def feed(stream_or_blocks, dp_rank: int, steps: int, **kw) -> list[list]:
    """The (input_ids, labels) tensors as lists that `steps` steps of replica `dp_rank` (of 2) hand the engine."""
    common = dict(micro_batch_size=2, num_micro_batches=2, dp_rank=dp_rank, dp_size=2, document_attention=True)
    if isinstance(stream_or_blocks, BlockStream):
        batches = StreamMicroBatches(stream=stream_or_blocks, masked=False, start_step=kw.get("start", 0), **common)
    else:
        batches = TrainMicroBatches(
            blocks=stream_or_blocks, seed=1, shuffle=False, start_step=kw.get("start", 0), trace_path=None, **common
        )
    it = iter(batches)
    out = [[(x[0][0].tolist(), x[1].tolist()) for x in itertools.islice(it, 2)] for _ in range(steps)]
    return out, batches


def test_stream_feed_equals_the_cache_read_in_order_across_epochs_and_resumes(small_batches, tmp_path, corpus):
    texts = (json.loads(line)["text"] for line in itertools.islice(open(corpus), 300))
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(itertools.islice(open(corpus), 300)))
    (source,) = resolve_sources([str(small)])
    cached = packed_source(source, TEXT, tokenizer, seq_len=32, cache_dir=tmp_path / "cache").with_format("torch")
    steps = len(cached) // 8 * 2 + 3  # two epochs and a bit: the partial last batches are dropped alike
    sources = [SourceBlocks(source, TEXT, tokenizer, 32)]
    for dp_rank in (0, 1):
        streamed, batches = feed(BlockStream(sources, weights=None, seed=1, held_out=[0]), dp_rank, steps)
        assert streamed == feed(cached, dp_rank, steps)[0]
        # The position after the last step but two (what a checkpoint keeps) resumes at the step after it.
        position = pickle.loads(pickle.dumps(batches.position(steps - 2)))
        resumed, _ = feed(BlockStream(sources, weights=None, seed=1, held_out=[0], state=position), dp_rank, 2)
        assert resumed == streamed[-2:]


def test_validation_is_held_out_of_the_stream_and_weights_mix_it(small_batches, tmp_path, corpus, tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    head, rest = tmp_path / "head.jsonl", tmp_path / "rest.jsonl"
    head.write_text("".join(itertools.islice(open(corpus), 400)))
    rest.write_text("".join(itertools.islice(open(corpus), 400, 2000)))
    sources = resolve_sources([f"{head}:0.25", f"{rest}:0.75"])
    data = streaming_data(sources, None, TEXT, tokenizer, seq_len=32, eval_blocks=16, global_batch=8, seed=3)
    first = [SourceBlocks(s, TEXT, tokenizer, 32) for s in sources]
    held = [as_lists(b for b, _ in itertools.islice(s.blocks(), 8)) for s in first]
    assert as_lists(data.validation.with_format("numpy")[i] for i in range(16)) == held[0] + held[1]
    trained = [tuple(b["input_ids"]) for b, _ in itertools.islice(iter(data.stream()), 400)]
    assert not {tuple(block["input_ids"]) for block in held[0] + held[1]} & set(trained)
    head_blocks = {tuple(b["input_ids"]) for b, _ in first[0].blocks()}
    assert 0.15 < sum(block in head_blocks for block in trained) / 400 < 0.35  # the weights' odds
    # A mixed stream resumes too: its draws and every source's position are in the state.
    stream = list(itertools.islice(iter(data.stream()), 60))
    resumed = itertools.islice(iter(data.stream(pickle.loads(pickle.dumps(stream[29][1])))), 30)
    assert as_lists(b for b, _ in resumed) == as_lists(b for b, _ in stream[30:])
    # Too little data beyond validation: one line, weighted (a spent source cannot start again) or not.
    for entries, error in (([f"{head}:1"], "holds no training block beyond"), ([str(head)], "fewer than 8 blocks")):
        with pytest.raises(ConfigError, match=error):
            streaming_data(
                resolve_sources(entries), None, TEXT, tokenizer, seq_len=32, eval_blocks=2000, global_batch=8, seed=3
            )


def test_prepare_refuses_streaming(tmp_path, good, capsys):
    from train.prepare import main as prepare

    assert prepare(["--streaming", "--data", str(good["data"]), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train.prepare builds the packed cache, which --streaming does without: drop --streaming"
    ]
