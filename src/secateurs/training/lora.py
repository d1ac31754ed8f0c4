"""LoRA adapters that respect a sparsity mask, and a merge that leaves every zero in place.

A plain LoRA update ``W + s B A`` is dense: merging it would refill the pruned weights.  Here the update is
masked, ``W_eff = W + s (B A) * keep`` (``keep`` = not pruned), in the forward pass itself, so the model that
trains is exactly the model that is merged: :func:`merge_lora` adds the same masked update to ``W`` and the
pruned weights stay exactly 0 (0 + 0).  ``A`` starts Kaiming-uniform and ``B`` at zero (Hu et al., 2021), so
training starts from the pruned model's own outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.arch import weight_of
from .masks import prunable_linears


class LoRALinear(nn.Module):
    """``y = x (W + s (B A) * keep)^T + b`` with ``W`` frozen; ``A (r, in)``, ``B (out, r)``, ``s = alpha / r``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: "torch.Generator | None" = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        W = weight_of(base)
        out_features, in_features = W.shape
        A = torch.empty(rank, in_features, dtype=W.dtype)  # drawn on the CPU: the same values on any device
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(W.device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=W.dtype, device=W.device))
        self.scale = alpha / rank
        self.register_buffer("keep", W != 0, persistent=False)  # (out, in): the mask at wrapping time

    def delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale * self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight_of(self.base) + self.delta(), getattr(self.base, "bias", None))


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, seed: "int | None" = None) -> list[str]:
    """Freeze every parameter and wrap each decoder-block linear in a masked :class:`LoRALinear`.

    With ``seed`` the adapters' ``A`` are drawn from a generator of their own, so they do not depend on what
    else used torch's global RNG before (a resumed or iterated run starts them exactly as a fresh one)."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for p in model.parameters():
        p.requires_grad_(False)
    names = list(prunable_linears(model))
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, generator))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and unwrap it; returns how many were merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            W = weight_of(module.base)
            W.add_(module.delta().to(W.dtype))
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.base)
            merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged
