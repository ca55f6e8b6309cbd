"""What we hand to other tools works in them: every family's export, through the real export path, loads in
transformers 4.x (the last release, in an environment of its own) and in 5.x with the same token ids, logits and
chat template, and with the model's context as the tokenizer's limit; its files are as readable as the umask says.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import deepspeed
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from models.architecture import discover
from models.hf_weights import load_hf_weights
from models.pipeline import build_pipeline
from tests.cases import CASES, IDS, SEQ, VOCAB, hf_model
from tests.helpers import CHATML, write_ds_config
from train.checkpoint.checkpointer import save_checkpoint
from train.export import export_checkpoint

TRANSFORMERS_4 = "4.57.1"  # the last 4.x release
TEXT = "And God said, Let there be light: and there was light.<|im_end|>"  # with an added special token
LONG_PROMPT = "In the beginning God created the heaven and the earth. " * 30  # over 64 tokens
CONVERSATION = [{"role": "user", "content": "In the beginning"}, {"role": "assistant", "content": "God created."}]


@pytest.fixture(scope="session")
def transformers4_python() -> Path:
    """A Python environment with transformers 4.x, built once (pip, from the package registry) and kept under
    ~/.cache/pipegpt. Its own packages come first; torch and the rest are this environment's (a .pth file)."""
    home = Path.home() / ".cache" / "pipegpt" / f"venv-transformers-{TRANSFORMERS_4}"
    python = home / "bin" / "python"
    if not (home / "ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(home)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", f"transformers=={TRANSFORMERS_4}"], check=True)
        (home / "ready").write_text(TRANSFORMERS_4)
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(own) / "zz_pipegpt_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


READER = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
folders, out = json.loads(sys.argv[1]), sys.argv[2]
results = {"version": transformers.__version__}
for folder in folders:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = torch.tensor([json.loads(sys.argv[3])])
    with torch.no_grad():
        logits = model(ids).logits
    results[folder] = {
        "ids": tokenizer(sys.argv[4])["input_ids"],
        "chat": tokenizer.apply_chat_template(json.loads(sys.argv[5]), tokenize=False),
        "model_max_length": tokenizer.model_max_length,
        "logits": logits,
        "truncated": len(tokenizer(sys.argv[6], truncation=True)["input_ids"]),
    }
    if model.config.vocab_size >= len(tokenizer):  # a model that can take every token: generate past its context
        generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
        text = generate(sys.argv[6], max_new_tokens=4, do_sample=False, handle_long_generation="hole")
        results[folder]["hole"] = text[0]["generated_text"].startswith(sys.argv[6])  # and no IndexError
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, chat_tokenizer_dir, one_rank_group) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Every family's random model (saved by transformers 5), trained nowhere but taken through the pipeline, a
    DeepSpeed checkpoint and `train.export` with the chat tokenizer (ChatML template): {case id: (export, HF)}."""
    out = {}
    # GPT-2 with the tokenizer's whole vocabulary, to generate from a prompt longer than its 64 positions.
    generation = ("gpt2", "", dict(CASES[0][2], vocab_size=len(AutoTokenizer.from_pretrained(chat_tokenizer_dir))))
    for case_id, (family, _, settings) in zip([*IDS, "gpt2-generation"], [*CASES, generation], strict=True):
        tmp = tmp_path_factory.mktemp(case_id)
        hf = hf_model(family, settings)
        hf.save_pretrained(tmp / "hf")
        arch = discover(hf.config)
        pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
        load_hf_weights(pipe, tmp / "hf", arch)
        ds_config = json.loads(write_ds_config(tmp / "ds.json").read_text().replace('"auto"', "10"))
        engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config)
        # as a run from --model records its generation config (train/checkpoint/same_run.py: manifest_extras)
        generation = {"bos_token_id": 0, "eos_token_id": [0, 1], "do_sample": True, "temperature": 0.6}
        save_checkpoint(
            engine,
            tmp / "ckpt",
            0,
            client_state={},
            model_config=hf.config,
            keep_last=0,
            manifest={"generation_config": generation},
        )
        out[case_id] = (export_checkpoint(tmp / "ckpt", tmp / "export", tokenizer_dir=chat_tokenizer_dir), hf)
    return out


def test_every_export_reads_the_same_in_transformers_4_and_5(exports, transformers4_python, tmp_path):
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(7)).tolist()
    folders = [str(folder) for folder, _ in exports.values()]
    results = tmp_path / "results.pt"
    proc = subprocess.run(
        [transformers4_python, "-c", READER, json.dumps(folders), results, json.dumps(ids), TEXT,
         json.dumps(CONVERSATION), LONG_PROMPT],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(results)
    assert theirs["version"] == TRANSFORMERS_4
    for case_id, (folder, original) in exports.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            ours, reference = model(torch.tensor([ids])).logits, original(torch.tensor([ids])).logits
        old = theirs[str(folder)]
        assert (ours - reference).abs().max().item() <= 1e-5, f"{case_id}: transformers 5 reads another model"
        assert (old["logits"] - reference).abs().max().item() <= 1e-5, f"{case_id}: transformers 4 reads another model"
        assert old["ids"] == tokenizer(TEXT)["input_ids"], case_id
        assert tokenizer.chat_template == CHATML  # the run's template went into the export
        assert old["chat"] == tokenizer.apply_chat_template(CONVERSATION, tokenize=False), case_id
        context = original.config.max_position_embeddings if hasattr(original.config, "max_position_embeddings") else 0
        assert old["model_max_length"] == tokenizer.model_max_length == (context or original.config.n_positions)
        assert old["truncated"] == len(tokenizer(LONG_PROMPT, truncation=True)["input_ids"]) == old["model_max_length"]
    # transformers' way to generate past the context: keep the prompt's last tokens (it reads model_max_length;
    # with the 1e30 of an unset one, the 64 positions overflow: IndexError).
    folder, _ = exports["gpt2-generation"]
    assert theirs[str(folder)]["hole"] is True


def test_the_export_keeps_the_pretrained_generation_config_with_a_pad_token(exports):
    """Llama-3-Instruct stops at <|eot_id|> only through its generation config's list of EOS tokens."""
    for folder, _ in exports.values():
        generation = GenerationConfig.from_pretrained(folder)
        assert generation.eos_token_id == [0, 1] and generation.temperature == 0.6 and generation.pad_token_id == 0


def test_export_files_are_as_readable_as_the_umask_allows(exports):
    umask = os.umask(0)
    os.umask(umask)
    folder, _ = next(iter(exports.values()))
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir() if path.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
