"""RIA: Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024).

A weight matters relative to the other weights of its row (the output it feeds) *and* of its column (the input
it reads), and in proportion to how large that input runs.  For ``W`` of shape ``(out, in)``::

    RIA_ij = ( |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik| ) * ||X_j||_2 ** a

where ``||X_j||_2`` is the L2 norm of input channel ``j`` over the calibration tokens and ``a`` (the option
``norm_power``, default 0.5, the paper's) tempers the activations.  Like Wanda, the scores compete within each output row and no weight is
updated.  (The paper's channel permutation for N:M is not here yet.)
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import InputStats, Method, register


@register("ria")
class RIA(Method):
    needs = "norms"
    default_group = "row"
    help = {"norm_power": "exponent a of the input norms (the paper's 0.5; 1 weighs them as Wanda does)"}

    def __init__(self, norm_power: float = 0.5):
        if not 0 <= norm_power <= 2:
            raise ConfigError(f"ria norm_power must be in [0, 2], got {norm_power}")
        self.norm_power = norm_power

    def scores(self, W: torch.Tensor, stats: InputStats) -> torch.Tensor:
        A = W.abs()
        relative = A / A.sum(dim=0, keepdim=True).clamp_min(1e-30) + A / A.sum(dim=1, keepdim=True).clamp_min(1e-30)
        # (out, in) * (1, in): the tempered norm broadcasts along the output rows
        return relative.mul_(stats.sq_norms.sqrt().pow(self.norm_power).unsqueeze(0))
