"""Inputs that used to train on something other than what the user meant, each now read as meant or one line:
values that are not text, chat content as a list of parts, validation files inside `--data`, LoRA resumes with
other settings, a run over an earlier run, and the exits of the preflight and of ranks before training."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

from tests.cases import write_jsonl
from tests.helpers import CHATML, REPO, run_preflight, write_file
from train.config.args import parse_args
from train.data.example_packing import example_blocks
from train.data.examples import MALFORMED, DataFormat, chat_template_of, encode_examples
from train.data.sources import Source, load_texts, resolve_sources, without_validation
from train.data.streaming import SourceBlocks, record_batches
from train.distributed.run_lock import check_no_earlier_run
from train.errors import EXIT_INTERRUPTED, ConfigError

# ChatML that joins a list of text parts as transformers' multimodal templates do (Qwen2-VL's: each part's text,
# one after another), and renders a string content as it is.
PARTS_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>' + '\\n' }}{% endfor %}"
)
CONVERSATION = [
    {"role": "user", "content": "In the beginning"},
    {"role": "assistant", "content": "God created the heaven."},
    {"role": "user", "content": "And the earth"},
    {"role": "assistant", "content": "was without form."},
]


def in_parts(messages: list[dict]) -> list[dict]:
    """Each content cut in two text parts at its first space (joined, they are the content again)."""
    cut = [m["content"].partition(" ") for m in messages]
    return [
        {**m, "content": [{"type": "text", "text": a + s}, {"type": "text", "text": b}]}
        for m, (a, s, b) in zip(messages, cut, strict=True)
    ]


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer_dir):
    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


def test_content_parts_train_as_the_joined_text_or_are_one_line(tokenizer, tmp_path):
    """A template that joins parts encodes a conversation of parts exactly as the same conversation of strings;
    one that does not (CHATML: `+ message['content']`), an image part, or a number are each a malformed record,
    in the stream as in the cache."""
    joins = DataFormat("chat", chat_template=PARTS_CHATML)
    template = chat_template_of(joins, tokenizer)
    strings = encode_examples({"messages": [CONVERSATION]}, tokenizer, joins, 512, template)
    parts = encode_examples({"messages": [in_parts(CONVERSATION)]}, tokenizer, joins, 512, template)
    assert parts["problem"] == [""] and parts["input_ids"] == strings["input_ids"]
    assert parts["labels"] == strings["labels"] and any(label >= 0 for label in parts["labels"][0])
    image = [{**CONVERSATION[0], "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, CONVERSATION[1]]
    number = [{**CONVERSATION[0], "content": 3}, CONVERSATION[1]]
    chatml = DataFormat("chat", chat_template=CHATML)
    bad = {
        "does not join": (chatml, in_parts(CONVERSATION)),
        "content part of type 'image_url'": (joins, image),
        "turn 0: content is int": (joins, number),
    }
    for expected, (data_format, messages) in bad.items():
        out = encode_examples(
            {"messages": [messages]}, tokenizer, data_format, 512, chat_template_of(data_format, tokenizer)
        )
        assert out["status"] == [MALFORMED] and expected in out["problem"][0], out["problem"]
    records = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": image}])
    source = resolve_sources([str(records)])[0]
    with pytest.raises(
        ConfigError, match="a malformed example: ValueError: turn 0: a content part of type 'image_url'"
    ):
        list(SourceBlocks(source, joins, tokenizer, 64).blocks())


@pytest.mark.parametrize(
    "value,shown", [(7, "int 7"), (["a", "b"], "list ['a', 'b']"), ({"t": "a"}, "dict {'t': 'a'}")]
)
def test_a_text_column_of_another_type_is_one_line_cached_and_streamed(tmp_path, value, shown):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": value}] * 3)
    source = resolve_sources([str(path)])[0]
    with pytest.raises(ConfigError, match=re.escape(f"record 1, column 'text' holds {shown}, not text")):
        load_texts(source)
    with pytest.raises(ConfigError, match=re.escape(f"record 1, column 'text' holds {shown}, not text")):
        list(record_batches(source, DataFormat()))


def test_a_null_prompt_or_completion_is_one_line_cached_and_streamed(tmp_path, tokenizer):
    records = [{"prompt": "Say", "completion": " amen"}] * 130 + [{"prompt": "Say", "completion": None}]
    source = resolve_sources([str(write_jsonl(tmp_path / "pc.jsonl", records))])[0]
    data_format = DataFormat("prompt-completion")
    with pytest.raises(ConfigError, match="1 malformed examples; the first, record 131: ValueError: the completion"):
        example_blocks(source, data_format, tokenizer, 64, None)
    with pytest.raises(ConfigError, match="record 131, column 'completion' holds NoneType None, not text"):
        list(record_batches(source, data_format))


def test_validation_inside_a_training_folder_or_glob_is_left_out_of_training(tmp_path, good, capsys):
    folder = tmp_path / "corpus"
    train, val = (
        write_file(folder / "train.jsonl", '{"text": "a"}\n'),
        write_file(folder / "val.jsonl", '{"text": "b"}\n'),
    )
    for data in (str(folder), str(folder / "*.jsonl")):
        (kept,), left_out = without_validation(resolve_sources([data]), resolve_sources([str(val)]))
        assert kept.files == {"json": [str(train)]} and left_out == [str(val)] and kept.spec == data
    with pytest.raises(ConfigError, match="is also --val-data"):
        without_validation(resolve_sources([str(val)]), resolve_sources([str(folder)]))
    hub = Source("org/set@train", hub_name="org/set")
    with pytest.raises(ConfigError, match="is also --val-data"):
        without_validation([hub], [Source("org/set", hub_name="org/set")])
    assert without_validation([hub], [Source("org/set@test", hub_name="org/set", hub_split="test")])[1] == []
    from train.preflight import main as preflight

    flags = ["--deepspeed_config", good["config"], "--data", folder, "--val-data", val, "--output-dir", tmp_path / "o"]
    capsys.readouterr()
    assert preflight(["--world-size", "2", *map(str, flags)]) == 0
    assert f"--val-data: {val} left out of the --data it is also in (never trained on)" in capsys.readouterr().out


def test_a_finished_runs_folder_takes_only_its_own_resume(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_4").mkdir(parents=True)
    for load in (out / "checkpoints", out / "checkpoints" / "step_4"):
        check_no_earlier_run(out, load)
    for load in (None, tmp_path / "other" / "checkpoints"):
        with pytest.raises(ConfigError, match="remove .* to start over there"):
            check_no_earlier_run(out, load)
    check_no_earlier_run(tmp_path / "fresh", None)


def _lora_checkpoint(root, model, tokenizer, **changes):
    """A LoRA checkpoint's manifest as the trainer records it for `--lora-rank 4`, its LoRA config `changes`d."""
    from train.config.adapters import adapters_from_flags
    from train.config.run_config import model_config_from_flags

    flags = parse_args(["--model", str(model), "--tokenizer", str(tokenizer), "--lora-rank", "4"])
    config = model_config_from_flags(flags, None)
    adapters = adapters_from_flags(flags, config).to_dict()
    adapters["config"] |= changes
    manifest = {"step": 1, "layout": {"pipeline_stages": 2, "data_parallel": 1}, "model_config": config.to_dict()}
    write_file(root / "step_1" / "pipegpt_manifest.json", json.dumps({**manifest, "adapters": adapters, "files": {}}))
    write_file(root / "latest", "step_1")
    return root


def test_a_lora_resume_with_another_scale_needs_reset_optimizer_and_other_ranks_are_refused(capsys, good, tmp_path):
    """use_rslora scales the adapters by alpha/sqrt(r), not alpha/r (x2 at r=4): an exact resume would change the
    function; --reset-optimizer says so on purpose. Another rank cannot load at all."""
    from tests.unit.test_bad_input import _tiny_gpt2

    model = _tiny_gpt2(tmp_path / "m", 512)
    flags = ["--model", model, "--tokenizer", good["tokenizer"], "--lora-rank", 4, "--deepspeed_config", good["config"]]
    flags += ["--data", good["data"], "--output-dir", tmp_path / "out"]
    rslora = _lora_checkpoint(tmp_path / "a", model, good["tokenizer"], use_rslora=True)
    line = run_preflight(capsys, 2, *flags, "--load", rslora)
    assert "other LoRA settings (use_rslora True vs False; checkpoint vs flags)" in line and "--reset-optimizer" in line
    from train.preflight import main as preflight

    assert preflight(["--world-size", "2", *map(str, flags), "--load", str(rslora), "--reset-optimizer"]) == 0
    rank8 = _lora_checkpoint(tmp_path / "b", model, good["tokenizer"], r=8)
    line = run_preflight(capsys, 2, *flags, "--load", rank8, "--reset-optimizer")
    assert "other adapters (modules or ranks) than these flags give (r 8 vs 4;" in line


def test_the_preflight_ends_with_launch_sh_and_on_ctrl_c_in_one_line():
    """launch.sh runs the preflight through train.distributed.lifeline: a parent killed with -9 takes it along (the
    kernel's parent-death signal), and SIGINT is one line and exit 130 at once, even twice. A module that sleeps
    stands in for the preflight (whose imports take seconds)."""
    sleeper = [sys.executable, "-m", "train.distributed.lifeline", "timeit", "-n", "1", "import time; time.sleep(60)"]
    shell = subprocess.Popen(
        ["bash", "-c", '"$@" & echo $!; wait', "bash", *sleeper], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    child = int(shell.stdout.readline())
    time.sleep(1.0)  # the child has set its parent-death signal
    shell.kill()
    shell.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the preflight outlived launch.sh"
        time.sleep(0.05)
    proc = subprocess.Popen(sleeper, cwd=REPO, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == EXIT_INTERRUPTED
    assert proc.stderr.read().splitlines() == [
        "error: interrupted (Ctrl-C) before training started: nothing was written"
    ]


def test_a_rank_whose_launch_sh_is_gone_before_training_stops_at_once(tmp_path):
    """Before the training loop (config, data preparation, build) there is nothing to save: the end of launch.sh
    stops the rank at once with one line and exit 130, left in the status file for launch.sh."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    status = tmp_path / "status"
    env = {**os.environ, "PIPEGPT_LAUNCHER_PID": str(gone.pid), "PIPEGPT_STATUS_FILE": str(status), "RANK": "0"}
    env["PIPEGPT_LAUNCHER_HOST"] = os.uname().nodename
    code = "from train.distributed.preemption import Preemption; import time; p = Preemption(); time.sleep(30)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_INTERRUPTED, done.stderr[-2000:]
    assert [line for line in done.stderr.splitlines() if line.startswith("error")] == [
        f"error: the end of launch.sh (pid {gone.pid}) before training started: stopped, nothing was saved"
    ]
    assert "Traceback" not in done.stderr and status.read_text() == f"{EXIT_INTERRUPTED}\n"
