"""Checkpoint files without ranks: an unwritable folder is one error, pruning keeps what a run needs."""

import json

import deepspeed
import pytest
from transformers import GPT2Config

from tests.helpers import write_ds_config, write_json
from train.checkpoint.checkpointer import save_checkpoint
from train.errors import ConfigError


def test_unwritable_checkpoint_folder_is_one_error(one_rank_group, tmp_path):
    from models.architecture import discover
    from models.pipeline import build_pipeline

    config = GPT2Config(vocab_size=120, n_layer=2, n_embd=32, n_head=2, n_positions=32)
    pipe = build_pipeline(discover(config), num_stages=1)
    engine, *_ = deepspeed.initialize(
        model=pipe,
        model_parameters=pipe.parameters(),
        config=json.loads(write_ds_config(tmp_path / "ds.json").read_text().replace('"auto"', "10")),
    )
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="cannot write checkpoint"):
        save_checkpoint(engine, tmp_path / "a_file" / "ckpt", 0, client_state={}, model_config=config, keep_last=0)
    assert not (tmp_path / "a_file").is_dir()


def test_pruning_keeps_the_checkpoint_just_saved_beside_an_earlier_runs_later_ones(tmp_path):
    """A new run into a folder that holds an earlier, longer run's checkpoints: its own newest ones are kept, and
    the earlier run's later steps are not pruned by it."""
    from train.checkpoint.manifest import MANIFEST, prune

    for step in (5, 10, 195, 200):
        write_json(tmp_path / f"step_{step}" / MANIFEST, {"files": {}})
    prune(tmp_path, keep_last=1, saved=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_195", "step_200"]
