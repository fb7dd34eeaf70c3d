"""Token-weighted validation perplexity on fixed packed blocks.

PPL = exp( sum of next-token NLL over every predicted token of every block / number of predicted tokens ).
Each block of B tokens predicts B-1 tokens. Under several processes each evaluates a strided shard
of the blocks and the (NLL sum, token count) pairs are summed across processes, so the result
equals the single-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gain_cli.evaluation.harness import model_device
from gain_cli.models.compiling import maybe_compile
from gain_cli.models.kv_cache import no_kv_cache


@dataclass
class PplResult:
    nll_sum: float
    tokens: int

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


@torch.inference_mode()
def evaluate_blocks(model, blocks: torch.Tensor, batch_size: int, accelerator=None,
                    autocast_dtype: torch.dtype | None = None, compile: bool = False) -> PplResult:
    """Token-weighted NLL of ``blocks``; with ``compile`` the forward is ``torch.compile``d and a short last batch
    is filled up with copies of the last block (scored, then dropped) so that every forward has one shape."""
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    shard = blocks[rank::world]
    device = model_device(model)
    forward = maybe_compile(model, compile, device, "eval.compile")
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    n_real = shard.shape[0]
    if compile and n_real:
        # one shape for every forward; built here (an inference tensor) for every sweep, so that dynamo's guards
        # on the input also never tell the batches of two sweeps apart
        shard = torch.cat([shard, shard[-1:].expand(-n_real % batch_size, -1)])
    with no_kv_cache(model):
        for start in range(0, shard.shape[0], batch_size):
            ids = shard[start:start + batch_size].to(device)
            per_token = block_nll(forward, ids, autocast_dtype)[: n_real - start]
            nll += per_token.double().sum()
            count += per_token.numel()
    if world > 1:
        nll, count = accelerator.reduce(nll, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    return PplResult(float(nll), int(count))
