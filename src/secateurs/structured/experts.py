"""Removing whole experts from a mixture of experts (``--method experts``), keeping it loadable.

Each block's experts are scored on the calibration tokens, then the lowest-scored ones are deleted: their
slices of the fused ``gate_up_proj`` / ``down_proj``, their rows of the router (and of its bias and score
correction, where the family has them), and the config's expert count, so that plain transformers builds the
smaller model.  The same number of experts goes from every block (a config holds one count).

Scores (``--score``), for expert ``j`` over the calibration tokens ``X_j`` its router sent it, with routing
weight ``g_j(t)`` and output ``f_j(t)`` (before the routing weight):

* ``reap`` (default) -- Router-weighted Expert Activation Pruning (Lasby et al., 2025, arXiv:2510.13999):
  ``S_j = (1 / |X_j|) * sum_{t in X_j} g_j(t) * ||f_j(t)||_2``, how much the expert adds to the block's output
  where it is used; 0 for an expert no token reached;
* ``frequency`` -- ``|X_j|``, how often it is chosen (the classic baseline).

Like channels and heads, blocks are walked in order: each is scored on the activations of the blocks already
cut, then cut, and its outputs recomputed for the next.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..engine.capture import capture_inputs
from ..engine.walk import IN_MEMORY, BlockVisit, InMemory, walk_blocks
from ..errors import ConfigError
from ..models.arch import find_blocks
from ..models.experts import conceal, expose, is_fused
from ..progress import Stage, Tracker

log = logging.getLogger(__name__)

COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")  # a config's expert count


def moe_layers(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(experts, router)`` of every mixture of experts in ``block``: fused experts in the standard layout, and
    the module beside them that routes to them (``gate`` or ``router``, one weight row per expert)."""
    out = []
    for module in block.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not is_fused(experts):
            continue
        n = experts.gate_up_proj.shape[0]
        found = [child for name, child in module.named_children() if name in ("gate", "router")
                 and isinstance(getattr(child, "weight", None), torch.Tensor) and child.weight.shape[0] == n]
        if len(found) == 1:
            out.append((experts, found[0]))
    return out


def check_experts(model: nn.Module, config) -> tuple[int, int]:
    """``(experts per block, how many each loses)``; :class:`ConfigError` for a model without experts, a count
    that removes every expert or leaves fewer than top-k, or one the router's expert groups cannot divide."""
    _, blocks = find_blocks(model)
    layers = [layer for block in blocks for layer in moe_layers(block)]
    if not layers:
        raise ConfigError(f"--method experts removes experts of a mixture of experts; {type(model).__name__} has "
                          "none secateurs can remove (fused experts in transformers' standard layout, with a router)")
    sizes = {experts.gate_up_proj.shape[0] for experts, _ in layers}
    if len(sizes) != 1:
        raise ConfigError(f"the blocks hold different numbers of experts ({sorted(sizes)}): one config count "
                          "cannot describe them after removal")
    n = sizes.pop()
    count = config.count if config.count is not None else round(config.ratio * n)
    top_k = getattr(model.config, "num_experts_per_tok", None) or 1
    if count < 1:
        raise ConfigError(f"--ratio {config.ratio} of {n} experts removes none")
    if n - count < top_k:
        raise ConfigError(f"removing {count} of {n} experts per block leaves {n - count}, fewer than the "
                          f"{top_k} each token is routed to (num_experts_per_tok)")
    groups = getattr(model.config, "n_group", None) or 1
    if (n - count) % groups:
        raise ConfigError(f"{n - count} experts cannot be split into the router's {groups} groups (n_group)")
    if not any(getattr(model.config, f, None) == n for f in COUNT_FIELDS):
        raise ConfigError(f"{type(model).__name__}'s config names its expert count in no field secateurs knows "
                          f"({', '.join(COUNT_FIELDS)})")
    return n, count


class ExpertObserver:
    """Forward hooks on the ``down_proj`` views of exposed experts (:func:`~..models.experts.expose`): expert
    ``j``'s view reads ``g_j(t) h_t`` (the routing weight applied before it), so the norm of each output row
    is ``g_j(t) ||f_j(t)||`` (routing weights are never negative); the hooks add up those norms and count the
    rows, every expert's routed tokens."""

    def __init__(self, experts: nn.Module):
        n = experts.gate_up_proj.shape[0]
        self.tokens = torch.zeros(n, dtype=torch.long)
        self.weighted_norm = torch.zeros(n, dtype=torch.float64)
        self.handles = [getattr(experts, str(j)).down_proj.register_forward_hook(self.hook(j)) for j in range(n)]

    def hook(self, j: int):
        def add(module, args, out):
            self.tokens[j] += out.shape[0]
            self.weighted_norm[j] += float(out.float().norm(dim=-1).sum())
        return add

    def scores(self, score: str) -> torch.Tensor:
        if score == "frequency":
            return self.tokens.double()
        return self.weighted_norm / self.tokens.clamp_min(1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def keep_experts(experts: nn.Module, router: nn.Module, keep: list) -> None:
    """Keep experts ``keep`` (sorted): their fused slices, their router rows (bias and score correction too),
    and every expert count the modules hold."""
    n = experts.gate_up_proj.shape[0]
    index = torch.tensor(keep)
    for module, names in ((experts, ("gate_up_proj", "down_proj")), (router, ("weight", "bias", "e_score_correction_bias"))):
        for name in names:
            value = getattr(module, name, None)
            if not isinstance(value, torch.Tensor) or value.shape[0] != n:
                continue
            kept = value.data.index_select(0, index.to(value.device)).clone()
            if isinstance(value, nn.Parameter):
                setattr(module, name, nn.Parameter(kept, requires_grad=value.requires_grad))
            else:
                module.register_buffer(name, kept)
    for module in (experts, router):
        for sub in module.modules():
            for name in ("num_experts", "num_local_experts", "n_routed_experts"):
                if getattr(sub, name, None) == n:
                    setattr(sub, name, len(keep))


@torch.no_grad()
def prune_experts(model: nn.Module, config, input_ids: torch.Tensor, tracker: Tracker,
                  source: InMemory = IN_MEMORY) -> tuple:
    """Remove ``config.count`` (or ``config.ratio`` of the) experts from every mixture of experts, by the
    score ``config.score_name``.  Returns ``(records, None)``: one record per block with experts."""
    from .engine import StructuredRecord
    from .surgery import check_loadable

    n, count = check_experts(model, config)
    blocks_name, blocks = find_blocks(model)
    tracker.enter(Stage.CALIBRATING)
    with source.outside_blocks():
        hidden, calls = capture_inputs(model, blocks, input_ids, config.batch_size)
    records = []

    def visit(step: BlockVisit):
        layers = moe_layers(step.block)
        if not layers:
            return None
        expose(step.block)  # each expert's matrices as views, run on its routed tokens (checked on the first call)
        observers = [ExpertObserver(experts) for experts, _ in layers]
        try:
            step.run(keep=False)
        finally:
            for o in observers:
                o.remove()
            conceal(step.block)
        step.describe(Stage.PRUNING)
        for (experts, router), o in zip(layers, observers):
            scores = o.scores(config.score_name)
            # the highest scores stay; among equal scores the lower index (a stable sort)
            keep = sorted(torch.sort(scores, descending=True, stable=True).indices[: n - count].tolist())
            removed = sorted(set(range(n)) - set(keep))
            keep_experts(experts, router, keep)
            records.append(StructuredRecord(step.index, "experts", n, len(keep), removed))
            if not int(o.tokens.sum()):
                log.warning("block %d: no calibration token reached its experts", step.index)
        return None  # the walk runs the cut block for the next one's inputs

    walk_blocks(blocks, blocks_name, hidden, calls, torch.device(config.device), visit, tracker, source=source)
    field = next(f for f in COUNT_FIELDS if getattr(model.config, f, None) == n)
    setattr(model.config, field, n - count)
    check_loadable(model, None)
    return records, None
