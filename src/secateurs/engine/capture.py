"""Capture what every decoder block receives, without running the blocks.

Each block's ``forward`` is swapped (on the instance, so attributes such as ``attention_type`` stay
readable) for a recorder that stores the call's positional and keyword arguments *as they are* --
rotary embeddings, masks, position ids, whatever this architecture passes -- and hands the hidden
states straight on.  The last recorder raises :class:`StopForward`, so neither the blocks nor the final
norm and LM head run.  Recording per block matters: some models (Gemma 3, Qwen 2 with sliding windows)
give different layers different masks and rotary tables.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ArchitectureError


class StopForward(Exception):
    """Raised inside a forward pass to end it once what we came for has been recorded."""


@dataclass
class BlockCall:
    """One block call with the hidden states taken out: ``block(*args, **kwargs)`` with
    ``args[hidden_pos]`` (or ``kwargs['hidden_states']`` when ``hidden_pos`` is None) set to the input."""

    args: tuple
    kwargs: dict
    hidden_pos: "int | None"
    returns_tuple: bool = False  # learnt from the first real call: does the block return (hidden, ...)?
    tokens: "torch.Tensor | None" = None  # (batch, seq) bool: the real tokens of a padded batch; None: all are

    def call(self, block: nn.Module, hidden: torch.Tensor, device: torch.device):
        args = tuple(to_device(a, device) for a in self.args)
        kwargs = {k: to_device(v, device) for k, v in self.kwargs.items()}
        if self.hidden_pos is None:
            kwargs["hidden_states"] = hidden
        else:
            args = args[: self.hidden_pos] + (hidden,) + args[self.hidden_pos + 1 :]
        out = block(*args, **kwargs)
        self.returns_tuple = isinstance(out, (tuple, list))
        return out[0] if self.returns_tuple else out


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``; leave everything else alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def real_tokens(x: torch.Tensor, tokens: "torch.Tensor | None") -> torch.Tensor:
    """The entries of ``x`` (batch, seq, ...) at a padded batch's real ``tokens`` (batch, seq), as (tokens, ...);
    ``x`` itself where nothing is padded.  (Per-token values flattened to (batch * seq,) take flattened tokens.)"""
    if tokens is None or x.shape[: tokens.dim()] != tokens.shape:
        return x
    return x[tokens.to(x.device)]


def padding_of(model: nn.Module, input_ids: torch.Tensor) -> "torch.Tensor | None":
    """The attention mask of an encoder's padded calibration rows (``input_ids != pad_token_id``): one example
    per row, padded to the longest with the pad token (see :func:`~secateurs.data.labelled.calibration_examples`).
    None for rows without padding and for a causal LM, whose calibration is windows of running text."""
    from ..models.arch import head_of

    pad = getattr(model.config, "pad_token_id", None)
    if pad is None or head_of(model) == "causal" or not bool((input_ids == pad).any()):
        return None
    return (input_ids != pad).long()


def _split_hidden(args: tuple, kwargs: dict):
    if args:
        return args[0], BlockCall((None,) + tuple(args[1:]), dict(kwargs), 0)
    if "hidden_states" in kwargs:
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], BlockCall((), rest, None)
    raise ArchitectureError("cannot find the hidden states in the block's arguments")


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int):
    """Run the embeddings over ``input_ids`` (N, L) in batches.

    Returns ``hidden`` -- a list of (B, L, H) CPU tensors, the first block's inputs per batch -- and
    ``calls[i][b]``, the :class:`BlockCall` of block ``i`` for batch ``b``.  An encoder's padded rows
    (:func:`padding_of`) are run with their attention mask, and each call records the batch's real tokens.
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    last = len(blocks) - 1
    mask = padding_of(model, input_ids)
    batch: dict = {}  # the batch being run, if padded: its real tokens

    def recorder(index: int):
        def forward(*args, **kwargs):
            h, call = _split_hidden(args, kwargs)
            call.tokens = batch.get("tokens")
            calls[index].append(call)
            if index == 0:
                hidden.append(h.detach().to("cpu"))
            if index == last:
                raise StopForward
            return h

        return forward

    device = next(model.parameters()).device
    use_cache = getattr(model.config, "use_cache", None)  # some models read the config, not the argument
    # an encoder (DistilBERT, a classifier) has no cache to turn off
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        if use_cache is not None:
            model.config.use_cache = False
        for start in range(0, len(input_ids), batch_size):
            extra = {}
            if mask is not None:  # padded rows: masked in attention, and every call records their real tokens
                batch["tokens"] = mask[start : start + batch_size].bool()
                extra = {"attention_mask": mask[start : start + batch_size].to(device)}
            try:
                model(input_ids[start : start + batch_size].to(device), **no_cache, **extra)
            except StopForward:
                pass
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        for block in blocks:
            del block.forward  # the class's forward is visible again
    if len(hidden) != math.ceil(len(input_ids) / batch_size) or any(len(c) != len(hidden) for c in calls):
        raise ArchitectureError("the model did not call every block once per batch; cannot calibrate it layer by layer")
    return hidden, calls


@contextmanager
def outputs_given(blocks: nn.ModuleList, output: torch.Tensor, calls: list):
    """While inside, a forward of the model skips its blocks: each passes its input on and the last returns
    ``output`` (as each block returns it, learnt from ``calls[i]``, one :class:`BlockCall` per block), so the
    model's own code runs the embeddings, then the final norm and LM head on a final state computed elsewhere
    (a streamed walk)."""
    last = len(blocks) - 1

    def skip(i: int):
        def forward(*args, **kwargs):
            h, _ = _split_hidden(args, kwargs)
            out = output.to(h.device) if i == last else h
            return (out,) if calls[i].returns_tuple else out

        return forward

    for i, block in enumerate(blocks):
        block.forward = skip(i)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
