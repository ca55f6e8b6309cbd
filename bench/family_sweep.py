"""The equality proof over every model type the generic conversion accepts, and the table it writes.

    python -m bench.family_sweep    # proves every supported type, writes docs/families.md and the README's list

Each supported type's tiny random model (bench/family_configs.py; weights moved off their initial values as
tests/cases.py does) is saved and loaded into the pipeline, in this one process: logits and loss equal HF's
(<= 1e-5), every gradient equals HF's (<= 1e-4 of its largest entry; zero or none only where HF's is), a later
token moves no earlier logit, packed documents (positions from 0 each) get HF's logits for each alone, the model
cut into 2 stages computes the 1-stage logits, and HF -> pipeline layer files -> `export_hf_model` gives HF's
checkpoint tensors, which `from_pretrained` loads with no missing or unexpected key.
"""

import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bench.family_configs import NOTES, TYPES, VOCAB, tiny_config, verdict
from models.architecture import TIED_HEAD, discover
from models.hf_weights import export_hf_model, pipeline_param_to_hf
from models.loss import next_token_cross_entropy
from models.pipeline import build_pipeline
from tests.cases import hf_model, load_case_weights, pipeline_stage, row_exact_experts

SEQ = 12
REPO = Path(__file__).resolve().parent.parent
FAMILIES_DOC, README = REPO / "docs" / "families.md", REPO / "README.md"
README_MARK = "<!-- written by python -m bench.family_sweep from docs/families.md -->"


def prove(model_type: str, folder: Path) -> None:
    """The equality proof of `model_type`'s tiny model (AssertionError naming what differs)."""
    config = tiny_config(model_type)
    hf = hf_model(model_type, config.to_diff_dict())
    hf.save_pretrained(folder / "hf")
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    load_case_weights(pipe, folder / "hf", arch)
    pipe.eval()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    theirs = hf(ids, labels=ids)
    ours = pipe(ids)
    assert (ours - theirs.logits).abs().max().item() <= 1e-5, "logits differ"
    loss = next_token_cross_entropy(ours, ids)
    assert abs(loss.item() - theirs.loss.item()) <= 1e-5, "loss differs"
    theirs.loss.backward()
    loss.backward()
    _assert_gradients_equal(hf, pipe, arch)
    _assert_causal(pipe, ids)
    _assert_documents_computed_alone(pipe, hf)
    _assert_two_stages_compute_one(arch, folder / "hf", ids, ours.detach())
    _assert_export_round_trip(arch, pipe, folder, hf)


def _assert_gradients_equal(hf, pipe, arch, rel: float = 1e-4) -> None:
    """Every pipeline gradient is its HF parameter's within `rel` of the largest entry. A parameter that HF's
    forward uses only to choose (ERNIE-4.5-MoE's and Laguna's `e_score_correction_bias` steer top-k routing; PhiMoE's
    router in eval mode: a hard top-2 with no straight-through term) has no or a zero gradient there: so here."""
    theirs = dict(hf.named_parameters())
    for name, param in pipe.named_parameters():
        expected = theirs[pipeline_param_to_hf(arch, name)].grad
        if expected is None or not expected.any():
            assert param.grad is None or not param.grad.any(), f"{name}: a gradient where HF has none"
            continue
        scale = expected.abs().max().item()
        assert (param.grad - expected).abs().max().item() <= rel * scale, f"{name}: gradient differs"


def _assert_causal(pipe, ids: torch.Tensor) -> None:
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 7) % VOCAB
    with torch.no_grad(), row_exact_experts(pipe):  # experts computed row by row: see tests/cases.py
        a, b = pipe(ids), pipe(changed)
    assert torch.equal(a[:, :8], b[:, :8]), "a later token changed an earlier position's logits"
    assert not torch.equal(a[:, 8:], b[:, 8:]), "the changed tokens moved nothing"


def _assert_documents_computed_alone(pipe, hf) -> None:
    """Document attention (`--attention document`: positions restart at 0 per packed document): each document's
    logits are HF's for that document alone."""
    generator = torch.Generator().manual_seed(4)
    documents = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 4, 3)]
    positions = torch.cat([torch.arange(len(d)) for d in documents])[None]
    with torch.no_grad(), row_exact_experts(pipe), row_exact_experts(hf):
        packed = pipe((torch.cat(documents)[None], positions))[0]
        alone = torch.cat([hf(d[None]).logits[0] for d in documents])
    assert (packed - alone).abs().max().item() <= 1e-5, "a packed document's logits differ from HF's alone"


def _assert_two_stages_compute_one(arch, folder: Path, ids: torch.Tensor, expected: torch.Tensor) -> None:
    stages = [pipeline_stage(arch, 2, s) for s in range(2)]
    for stage in stages:
        load_case_weights(stage, folder, arch)
    with torch.no_grad():
        logits = stages[1].eval()(stages[0].eval()(ids))
    assert (logits - expected).abs().max().item() <= 1e-6, "2 stages differ from 1"


def _assert_export_round_trip(arch, pipe, folder: Path, hf) -> None:
    """The pipeline's layers as DeepSpeed's layer files (a per-layer state dict), exported as training exports: the
    tensors of HF's own `save_pretrained`, bit for bit, which `from_pretrained` loads with no missing or unexpected
    key (so the export loads as HF's checkpoint does: same config, same tensors; Youtu's tied embedding is
    re-initialised by transformers 5.24's own round trip, export or not)."""
    tag = folder / "tag"
    tag.mkdir()
    for index, (layer, module) in enumerate(zip(arch.pipeline_layers(), pipe.forward_funcs, strict=True)):
        if layer.kind != TIED_HEAD:
            torch.save(module.state_dict(), tag / f"layer_{index:02d}-model_states.pt")
    out = export_hf_model(tag, hf.config, out_dir=folder / "export")
    before, after = load_file(folder / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys(), "the export holds other tensors than HF's checkpoint"
    assert all(torch.equal(before[k], after[k]) for k in before), "the export's tensors differ from HF's"
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), f"export loads with {info}"


def sweep() -> dict[str, str | None]:
    """model_type -> None (supported: the proof passed) or the reason it is not; a proof that fails is an error."""
    results = {}
    for model_type in TYPES:
        results[model_type] = verdict(model_type)
        if results[model_type] is None:
            with tempfile.TemporaryDirectory() as tmp:
                prove(model_type, Path(tmp))
    return results


def _reason_group(why: str) -> str:
    """A refusal's kind, for the table's summary: its reason up to the specifics."""
    if "forward also uses" in why:
        return "a forward reads something the pipeline does not apply"
    if "lists of layers" in why:
        return "its layers are not one list of its base model"
    return re.split(r" \(|:|,", why)[0]


def render(results: dict[str, str | None]) -> str:
    """docs/families.md: one row per model type."""
    supported = sorted(t for t, why in results.items() if why is None)
    groups = Counter(_reason_group(why) for why in results.values() if why is not None)
    lines = [
        "# Model families: every causal LM of transformers 5.24",
        "",
        "Generated by `python -m bench.family_sweep` from the equality proof over every model type transformers maps",
        f"to a causal LM ({len(results)}): {len(supported)} supported, {len(results) - len(supported)} not. A",
        "supported type's tiny random model (its config class's defaults, 2 layers, one layer of each attention kind)",
        "computes in the pipeline what transformers computes: logits, loss, every gradient, causality, packed",
        "documents, 2 stages against 1, export round trip (`tests/integration/test_family_sweep.py`). A checkpoint",
        "whose config switches on what the defaults leave off is judged again when it is loaded: any type or config",
        "the conversion cannot represent is refused by `models.architecture.discover` with the reason below",
        "(`models/family_verdict.py`). `tests/unit/test_family_table.py` fails when this table and the code disagree.",
        "",
        "Refused, by reason: " + "; ".join(f"{reason} ({n})" for reason, n in groups.most_common()) + ".",
        "",
        "| `model_type` | causal LM class | supported | why not (or what to know) |",
        "| --- | --- | --- | --- |",
    ]
    for model_type, why in results.items():
        cell, text = ("yes", NOTES.get(model_type, "")) if why is None else ("no", why.replace("|", "/"))
        lines.append(f"| `{model_type}` | `{TYPES[model_type]}` | {cell} | {text} |")
    return "\n".join(lines) + "\n"


_ROW = re.compile(r"^\| `([^`]+)` \| `[^`]+` \| (yes|no) \| (.*) \|$")


def read_table() -> dict[str, str | None]:
    """docs/families.md as `sweep` returned it: model_type -> None (supported) or the reason ('|' written '/')."""
    rows = [_ROW.match(line) for line in FAMILIES_DOC.read_text().splitlines()]
    found = [(m[1], None if m[2] == "yes" else m[3]) for m in rows if m]  # a supported row's text is a note
    if len(found) != len(dict(found)):
        raise ValueError(f"{FAMILIES_DOC} has a model type twice: regenerate it with python -m bench.family_sweep")
    return dict(found)


def readme_line(results: dict[str, str | None]) -> str:
    """The README's family list: the supported types of the table, in its order."""
    supported = [f"`{t}`" for t, why in results.items() if why is None]
    return (
        f"{len(supported)} of the {len(results)} model types transformers 5.24 maps to a causal LM: "
        + ", ".join(supported)
        + "."
    )


def write_readme(results: dict[str, str | None]) -> None:
    """Replace the line after README_MARK by `readme_line`."""
    lines = README.read_text().splitlines()
    lines[lines.index(README_MARK) + 1] = readme_line(results)
    README.write_text("\n".join(lines) + "\n")


def main() -> None:
    from tests.conftest import one_rank_group  # noqa: F401 (documents the need: a one-rank process group)
    from train.distributed.setup import init_distributed

    init_distributed()
    start = time.time()
    results = sweep()
    FAMILIES_DOC.write_text(render(results))
    write_readme(results)
    print(f"{sum(v is None for v in results.values())}/{len(results)} supported; {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
