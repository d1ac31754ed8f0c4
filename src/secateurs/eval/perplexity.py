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
    shift = logits[:, max(n_context - 1, 0) : -1].float()
    targets = input_ids[:, max(n_context, 1) :]
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


@torch.no_grad()
def perplexity(model, tokenizer=None, config=None, ids: "torch.Tensor | None" = None, tracker=None) -> float:
    """exp(mean NLL over all scored tokens) of ``config.data`` (test split), windows of ``config.seqlen``."""
    from ..config import EvalConfig, check_seqlen, check_token_ids

    config = config or EvalConfig()
    check_seqlen(model, config.seqlen, "eval seqlen")
    if ids is None:
        ids = tokenize(tokenizer, load_text(config.data, "test"))
    check_token_ids(model, ids, "evaluation text")
    bos = bos_id(tokenizer) if tokenizer is not None else None
    if bos is not None and len(ids) and ids[0] == bos:
        ids = ids[1:]  # every window gets its own BOS instead
    windows = eval_windows(ids, config.seqlen, config.windows, config.stride, bos=bos)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = [windows[i : i + config.batch_size] for i in range(0, len(windows), config.batch_size)]
    it = tracker.bar(batches, unit="batch") if tracker is not None else batches
    for batch in it:
        # windows in one batch share n_context except the very first window (which scores everything)
        for ctx in sorted({c for _, c in batch}):
            group = torch.cat([w for w, c in batch if c == ctx])
            nll, n = window_nll(model, group, ctx)
            total += nll
            count += n
    model.train(was_training)
    return math.exp(total / count)
