"""Every supported family computes, in the pipeline, exactly what its Hugging Face model computes.

Each case is a tiny random model built from transformers' own config class (4 layers; norm weights and
biases moved off their 1/0 initialisation), saved with `save_pretrained` and loaded into a one-stage
pipeline: logits, loss and every parameter's gradient equal HF's, attention is causal, and
HF -> pipeline checkpoint -> HF is the identity.
"""

import json

import deepspeed
import pytest
import torch
from deepspeed.pipe import PipelineModule
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from models.architecture import discover
from models.hf_weights import load_hf_weights, pipeline_param_to_hf
from models.loss import IGNORE_INDEX, next_token_cross_entropy
from models.pipeline import build_pipeline
from tests.cases import (
    CASES,
    FAMILY_CASES,
    FAMILY_IDS,
    SEQ,
    VOCAB,
    assert_gradients_equal,
    experts,
    hf_model,
    load_case_weights,
    row_exact_experts,
)
from tests.helpers import write_ds_config
from train.checkpoint.checkpointer import save_checkpoint
from train.export import export_checkpoint


@pytest.fixture(scope="module", params=FAMILY_CASES, ids=FAMILY_IDS)
def pair(request, tmp_path_factory, one_rank_group):
    family, _, settings = request.param
    hf = hf_model(family, settings)
    folder = tmp_path_factory.mktemp(family) / "hf"
    hf.save_pretrained(folder)
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    load_case_weights(pipe, folder, arch)
    return hf, pipe.eval(), arch, folder


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A mixture of experts' routers (`...TopKRouter` / `...TopkRouter`: (logits, weights, expert indices))."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]


def test_every_required_family_is_covered():
    required = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox"}
    required |= {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss", "glm4_moe"}
    assert required <= {family for family, _, _ in FAMILY_CASES}
    for family, _, settings in FAMILY_CASES:  # the code's verdict (models/family_verdict.py) accepts every case
        discover(CONFIG_MAPPING[family](**settings))


def test_logits_and_loss_equal_hf(pair):
    hf, pipe, _, _ = pair
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = pipe(ids), hf(ids, labels=ids)
    assert (ours - theirs.logits).abs().max().item() <= 1e-5
    assert next_token_cross_entropy(ours, ids).item() == pytest.approx(theirs.loss.item(), abs=1e-5)


def test_every_gradient_equals_hf(pair):
    hf, pipe, arch, _ = pair
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    hf.zero_grad()
    pipe.zero_grad()
    hf(ids, labels=ids).loss.backward()
    next_token_cross_entropy(pipe(ids), ids).backward()
    assert_gradients_equal(hf, pipe, arch, rel=1e-5)


def test_experts_run_as_hf_runs_them_and_routers_spread_tokens(pair):
    """The pipeline's experts use the implementation transformers picks for the device (grouped_mm on CPU), as the
    HF reference does; every MoE layer's random router sends the tokens to most experts (else the gradients of
    unused experts are zero, and a test of equal routing would prove little)."""
    hf, pipe, _, _ = pair
    if not routers(hf):  # a dense model: no experts to check
        assert not routers(pipe)
        return
    implementations = {m.config._experts_implementation for m in experts(pipe)}
    assert implementations == {hf.config._experts_implementation} == {"grouped_mm"}
    chosen = []
    hooks = [r.register_forward_hook(lambda m, i, out: chosen.append((m, out[2]))) for r in routers(pipe)]
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pipe(ids)
    for hook in hooks:
        hook.remove()
    assert len(chosen) == len(routers(hf)) > 0
    for router, picked in chosen:
        experts_count = router.weight.shape[0]
        assert len(picked.unique()) > experts_count // 2, f"{type(router).__name__} chose only {picked.unique()}"


def test_attention_is_causal(pair):
    _, pipe, _, _ = pair
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 7) % VOCAB
    with torch.no_grad(), row_exact_experts(pipe):
        a, b = pipe(ids), pipe(changed)
    assert torch.equal(a[:, :15], b[:, :15]), "a later token changed an earlier position's logits"
    assert not torch.equal(a[:, 15:], b[:, 15:])


def test_hf_to_pipeline_to_hf_is_the_identity(pair, tmp_path):
    """Through the real path: DeepSpeed's engine saves the checkpoint, `train.export` writes the HF folder."""
    hf, _, arch, folder = pair
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    load_hf_weights(pipe, folder, arch)
    ds_config = json.loads(write_ds_config(tmp_path / "ds.json").read_text().replace('"auto"', "10"))
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=ds_config)
    save_checkpoint(engine, tmp_path / "ckpt", 0, client_state={}, model_config=hf.config, keep_last=0)
    out = export_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    before, after = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert (reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight) == arch.tied
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, hf(ids).logits)


def test_pipeline_names_map_one_to_one_onto_hf(pair):
    hf, pipe, arch, _ = pair
    mapped = [pipeline_param_to_hf(arch, name) for name, _ in pipe.named_parameters()]
    hf_names = {name for name, _ in hf.named_parameters()}  # a tied head's weight is the embedding's
    assert len(mapped) == len(set(mapped)) and set(mapped) == hf_names
    # Persistent buffers (DeepSeek's e_score_correction_bias) are the layer's state too: checkpoints carry them.
    state = [pipeline_param_to_hf(arch, name) for name in pipe.state_dict()]
    buffers = set(hf.state_dict()) - {name for name, _ in hf.named_parameters(remove_duplicate=False)}
    assert len(state) == len(set(state)) and set(state) == hf_names | buffers


def test_rotary_frequencies_stay_fp32_when_the_model_is_cast_to_bf16(one_rank_group):
    """DeepSpeed casts the whole module to bf16; a bf16 `inv_freq` would blur positions (8 mantissa bits)."""
    family, _, settings = CASES[1]
    arch = discover(CONFIG_MAPPING[family](**settings))
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ)
    expected = pipe.forward_funcs[1].rotary.inv_freq.clone()
    pipe.to(torch.bfloat16)
    layer = pipe.forward_funcs[1]
    assert layer.layer.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert layer.rotary.inv_freq.dtype == torch.float32 and torch.equal(layer.rotary.inv_freq, expected)
    hidden = torch.randn(2, SEQ, arch.hidden_size, dtype=torch.bfloat16)
    assert layer((hidden, torch.arange(SEQ).expand(2, SEQ)))[0].dtype == torch.bfloat16


def test_layer_parameter_counts_equal_what_deepspeed_counts_by_building_every_layer(pair):
    """Our `parameters`-partition counts come from the meta model; DeepSpeed's own method builds each layer."""
    _, pipe, arch, _ = pair
    assert pipe._count_layer_params() == PipelineModule._count_layer_params(pipe) == arch.layer_parameters()


def test_one_layer_order_gives_specs_names_flops_and_counts_that_agree_with_deepspeed(pair):
    """`Architecture.pipeline_layers` is the only list of layers: DeepSpeed's module built from the specs has one
    layer per entry, of the entry's class, holding the entry's HF modules under their HF keys, with its count."""
    from models.architecture import DECODER, HEAD, TIED_HEAD
    from models.flops import layer_flops
    from models.pipeline import LAYER_CLASSES, EmbeddingPipe, layer_specs
    from train.planning.memory_model import layer_names

    hf, pipe, arch, _ = pair
    layers = arch.pipeline_layers()
    specs = layer_specs(arch)
    assert [spec.typename for spec in specs] == [LAYER_CLASSES[layer.kind] for layer in layers]
    assert pipe.stage_layer_names() == layer_names(arch)  # one stage: every layer, as the planner names them
    assert len(layer_flops(arch, SEQ)) == len(layers)
    computing = {DECODER, HEAD, TIED_HEAD}  # the others get only a token weight for partitioning
    small = 1e-3 * layer_flops(arch, SEQ)[1]
    assert [f > small for f in layer_flops(arch, SEQ)] == [layer.kind in computing for layer in layers]
    hf_params = dict(hf.named_parameters())
    mapped = []
    for index, (layer, built) in enumerate(zip(layers, pipe.forward_funcs, strict=True)):
        if layer.kind == TIED_HEAD:  # DeepSpeed calls the first layer's module again: nothing of its own
            assert built.func is EmbeddingPipe.tied_head and built.args[0] is pipe.forward_funcs[0]
            continue
        for name, param in built.named_parameters():
            key = layer.hf_key(name)
            assert key.startswith(layer.modules) and hf_params[key].shape == param.shape, (index, name, key)
            mapped.append(key)
    assert sorted(mapped) == sorted(hf_params)  # every HF weight once (a tied head's is the embedding's)
    assert pipe._count_layer_params() == PipelineModule._count_layer_params(pipe) == arch.layer_parameters()


DOCUMENTS = [7, 3, 9, 5]  # lengths of the documents packed into one SEQ-token block


def packed_block(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One block of several random documents: (input_ids, position_ids), each [1, SEQ], and the documents."""
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(0, VOCAB, (n,), generator=generator) for n in DOCUMENTS]
    positions = torch.cat([torch.arange(n) for n in DOCUMENTS])
    assert len(positions) == SEQ
    return torch.cat(documents)[None], positions[None], documents


def test_document_attention_computes_each_packed_document_as_hf_does_alone(pair):
    """The loss of a packed block under document attention is the token-weighted mean of each document's HF loss
    alone (its positions from 0, and the first token of each document no target); causal attention differs."""
    hf, pipe, _, _ = pair
    ids, positions, documents = packed_block(4)
    labels = ids.masked_fill(positions == 0, IGNORE_INDEX)  # as train/data/batches.py labels text
    with torch.no_grad():
        document = next_token_cross_entropy(pipe((ids, positions)), labels).item()
        causal = next_token_cross_entropy(pipe(ids), labels).item()
        alone = sum(hf(d[None], labels=d[None]).loss.item() * (len(d) - 1) for d in documents)
    expected = alone / sum(len(d) - 1 for d in documents)
    assert document == pytest.approx(expected, abs=1e-5)
    assert abs(causal - expected) > 1e-3, "causal attention gave the per-document loss: the mask is not applied"


def test_document_attention_isolates_documents_and_is_causal(pair):
    """Changing a token of one document moves no logit of the other documents nor of its own earlier tokens."""
    _, pipe, _, _ = pair
    ids, positions, _ = packed_block(5)
    second = slice(DOCUMENTS[0], DOCUMENTS[0] + DOCUMENTS[1])
    changed = ids.clone()
    changed[0, second.start + 1] = (changed[0, second.start + 1] + 11) % VOCAB  # the second document's 2nd token
    with torch.no_grad(), row_exact_experts(pipe):
        a, b = pipe((ids, positions)), pipe((changed, positions))
    moved = (a - b).abs().amax(dim=-1)[0] > 0
    assert moved[second.start + 1 : second.stop].any(), "the changed token moved nothing"
    assert not moved[: second.start + 1].any(), "an earlier token or an earlier document saw the change"
    assert not moved[second.stop :].any(), "a later document attended across its boundary"
