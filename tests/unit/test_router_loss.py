"""The router (load-balancing) loss through the pipeline equals what the HF model adds to its loss.

Each MoE case of tests/cases.py with `output_router_logits=True` and a coefficient of 0.3: the one-stage pipeline's
loss is `AutoModelForCausalLM(ids, labels=ids).loss` and every gradient (routers included) is HF's; the same when
the layers are cut into stages by hand, as DeepSpeed runs them (received tensors detached, their gradients sent
back); and a DeepSpeed engine's `train_batch` reports the mean of HF's per-micro-batch losses.
"""

import json
from types import SimpleNamespace

import deepspeed
import pytest
import torch
from transformers import CONFIG_MAPPING

from models.architecture import discover
from models.hf_weights import pipeline_param_to_hf
from models.pipeline import build_pipeline
from tests.cases import MOE_CASES, SEQ, VOCAB, assert_gradients_equal, hf_model
from tests.helpers import write_ds_config
from train.config.args import parse_args
from train.config.run_config import model_config_from_flags
from train.observe.evaluate import sample_through_pipeline
from train.observe.metrics import StepMeter
from train.planning.activations import saved_bytes

COEF = 0.3
WITH_LOSS = [case for case in MOE_CASES if case[0] in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")]
WITHOUT_LOSS = [case for case in MOE_CASES if case not in WITH_LOSS]  # DeepSeek-V2/V3, GLM-4.5: HF adds none


def pair(family: str, settings: dict):
    """The HF model with its router loss on (training mode, as a run) and a one-stage pipeline with its weights."""
    hf = hf_model(family, dict(settings, output_router_logits=True, router_aux_loss_coef=COEF)).train()
    arch = discover(hf.config)
    pipe = build_pipeline(arch, num_stages=1, seq_len=SEQ).train()
    theirs = hf.state_dict()
    with torch.no_grad():
        for name, tensor in pipe.state_dict(keep_vars=True).items():
            tensor.copy_(theirs[pipeline_param_to_hf(arch, name)])
    return hf, pipe, arch


def staged_loss(pipe, ids: torch.Tensor, cut: int) -> torch.Tensor:
    """The loss with the layers cut into two stages after layer `cut`, as DeepSpeed runs them: the second stage's
    float inputs are fresh leaves that require a gradient, which backward hands to the first stage's outputs."""
    layers = pipe.forward_funcs
    sent = ids
    for layer in layers[:cut]:
        sent = layer(sent)
    received = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in sent)
    out = received
    for layer in layers[cut:]:
        out = layer(out)
    loss = pipe.loss_fn(out, ids)
    loss.backward()
    floats = [(s, r.grad) for s, r in zip(sent, received, strict=True) if r.is_floating_point()]
    assert all(grad is not None for _, grad in floats), "a received float tensor got no gradient"
    torch.autograd.backward([s for s, _ in floats], [grad for _, grad in floats])
    return loss.detach()


@pytest.mark.parametrize("case", WITH_LOSS, ids=[c[0] for c in WITH_LOSS])
def test_loss_and_every_gradient_equal_hf_with_the_router_loss(case, one_rank_group):
    family, _, settings = case
    hf, pipe, arch = pair(family, settings)
    assert arch.router_loss is not None and arch.router_loss.coef == COEF
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    theirs = hf(ids, labels=ids)
    theirs.loss.backward()
    ours = pipe.loss_fn(pipe(ids), ids)
    ours.backward()
    assert abs(ours.item() - theirs.loss.item()) <= 1e-5
    assert abs(pipe.loss_fn.aux_loss.item() - theirs.aux_loss.item()) <= 1e-6
    assert theirs.aux_loss.item() > 1.0  # E x sum(f x P) is 1 for perfect balance: the term is really there
    assert_gradients_equal(hf, pipe, arch, rel=1e-4)


@pytest.mark.parametrize("cut", [2, 3])
def test_the_router_sums_cross_stages_with_their_gradient(cut, one_rank_group):
    """Qwen3-MoE's layers 0 and 2 are dense: cut after the embedding and layer 0 the first stage holds no router
    (its P must still get a gradient back), cut after layer 1 the router gradient of layer 1 depends on layer 3."""
    family, _, settings = next(c for c in WITH_LOSS if c[0] == "qwen3_moe")
    hf, pipe, arch = pair(family, settings)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    theirs = hf(ids, labels=ids).loss
    theirs.backward()
    assert abs(staged_loss(pipe, ids, cut).item() - theirs.item()) <= 1e-5
    assert_gradients_equal(hf, pipe, arch, rel=1e-4)


@pytest.mark.parametrize("case", WITHOUT_LOSS, ids=[c[0] for c in WITHOUT_LOSS])
def test_families_without_a_router_loss_ignore_output_router_logits(case, one_rank_group):
    family, _, settings = case
    hf, pipe, arch = pair(family, settings)
    assert arch.router_loss is None
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert abs(pipe.loss_fn(pipe(ids), ids).item() - hf(ids, labels=ids).loss.item()) <= 1e-5


def test_train_batch_reports_the_mean_of_hf_per_micro_batch_losses(tmp_path, one_rank_group):
    """The router loss averages over each micro-batch's tokens (1F1B runs a micro-batch's backward before it sees
    the next): a step's loss is the mean of what the HF model gives on each micro-batch."""
    family, _, settings = next(c for c in WITH_LOSS if c[0] == "mixtral")
    hf, pipe, _ = pair(family, settings)
    ds_config = json.loads(write_ds_config(tmp_path / "ds.json", 6, 2).read_text().replace('"auto"', "10"))
    engine, _, _, _ = deepspeed.initialize(model=pipe, model_parameters=list(pipe.parameters()), config=ds_config)
    micro_batches = [(ids, ids) for ids in torch.randint(0, VOCAB, (3, 2, SEQ)).unbind()]
    with torch.no_grad():
        theirs = [hf(ids, labels=ids) for ids, _ in micro_batches]
    meter = StepMeter(
        engine=engine, global_batch=6, seq_len=SEQ, flops_per_token=1.0, peak_tflops=None, memory_before_model=0
    )
    meter.begin_step()
    losses = [engine.train_batch(data_iter=iter(micro_batches)).item()]
    assert abs(losses[0] - sum(out.loss.item() for out in theirs) / 3) <= 1e-5
    # The metric: the step's aux term (before its coefficient), the mean over its micro-batches.
    assert abs(meter.aux_loss() - sum(out.aux_loss.item() for out in theirs) / 3) <= 1e-6
    losses += [engine.train_batch(data_iter=iter(micro_batches)).item() for _ in range(3)]
    assert losses[-1] < losses[0]  # the same batch each step; warm-up: steps 1-2 at lr 0
    # Sampling reads the logits out of the (logits, P, C) the last layer gives with the router loss.
    tokenizer = SimpleNamespace(eos_token_id=0, decode=lambda ids: ids.tolist())
    (sample,) = sample_through_pipeline(engine, tokenizer, [[5, 6, 7]], new_tokens=3, seq_len=SEQ, seed=0)
    assert sample[:3] == [5, 6, 7] and len(sample) == 6


def test_the_flag_turns_the_router_loss_on_with_its_coefficient(tmp_path):
    family, _, settings = next(c for c in WITH_LOSS if c[0] == "olmoe")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": family, **settings}))
    flags = parse_args(["--model-config", str(config), "--router-aux-loss-coef", "0.02", "--data", "x"])
    router_loss = discover(model_config_from_flags(flags, VOCAB)).router_loss
    assert router_loss is not None and router_loss.coef == 0.02 and router_loss.moe_layers == 4
    assert discover(model_config_from_flags(parse_args(["--model-config", str(config)]), VOCAB)).router_loss is None


def test_the_planner_measures_a_layer_that_carries_the_router_sums():
    """The activation estimate runs a real narrow decoder layer: with the router loss on it takes four tensors."""
    family, _, settings = next(c for c in WITH_LOSS if c[0] == "qwen2_moe")
    without = discover(CONFIG_MAPPING[family](**settings))
    with_loss = discover(CONFIG_MAPPING[family](**settings, output_router_logits=True))
    assert with_loss.router_loss is not None
    assert saved_bytes(with_loss, "fp32").micro_batch(64) >= saved_bytes(without, "fp32").micro_batch(64) > 0
