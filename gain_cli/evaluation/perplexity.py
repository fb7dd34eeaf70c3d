"""Token-weighted validation perplexity on fixed packed blocks.

PPL = exp( sum of next-token NLL over every predicted token of every block / number of predicted tokens ).
Each block of B tokens predicts B-1 tokens. Under several processes each evaluates a strided shard
of the blocks and the (NLL sum, token count) pairs are summed across processes, so the result
equals the single-process one (a sharded model runs the same number of forwards on every process, padded with
dummy batches). The NLL sum of every block is kept too (``PplResult.block_nll``, in the
blocks' order on every process): confidence intervals bootstrap over them (``gain_cli.reporting.uncertainty``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gain_cli.evaluation.harness import model_device
from gain_cli.models.compiling import maybe_compile
from gain_cli.models.kv_cache import no_kv_cache
from gain_cli.training.sharding import is_sharded


@dataclass
class PplResult:
    nll_sum: float
    tokens: int
    block_nll: list[float] = field(default_factory=list)  # NLL sum of each block, in the blocks' order

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def block_nll(model, ids: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token NLL, shape (batch, block-1), in fp32."""
    device = ids.device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        logits = model(input_ids=ids).logits
    # The last position predicts nothing: score every position with an ignored target there instead of slicing
    # the logits (a [:, :-1] slice of the (batch, block, vocab) logits would be copied once more before the loss).
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none",
                          ignore_index=-100)
    return nll.view(ids.shape)[:, :-1]


def _sharded(model) -> bool:
    return is_sharded(model)


def no_grad_for(model):
    """``inference_mode`` (FSDP's all-gathers write into buffers that an inference tensor cannot be: ``no_grad``
    for a sharded model)."""
    return torch.no_grad() if _sharded(model) else torch.inference_mode()


def evaluate_blocks(model, blocks: torch.Tensor, batch_size: int, accelerator=None,
                    autocast_dtype: torch.dtype | None = None, compile: bool = False) -> PplResult:
    """Token-weighted NLL of ``blocks``; with ``compile`` the forward is ``torch.compile``d and a short last batch
    is filled up with copies of the last block (scored, then dropped) so that every forward has one shape."""
    with no_grad_for(model):
        return _evaluate_blocks(model, blocks, batch_size, accelerator, autocast_dtype, compile)


def _evaluate_blocks(model, blocks, batch_size, accelerator, autocast_dtype, compile) -> PplResult:
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    shard = blocks[rank::world]
    device = model_device(model)
    forward = maybe_compile(model, compile, device, "eval.compile")
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    per_block = torch.zeros(blocks.shape[0], dtype=torch.float64, device=device)  # this process's blocks filled in
    n_real = shard.shape[0]
    if compile and n_real:
        # one shape for every forward; built here (an inference tensor) for every sweep, so that dynamo's guards
        # on the input also never tell the batches of two sweeps apart
        shard = torch.cat([shard, shard[-1:].expand(-n_real % batch_size, -1)])
    # Sharded (FSDP) every forward is a collective: every process runs as many as the one with the most blocks,
    # the missing ones on a dummy batch whose result is dropped (an uneven last batch must not hang the others)
    largest_shard = math.ceil(blocks.shape[0] / world) if world > 1 and _sharded(model) else shard.shape[0]
    n_forwards = math.ceil(largest_shard / batch_size)
    with no_kv_cache(model):
        for i in range(n_forwards):
            start = i * batch_size
            if start >= shard.shape[0]:  # dummy forward, nothing scored
                block_nll(forward, blocks[:1].to(device), autocast_dtype)
                continue
            ids = shard[start:start + batch_size].to(device)
            per_token = block_nll(forward, ids, autocast_dtype)[: n_real - start]
            sums = per_token.double().sum(dim=1)
            nll += sums.sum()
            count += per_token.numel()
            first = rank + start * world  # shard row i is block rank + i * world
            per_block[first: first + world * sums.shape[0]: world] = sums
    if world > 1:
        nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
        per_block = accelerator.reduce(per_block, "sum")
    model.train(was_training)
    return PplResult(float(nll), int(count), [float(x) for x in per_block.cpu()])


def forward_tokens_per_s(model, blocks: torch.Tensor) -> float:
    """Tokens per second of one timed forward of ``blocks`` (after a one-row warm-up): what a run's time estimate
    and its ``auto`` compile decision start from."""
    import time

    with no_grad_for(model):
        model(input_ids=blocks[:1])  # warm-up
        t0 = time.perf_counter()
        model(input_ids=blocks)
        return blocks.numel() / max(time.perf_counter() - t0, 1e-9)
