"""Masks that stay put through training, and masks that follow a schedule (gradual magnitude pruning).

A :class:`Masks` holds one boolean tensor per weight (``True`` = pruned) and re-zeroes those weights.
Zeroing *after every optimizer step* is what keeps them exactly zero whatever the optimizer does: AdamW's
momentum would revive them, weight decay would not, gradient clipping and accumulation change nothing of it,
and with mixed precision the step that finally changes the fp32 weights is still ``optimizer.step``.
Three ways to use it:

* ``masks.apply(model)`` -- call it yourself after ``optimizer.step()``;
* ``with masks.attached(optimizer): ...`` -- a post-step hook on the optimizer does it;
* ``MaskCallback(masks)`` -- the same for a Hugging Face ``Trainer``.

:class:`GradualPruner` updates the masks on a :class:`~.schedules.Schedule`: at each update step the lowest-|w|
survivors are added so that every layer's measured sparsity equals the schedule's value.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError
from ..models.arch import find_blocks, find_linears, weight_of
from ..models.experts import is_fused
from ..patterns import Pattern, build_mask, zero_where_
from .schedules import Schedule, increment


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear inside the decoder blocks (embeddings and LM head excluded), by qualified name."""
    name, blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        out.update(find_linears(block, f"{name}.{i}."))
    return out


def fused_experts(model: nn.Module) -> dict[str, nn.Parameter]:
    """The fused experts parameters (``...experts.gate_up_proj``, ``down_proj``) of a mixture of experts'
    blocks, by qualified name: pruned through views (:mod:`..models.experts`), held here as they are."""
    name, blocks = find_blocks(model)
    return {f"{name}.{i}.{n}.{param}": getattr(m, param) for i, block in enumerate(blocks)
            for n, m in block.named_modules() if is_fused(m) for param in ("gate_up_proj", "down_proj")}


class Masks:
    """One boolean prune mask per linear weight (``(out, in)`` orientation), re-applied on demand."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    @classmethod
    def from_zeros(cls, model: nn.Module, names: "list[str] | None" = None) -> "Masks":
        """Freeze the zeros a model has now (e.g. after one-shot pruning): of every linear in the blocks (or of
        ``names``), and, without ``names``, of a mixture of experts' fused experts, held by parameter name."""
        linears = prunable_linears(model)
        masks = {n: weight_of(m) == 0 for n, m in linears.items() if names is None or n in names}
        if names is None:
            masks.update({n: p.data == 0 for n, p in fused_experts(model).items() if not bool(p.data.all())})
        return cls(masks)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            # a linear by module name, or a mixture of experts' fused experts by parameter name
            W = weight_of(modules[name]) if name in modules else model.get_parameter(name).data
            zero_where_(W, mask.to(W.device))

    @contextlib.contextmanager
    def attached(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """Inside the block, every ``optimizer.step()`` is followed by :meth:`apply`."""
        handle = optimizer.register_step_post_hook(lambda *_: self.apply(model))
        try:
            yield self
        finally:
            handle.remove()

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0

    def state_dict(self) -> dict:
        return {n: m.cpu() for n, m in self.masks.items()}


def measured_sparsity(model: nn.Module, names) -> float:
    """Zeros / total over the named linears' weights, counted from the weights themselves."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        module = modules[n]
        W = weight_of(getattr(module, "base", module))  # a LoRA wrapper's frozen base holds the weights
        zeros += W.numel() - int(torch.count_nonzero(W))
        total += W.numel()
    return zeros / total


class GradualPruner:
    """Gradual magnitude pruning: the masks grow on a schedule, and stay put between updates.

    At an update step with target ``s'`` and current ``s``, :func:`~.schedules.increment` of the survivors
    with the lowest ``|w|`` are pruned in every layer (per output row with ``group="row"``): weights pruned
    before score ``-inf`` and stay pruned, so the layer's sparsity becomes ``s'`` up to rounding.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, pattern: str = "unstructured", group: str = "layer"):
        self.schedule = schedule
        self.pattern = Pattern.parse(pattern)
        if self.pattern.kind == "nm":
            raise ConfigError("gradual pruning grows an unstructured or block mask; N:M has one sparsity only "
                             "(use a oneshot schedule)")
        self.group = group
        self.linears = prunable_linears(model)
        self.masks = Masks({n: torch.zeros_like(weight_of(m), dtype=torch.bool) for n, m in self.linears.items()})
        self.current = 0.0

    @torch.no_grad()
    def step(self, step: int) -> "float | None":
        """Update the masks if ``step`` is an update step and the target grew; return the new target or None."""
        target = self.schedule(step)
        if not self.schedule.is_update_step(step) or target <= self.current:
            return None
        for name, module in self.linears.items():
            W = weight_of(module)
            scores = W.abs().float().masked_fill(self.masks.masks[name], float("-inf"))
            self.masks.masks[name] = build_mask(scores, self.pattern, target, self.group)
            zero_where_(W, self.masks.masks[name])
        self.current = target
        return target

    def fraction_of_survivors(self, step: int) -> float:
        """What the next update removes of the remaining weights (for logs)."""
        return increment(self.current, self.schedule(step))
