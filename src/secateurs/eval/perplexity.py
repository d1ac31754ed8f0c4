"""Perplexity over streamed windows: never holds more than one batch of windows' logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import eval_windows, load_text, tokenize
from ..data.text import bos_id


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, n_context: int) -> tuple[float, int]:
    """Summed next-token NLL of one batch of windows ``(B, L)``, scoring targets after ``n_context``."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    logits = model(input_ids, use_cache=False).logits  # (B, L, V) -- one batch only
    return _nll(logits, input_ids, n_context)


def _nll(logits: torch.Tensor, input_ids: torch.Tensor, n_context: int) -> tuple[float, int]:
    shift = logits[:, max(n_context - 1, 0) : -1].float()
    targets = input_ids[:, max(n_context, 1) :]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


def window_groups(model, tokenizer, config, ids: "torch.Tensor | None") -> list:
    """The evaluation's batches as ``(windows (B, L), n_context)`` groups, in the order they are scored: the
    windows of a batch share their context length, except the very first window (which scores everything)."""
    from ..config import check_seqlen, check_token_ids

    check_seqlen(model, config.seqlen, "eval seqlen")
    if ids is None:
        ids = tokenize(tokenizer, load_text(config.data, "test"))
    check_token_ids(model, ids, "evaluation text")
    bos = bos_id(tokenizer) if tokenizer is not None else None
    if bos is not None and len(ids) and ids[0] == bos:
        ids = ids[1:]  # every window gets its own BOS instead
    windows = eval_windows(ids, config.seqlen, config.windows, config.stride, bos=bos)
    batches = [windows[i : i + config.batch_size] for i in range(0, len(windows), config.batch_size)]
    return [(torch.cat([w for w, c in batch if c == ctx]), ctx)
            for batch in batches for ctx in sorted({c for _, c in batch})]


@torch.no_grad()
def perplexity(model, tokenizer=None, config=None, ids: "torch.Tensor | None" = None, tracker=None) -> float:
    """exp(mean NLL over all scored tokens) of ``config.data`` (test split), windows of ``config.seqlen``."""
    from ..config import EvalConfig

    groups = _share(window_groups(model, tokenizer, config or EvalConfig(), ids))
    was_training = model.training
    model.eval()
    losses = [window_nll(model, windows, ctx)
              for windows, ctx in (tracker.bar(groups, unit="batch") if tracker is not None else groups)]
    model.train(was_training)
    return _perplexity(losses)


def _share(groups: list) -> list:
    """This process's share of the evaluation batches (all of them unless torchrun started several)."""
    from ..engine.distributed import current

    return [groups[k] for k in current().share(len(groups))]


def _perplexity(losses: list) -> float:
    """exp(mean NLL) from every process's ``(summed NLL, tokens)`` per batch, added in batch order."""
    from ..engine.distributed import current

    total, count = 0.0, 0
    for nll, n in current().gather(losses):
        total += nll
        count += n
    return math.exp(total / count)


@torch.no_grad()
def perplexity_streamed(model, source, tokenizer=None, config=None, ids: "torch.Tensor | None" = None,
                        tracker=None) -> float:
    """:func:`perplexity` of a model whose blocks ``source`` reads from disk as they are needed (a
    :class:`~..models.stream.BlockStream`): every window goes through one block at a time, their hidden states
    waiting on the CPU, then through the final norm and LM head one batch at a time.  The same operations on
    the same values as the in-memory forward, so the same figure."""
    from ..config import EvalConfig
    from ..engine.capture import capture_inputs, outputs_given
    from ..engine.walk import walk_blocks
    from ..models.arch import find_blocks
    from ..progress import Tracker

    groups = _share(window_groups(model, tokenizer, config or EvalConfig(), ids))
    blocks_name, blocks = find_blocks(model)
    hidden, calls = [], [[] for _ in blocks]
    with source.outside_blocks():
        for windows, _ in groups:  # one capture per batch: its windows, its context length
            h, c = capture_inputs(model, blocks, windows, len(windows))
            hidden += h
            for per_block, call in zip(calls, c):
                per_block += call
    final = walk_blocks(blocks, blocks_name, hidden, calls, torch.device("cpu"), lambda step: step.run(),
                        tracker or Tracker(show=False), source=source)
    losses = []
    with source.outside_blocks(output=True):
        for b, (windows, ctx) in enumerate(groups):
            with outputs_given(blocks, final[b], [per_block[b] for per_block in calls]):
                losses.append(window_nll(model, windows, ctx))
    return _perplexity(losses)
