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

from tests.helpers import free_port, write_ds_config  # noqa: E402
from train.sources import embedded_corpus  # noqa: E402
from train.tokenizer import train_bpe_tokenizer  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "ranks: starts real ranks or launch.sh (the full tier only; see tests/run.sh)")


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


@pytest.fixture
def good(tmp_path, corpus, tokenizer_dir):
    return {"config": write_ds_config(tmp_path / "ds.json"), "data": corpus, "tokenizer": tokenizer_dir}


@pytest.fixture(scope="session")
def one_rank_group():
    """A real single-rank gloo process group, for building PipelineModules and engines in-process."""
    import torch.distributed as dist

    from train.distributed import init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        init_distributed()
    yield
