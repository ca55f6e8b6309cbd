"""Shared fixtures: a small real corpus, a tokenizer trained on it, a one-rank process group,
and `launch`, which runs `launch.sh` with real CPU ranks."""

import itertools
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.helpers import CHATML, chat_records, free_port, write_ds_config  # noqa: E402
from train.data.sources import embedded_corpus  # noqa: E402
from train.data.tokenizer import train_bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first 4,000 verses of the embedded King James Bible as a jsonl file."""
    path = tmp_path_factory.mktemp("corpus") / "kjv_head.jsonl"
    with open(embedded_corpus()) as src, open(path, "w") as dst:
        dst.writelines(itertools.islice(src, 4000))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = (json.loads(line)["text"] for line in open(corpus))
    train_bpe_tokenizer(texts, vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """The corpus tokenizer with ChatML's two special tokens and template (as a Qwen2.5 tokenizer has them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_corpus(corpus, tmp_path_factory) -> Path:
    """600 chat examples (system turns, one or two exchanges) made of the corpus' verses, as jsonl."""
    verses = [json.loads(line)["text"] for line in itertools.islice(open(corpus), 600)]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in chat_records(verses)))
    return path


@pytest.fixture
def good(tmp_path, corpus, tokenizer_dir):
    return {"config": write_ds_config(tmp_path / "ds.json"), "data": corpus, "tokenizer": tokenizer_dir}


@pytest.fixture(scope="session")
def one_rank_group():
    """A real single-rank gloo process group, for building PipelineModules and engines in-process."""
    import torch.distributed as dist

    from train.distributed.setup import init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        init_distributed()
    yield


@pytest.fixture(scope="module", autouse=True)
def release_process_groups():
    """The process groups a test file's in-process engines made are destroyed after it (see
    `destroy_process_groups`): over the unit tier they grew to ~650 gloo groups, 2,000 threads that kept polling
    through the whole suite."""
    import gc

    import torch.distributed as dist

    from models.deepspeed_internals import destroy_process_groups, process_groups

    keep = process_groups() if dist.is_initialized() else set()
    yield
    if dist.is_initialized():
        destroy_process_groups(keep)
        gc.collect()  # the engines of the file's fixtures, and with them the last references to their groups


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks (its loadgroup suffix)
def pytest_collection_modifyitems(config, items) -> None:
    """tests/run.sh runs two pytest-xdist workers (`--dist loadgroup`); each builds the session fixtures it uses.
    A file goes to one worker as a whole (its module fixtures are built once), and the files that share a session
    fixture of tests/integration/conftest.py (a launched run) go to the same worker, so that run is launched once."""
    owner = {}  # file -> the file that stands for its group

    def find(path: str) -> str:
        while owner.setdefault(path, path) != path:
            path = owner[path]
        return path

    shared_by = {}  # session fixture -> the first file using it
    for item in items:
        path = item.nodeid.split("::")[0]
        find(path)
        for name, definitions in item._fixtureinfo.name2fixturedefs.items():
            if definitions[-1].scope == "session" and definitions[-1].baseid.startswith("tests/integration"):
                owner[find(path)] = find(shared_by.setdefault(name, path))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(find(item.nodeid.split("::")[0])))
