"""What a new user meets first: `--help` documents every flag with its default, the preflight checks the optimizer's
and the schedule's values by building them, and the planner plans for the machine it runs on."""

import argparse
import json
import os

import pytest

import train.plan
import train.planning.machine
from tests.helpers import REPO, ds_config, run_preflight, write_ds_config, write_json
from train.config.args import DefaultsShown, build_parser
from train.config.ds_config import load_ds_config
from train.errors import ConfigError


@pytest.mark.parametrize("parser", [build_parser(), train.plan.build_parser()], ids=["train", "plan"])
def test_every_flag_has_help_that_gives_its_default(parser):
    formatter = DefaultsShown(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.dest == "help":
            assert action.help == argparse.SUPPRESS or action.dest == "help", action.dest
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        assert text.strip(), action.dest
        if action.nargs != 0:  # a switch is off unless given
            assert "default" in text.lower(), (action.dest, text)
    shown = " ".join(parser.format_help().split())  # as wrapped to the terminal, unwrapped
    assert "(default: 128)" in shown and "(default: ds_configs/cpu_pp2.json)" in shown


@pytest.mark.parametrize(
    "section, params, says",
    [
        ("scheduler", {"warmup_num_steps": 0}, "warmup_num_steps must be a positive integer, got 0"),
        ("scheduler", {"warmup_type": "cosine"}, '"scheduler.params.warmup_type" must be one of log, linear'),
        ("optimizer", {"lr": -1e-3}, "Invalid learning rate: -0.001"),
        ("optimizer", {"betas": [0.9, 1.0]}, "Invalid beta parameter at index 1: 1.0"),
        ("optimizer", {"eps": -1e-8}, "Invalid epsilon value"),
    ],
)
def test_out_of_range_optimizer_and_schedule_values_stop_with_the_line_of_the_class_that_rejects_them(
    section, params, says, tmp_path
):
    config = ds_config()
    config[section]["params"].update(params)
    with pytest.raises(ConfigError, match="rejected by|must be one of") as e:
        load_ds_config(write_json(tmp_path / "ds.json", config), train_steps=10)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_the_preflight_says_what_it_checks_and_stops_on_warmup_0_in_one_line(good, capsys, tmp_path):
    config = ds_config()
    config["scheduler"]["params"]["warmup_num_steps"] = 0
    ds = write_json(tmp_path / "bad.json", config)
    line = run_preflight(capsys, 2, "--deepspeed_config", ds, "--data", good["data"], "--output-dir", tmp_path / "o")
    assert "WarmupCosineLR: warmup_num_steps must be a positive integer" in line
    from train.preflight import CHECKING, main

    assert main(["--world-size", "2", "--deepspeed_config", str(good["config"]), "--output-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == CHECKING


def test_the_planner_plans_the_cpu_ranks_launch_sh_starts_and_names_the_flag_a_batch_needs(
    tmp_path, capsys, monkeypatch
):
    assert f"NUM_GPUS=${{NUM_GPUS:-{train.plan.LAUNCH_CPU_RANKS}}}" in (REPO / "launch.sh").read_text()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("NUM_GPUS", raising=False)
    ds = write_ds_config(tmp_path / "ds.json", train_batch=2, micro=1)
    assert train.plan.main(["--model-config", "gpt2-tiny", "--deepspeed_config", str(ds)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stages"] * summary["data_parallel"] == 2 and "planning for this machine: 2 CPU ranks" in out
    assert train.plan.main(["--gpus-per-node", "8", "--deepspeed_config", str(ds)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus-per-node" in err[0] and "4 data-parallel replicas" in err[0], err


def test_the_planner_plans_cpu_ranks_against_their_share_of_this_machines_memory(tmp_path, capsys, monkeypatch):
    """Planning this machine's 2 CPU ranks, the header names what each may hold (its physical memory / 2), not
    --gpu's; a stage that needs more than 90% of that share is warned about. With --gpus-per-node: --gpu's memory."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("NUM_GPUS", raising=False)
    ds = str(write_ds_config(tmp_path / "ds.json", train_batch=2, micro=1))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert train.plan.main(["--model-config", "gpt2-tiny", "--deepspeed_config", ds]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    share = f"1 x 2 CPU ranks ({total / 2 / 2**30:.1f} GiB each: this machine's {total / 2**30:.1f} GiB / 2), fp32"
    assert share in out[0] and "H100" not in out[0], out[0]
    peak = max(json.loads(out[-1])["stage_peak_gib"])
    # A machine of 2 x the largest stage's peak: each rank's share is just that peak, over the 90% line.
    monkeypatch.setattr(train.planning.machine, "machine_memory", lambda: int(2 * peak * 2**30))
    assert train.plan.main(["--model-config", "gpt2-tiny", "--deepspeed_config", ds]) == 0
    assert f"warning: a stage needs more than 90% of the {peak:.1f} GiB of a CPU rank" in capsys.readouterr().out
    assert train.plan.main(["--model-config", "gpt2-tiny", "--gpus-per-node", "2", "--deepspeed_config", ds]) == 0
    assert "1 x 2 H100 (80 GiB), fp32" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_json_passes_every_check(path):
    config = load_ds_config(path, train_steps=300)
    assert config["optimizer"]["params"]["lr"] > 0
