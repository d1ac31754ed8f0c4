"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv:2306.11695).

The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``: its magnitude times the L2 norm of input
channel ``j`` over the calibration tokens.  The paper compares scores within each output row, which
is the default here.  No weight update.
"""

from __future__ import annotations

import torch

from .base import InputStats, Method, register


@register("wanda")
class Wanda(Method):
    needs = "norms"
    default_group = "row"
    row_local = True

    def scores(self, W: torch.Tensor, stats: InputStats) -> torch.Tensor:
        # (out, in) * (1, in): the norm broadcasts along the output rows
        return W.abs().mul_(stats.sq_norms.sqrt().unsqueeze(0))
