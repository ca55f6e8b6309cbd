"""Validation loss and text samples, with the pipeline engine's own forward-only schedule."""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from datasets import Dataset
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine
from transformers import PreTrainedTokenizerBase

from models.deepspeed_internals import clear_eval_outputs, forward_only_micro_batches, loss_stage_global_rank
from models.loss import IGNORE_INDEX
from train.config.args import EVALUATION_SAMPLES_UP_TO, SAMPLE_TOKENS
from train.config.ds_config import BatchLayout
from train.data.batches import eval_steps
from train.distributed.setup import say
from train.observe.expert_load import ExpertLoad
from train.observe.metrics import eval_metrics
from train.planning.schedules import fewest_micro_batches


def evaluate(
    engine: PipelineEngine,
    blocks: Dataset,
    *,
    micro_batch_size: int,
    num_micro_batches: int,
    n_blocks: int,
    document_attention: bool,
    key_offset: int = 0,
) -> float:
    """Mean next-token loss over the first `n_blocks` validation blocks (a multiple of one global batch).

    `eval_batch` averages its micro-batches and the data-parallel replicas. For text every step has the
    same number of equal-length blocks, so the mean of steps is the mean over blocks; for masked data each
    step is the mean over its answer tokens, and the steps are weighted by them.
    """
    dp_rank, dp_size = engine.grid.data_parallel_id, engine.grid.data_parallel_size
    steps = eval_steps(
        blocks,
        micro_batch_size=micro_batch_size,
        num_micro_batches=num_micro_batches,
        dp_rank=dp_rank,
        dp_size=dp_size,
        max_blocks=n_blocks,
        document_attention=document_attention,
        key_offset=key_offset,
    )
    losses = [engine.eval_batch(iter(micro_batches)).item() * weight for micro_batches, weight in steps]
    return sum(losses) / sum(weight for _, weight in steps)


@torch.no_grad()
def sample_through_pipeline(
    engine: PipelineEngine,
    tokenizer,
    prompts: list[list[int]],
    new_tokens: int,
    seq_len: int,
    seed: int,
    top_k: int = 50,
    temperature: float = 0.8,
) -> list[str]:
    """One sample per prompt (token ids; as many prompts as a micro-batch holds), decoded by the pipeline itself.

    Every new token is one forward-only pass of a fixed (micro_batch_size, seq_len) block, so the
    engine's activation buffers keep their training shape (the positions 0..S-1 of one sequence per row beside
    the tokens); the loss stage samples and broadcasts the tokens to the other stages. Causal attention makes
    the padding after each row invisible. DualPipeV runs no fewer than 2 x ranks micro-batches: the block is
    repeated (and costs about twice 1F1B's one micro-batch, spread over both phases).
    """
    rows = torch.arange(len(prompts))
    block = torch.full((len(prompts), seq_len), tokenizer.eos_token_id, dtype=torch.long)
    prompts = [prompt[: seq_len - 1] or [tokenizer.eos_token_id] for prompt in prompts]
    for row, prompt in enumerate(prompts):
        block[row, : len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(prompt) for prompt in prompts])
    positions = torch.arange(seq_len).expand_as(block).contiguous()
    device = get_accelerator().current_device_name()
    loss_stage = loss_stage_global_rank(engine)
    copies = fewest_micro_batches(engine.module.SCHEDULE, engine.num_stages)  # DualPipeV: 2 x ranks; the first used
    generator = torch.Generator().manual_seed(seed)
    for _ in range(min(new_tokens, seq_len - int(lengths.max()))):
        clear_eval_outputs(engine)
        with forward_only_micro_batches(engine, copies):
            out = engine.eval_batch(
                iter([((block, positions), block)] * copies),
                compute_loss=False,
                reduce_output=None,
                bcast_loss=False,
                num_micro_batches=copies,
            )
        next_ids = torch.zeros(len(prompts), dtype=torch.long, device=device)
        if engine.is_last_stage():
            first = out[0] if torch.is_tensor(out[0]) else out[0][0]  # [logits, P, C] with the router loss
            logits = first[rows, lengths - 1].float().cpu() / temperature
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            next_ids.copy_(torch.multinomial(probs, 1, generator=generator).squeeze(1))
        dist.broadcast(next_ids, src=loss_stage, group=engine.grid.get_pipe_parallel_group())
        block[rows, lengths] = next_ids.cpu()
        lengths += 1
    clear_eval_outputs(engine)
    return [tokenizer.decode(row[:length]) for row, length in zip(block, lengths.tolist(), strict=True)]


def held_out_prompts(blocks: Dataset, count: int) -> list[list[int]]:
    """The prompts of the first `count` validation examples: each block's tokens before its first answer token
    (a block always starts with an example; a chat prompt ends with the template's generation prompt)."""
    prompts = []
    for row in blocks.select(range(min(count, len(blocks)))):
        labelled = (row["labels"] != IGNORE_INDEX).nonzero()
        prompts.append(row["input_ids"][: int(labelled[0]) if len(labelled) else 1].tolist())
    return (prompts * count)[:count]


def evaluation_sample_tokens(requested: int | None, parameters: int) -> int:
    """New tokens of the samples at every evaluation: `--sample-tokens`, or by default SAMPLE_TOKENS for models up
    to EVALUATION_SAMPLES_UP_TO parameters and none above (each token is a forward pass of the whole pipeline,
    without a KV cache: 40 of them cost 2-3 training steps of a 0.5B model), said in one line."""
    if requested is not None:
        return requested
    if parameters <= EVALUATION_SAMPLES_UP_TO:
        return SAMPLE_TOKENS
    say(
        f"no samples at evaluations for a model of {parameters / 1e6:,.0f}M parameters (over "
        f"{EVALUATION_SAMPLES_UP_TO / 1e6:.0f}M: each token costs a pipeline pass): --sample-tokens N turns them on; "
        "the export is sampled at the end"
    )
    return 0


class SampleLog(Protocol):
    """Where the samples of an evaluation go: a run's MetricsLog (samples.jsonl, W&B), or train.evaluate's
    results."""

    def samples(self, step: int, texts: list[str]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """What the samples at every evaluation continue, and how far."""

    tokenizer: PreTrainedTokenizerBase
    prompt: str | None  # the text samples continue; None: held-out prompts (instruction and chat data)
    tokens: int  # new tokens per sample
    seq_len: int  # the pipeline's fixed block length
    seed: int  # each evaluation samples from seed + step


class Evaluator:
    """Validation loss and text samples, every `interval` steps and at the last step."""

    def __init__(
        self,
        *,
        engine: PipelineEngine,
        blocks: Dataset,
        n_blocks: int,
        batch: BatchLayout,
        document_attention: bool,
        interval: int,
        sampling: Sampling,
        log: SampleLog,
        expert_load: ExpertLoad | None = None,
        key_offset: int = 0,  # preference data: the validation blocks' first reference key (train/preference/)
        perplexity: bool = True,  # `eval_ppl` beside `eval_loss` (not for preference data: DataFormat.perplexity)
    ):
        self.key_offset, self.perplexity = key_offset, perplexity
        self.engine, self.blocks, self.n_blocks, self.batch, self.log = engine, blocks, n_blocks, batch, log
        self.document_attention = document_attention
        self.interval, self.sampling = interval, sampling
        self.expert_load = expert_load  # a mixture of experts' (None for a dense model)
        if sampling.prompt is None:
            self.prompts = held_out_prompts(blocks, batch.micro_batch_size)
        else:
            prompt = sampling.tokenizer(sampling.prompt, add_special_tokens=False)["input_ids"]
            self.prompts = [prompt] * batch.micro_batch_size

    def should_evaluate(self, step: int, last_step: bool) -> bool:
        return last_step or step % self.interval == 0

    def evaluate(self, step: int) -> dict:
        """The validation metrics; the samples go to the log, a mixture of experts' load table to the console and
        its file."""
        batch, sampling = self.batch, self.sampling
        loss = evaluate(
            self.engine,
            self.blocks,
            micro_batch_size=batch.micro_batch_size,
            num_micro_batches=batch.num_micro_batches,
            n_blocks=self.n_blocks,
            document_attention=self.document_attention,
            key_offset=self.key_offset,
        )
        if sampling.tokens > 0:  # --sample-tokens 0: no samples
            samples = sample_through_pipeline(
                self.engine,
                sampling.tokenizer,
                prompts=self.prompts,
                new_tokens=sampling.tokens,
                seq_len=sampling.seq_len,
                seed=sampling.seed + step,
            )
            self.log.samples(step, samples[:3])
        if self.expert_load is not None:
            self.expert_load.evaluation(step)
        return eval_metrics(loss, self.perplexity)
