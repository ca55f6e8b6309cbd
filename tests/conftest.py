"""Shared fixtures: a small real corpus, a tokenizer trained on it, a one-rank process group,
and `launch`, which runs `launch.sh` with real CPU ranks."""

import ast
import itertools
import json
import os
import re
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


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error when it is not loaded (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """tests/run.sh runs two pytest-xdist workers; each builds the session fixtures it uses. This scheduler sends a
    file to one worker as a whole (its module fixtures are built once) and keeps together the files that name a
    session fixture of tests/integration/conftest.py (a launched run), so that run is launched once. (pytest-xdist
    3.8's `--dist loadgroup` marks do not reach it under pytest 9.2, whose node ids are no longer `_nodeid`.)"""
    from xdist.scheduler import LoadScopeScheduling

    groups = shared_run_groups(config.rootpath, Path(__file__).parent / "integration")

    class ByFileAndSharedRun(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return groups.get(path, path)

    return ByFileAndSharedRun(config, log)


def shared_run_groups(root: Path, folder: Path) -> dict[str, str]:
    """Test file (as in node ids) -> the first file, in name order, that shares a session fixture of
    `folder`/conftest.py with it (read from the files' text: a test names the fixtures it uses)."""
    conftest = ast.parse((folder / "conftest.py").read_text())
    shared = [
        node.name
        for node in conftest.body
        if isinstance(node, ast.FunctionDef) and "session" in ast.unparse(node.decorator_list)
    ]
    owner: dict[str, str] = {}  # file -> a file of its group (union-find)

    def find(name: str) -> str:
        while owner.setdefault(name, name) != name:
            name = owner[name]
        return name

    first_user: dict[str, str] = {}
    for path in sorted(folder.glob("test_*.py")):
        name, text = str(path.relative_to(root)), path.read_text()
        for fixture in shared:
            if re.search(rf"\b{fixture}\b", text):
                owner[find(name)] = find(first_user.setdefault(fixture, name))
        find(name)
    return {name: find(name) for name in owner}
