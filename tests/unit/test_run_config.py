"""The run's configuration: read-only flags, the same shared flags everywhere, one way to fail."""

import argparse
import subprocess
import sys

import pytest

import train.plan
import train.prepare
from tests.helpers import REPO
from train.config.args import build_parser, parse_args, shared_flags
from train.config.run_config import resolve_run_config
from train.distributed.agreement import every_rank
from train.errors import EXIT_ERROR, EXIT_UNEXPECTED, ConfigError


def _shared_actions(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    shared = {a.dest for p in shared_flags() for a in p._actions if a.dest != "help"}
    return {a.dest: (tuple(a.option_strings), a.default, a.type) for a in parser._actions if a.dest in shared}


def test_main_prepare_and_plan_share_their_flags_and_defaults():
    trainer = _shared_actions(build_parser())
    lora = {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters", "peft_config"}
    qlora = {"load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_double_quant"}
    assert lora | qlora <= set(trainer), trainer  # the planner plans LoRA and QLoRA runs from the same flags
    assert {"schedule", "tensor_parallel"} <= set(trainer) and len(trainer) == 14 + len(lora | qlora), trainer
    assert _shared_actions(train.plan.build_parser()) == trainer
    # train.prepare parses with the trainer's own parser: its flags are the trainer's by construction.
    assert train.prepare.parse_args is parse_args
    defaults = {dest: getattr(parse_args([]), dest) for dest in trainer}
    assert {dest: getattr(parse_args([], train.plan.build_parser()), dest) for dest in trainer} == defaults


def test_parsed_flags_are_read_only_and_resolving_them_changes_nothing(corpus, tmp_path):
    flags = parse_args(["--data", str(corpus), "--output-dir", str(tmp_path)])
    with pytest.raises(AttributeError, match="read-only"):
        flags.sources = []
    before = flags.as_dict()
    config = resolve_run_config(flags, world_size=2)
    assert flags.as_dict() == before
    assert [s.spec for s in config.sources] == [str(corpus)]
    assert config.batch.global_batch == config.batch.micro_batch_size * config.batch.num_micro_batches


ENTRY_POINT_SCRIPT = """
import sys
from pathlib import Path
from train.errors import ConfigError, entry_point

def bad_input():
    raise ConfigError("--seq-len must be at least 1")

def unexpected():
    raise KeyError("deep inside a library")

sys.exit(entry_point(bad_input if sys.argv[1] == "bad" else unexpected, Path(sys.argv[2])))
"""


def test_entry_point_turns_failures_into_one_line_and_an_exit_code(tmp_path):
    """In a fresh process, as every command runs: no process group here (entry_point would tear it down)."""
    log = tmp_path / "run" / "error.log"

    def run(kind: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", ENTRY_POINT_SCRIPT, kind, str(log)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    bad = run("bad")
    assert (bad.returncode, bad.stderr) == (EXIT_ERROR, "error: --seq-len must be at least 1\n")
    assert not log.exists()
    unexpected = run("unexpected")
    assert unexpected.returncode == EXIT_UNEXPECTED
    assert unexpected.stderr.splitlines() == [f"error: KeyError: 'deep inside a library' (traceback in {log})"]
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in unexpected.stderr


def test_every_rank_reports_the_failure_of_the_rank_that_ran(one_rank_group, tmp_path):
    assert every_rank(lambda: 7) == 7
    with pytest.raises(ConfigError, match="no such file"):
        every_rank(lambda: (_ for _ in ()).throw(ConfigError("no such file")))
    assert every_rank(lambda: 1 / 0, run_here=False) is None  # this rank did not run it: nothing failed
