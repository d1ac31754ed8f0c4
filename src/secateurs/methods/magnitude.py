"""Magnitude pruning: remove the weights of smallest absolute value (Han et al., 2015).

Classic choices of comparison group are all offered: per output row, per layer (default, as in the
reference implementation), or global across every pruned layer.  A threshold mode prunes every
``|w| < t`` instead of a fixed fraction.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..patterns import zero_where_
from .base import InputStats, LayerTarget, Method, register


@register("magnitude")
class Magnitude(Method):
    needs = "none"
    default_group = "layer"
    help = {"threshold": "prune every |w| < threshold instead of a fraction"}

    def __init__(self, threshold: "float | None" = None):
        if threshold is not None and threshold < 0:
            raise ConfigError(f"magnitude threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.meets_target = threshold is None

    def scores(self, W: torch.Tensor, stats: InputStats) -> torch.Tensor:
        return W.abs()

    @torch.no_grad()
    def prune(self, W: torch.Tensor, stats: InputStats, target: LayerTarget) -> torch.Tensor:
        if self.threshold is None:
            return super().prune(W, stats, target)
        mask = W.abs() < self.threshold
        zero_where_(W, mask)
        return mask
