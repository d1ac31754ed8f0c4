"""The allocation step: how a config's target sparsity is spread over the layers it prunes.

An allocation hands every layer its target.  It runs when the statistics it needs exist:

* ``uniform`` needs none: each layer gets the config's sparsity, or that of the last ``layer_sparsity``
  rule matching it, when the plan is made, before any block is walked.
* ``global`` needs every layer's scores: the walk only scores (on the dense model's activations), and after
  the last block one ranking of all the scores (or tiles) chooses every mask; layers then differ in sparsity
  and only the mean is the target.

* ``owl`` needs every block's statistics before any is pruned: a first walk of the dense model measures each
  block's outlier ratio, and every block's target is fixed from them before the pruning walk
  (:class:`OWL`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..patterns import Pattern, expand_tiles, lowest_k_mask, tile_scores


class Allocation:
    """Spread ``config``'s sparsity over the layers.  ``ranks``: masks come from one ranking after the walk."""

    name: ClassVar[str] = ""
    ranks: ClassVar[bool] = False
    first_walk: ClassVar[bool] = False  # targets come from a walk of the dense model before the pruning walk

    def target(self, config, name: str, block: "int | None") -> float:
        """The fraction of layer ``name`` (in block ``block``) to remove."""
        return config.sparsity_for(name, block)


class Uniform(Allocation):
    name = "uniform"


class GlobalRanking(Allocation):
    """One ranking across every layer; the config's sparsity is met over all of them together."""

    name = "global"
    ranks = True

    def target(self, config, name: str, block: "int | None") -> float:
        return config.resolved.sparsity  # the mean: single layers land above or below it

    @staticmethod
    def masks(scores: dict[str, torch.Tensor], pattern: Pattern, sparsity: float) -> dict[str, torch.Tensor]:
        """Prune the lowest ``sparsity`` fraction of all scores (or of all tiles' summed scores)."""
        b = pattern.block if pattern.kind == "block" else 1
        tiles = {n: tile_scores(s, b) if b > 1 else s for n, s in scores.items()}
        flat = torch.cat([t.reshape(-1) for t in tiles.values()]).unsqueeze(0)
        chosen = lowest_k_mask(flat, int(flat.numel() * sparsity))[0]
        masks, offset = {}, 0
        for n, t in tiles.items():
            m = chosen[offset : offset + t.numel()].view_as(t)
            masks[n] = expand_tiles(m, b) if b > 1 else m
            offset += t.numel()
        return masks


class OWL(Allocation):
    """Outlier-Weighed Layerwise sparsity (Yin et al., 2024, arXiv:2310.05175): blocks with more outliers keep more.

    For block ``l``, with Wanda's score ``A_ij = |W_ij| * ||X_j||_2`` over every weight of its pruned layers
    (on the dense model's activations), the outlier ratio is ``D_l = #{A > M * mean_l(A)} / #A``.  The ratios
    are stretched linearly onto ``[0, 2 lambda]``, ``x_l = 2 lambda (D_l - min D) / (max D - min D)``, and block
    ``l`` keeps ``1 - S + x_l - mean(x)``: its sparsity is ``S_l = S - x_l + mean(x)``, the mean over blocks is
    ``S`` exactly, and blocks differ by at most ``2 lambda``.  Defaults ``M = 5``, ``lambda = 0.08`` (the
    paper's LLaMA settings).  Every layer of a block gets its block's target.
    """

    name = "owl"
    first_walk = True
    M, LAMBDA = 5.0, 0.08

    @classmethod
    def outlier_ratio(cls, scores, m: float) -> float:
        """``D``: the fraction of a block's scores above ``m`` times their mean.  ``scores()`` yields them one
        layer at a time (twice: the mean first, then the count), so no block's scores are held at once."""
        total, count = 0.0, 0
        for s in scores():
            total += float(s.sum(dtype=torch.float64))
            count += s.numel()
        return sum(int((s > m * (total / count)).sum()) for s in scores()) / count

    @classmethod
    def sparsities(cls, ratios: list[float], sparsity: float, lam: float) -> list[float]:
        """Every block's target from its outlier ratio (see the class docstring)."""
        lo, hi = min(ratios), max(ratios)
        x = [0.0 if hi == lo else 2 * lam * (d - lo) / (hi - lo) for d in ratios]
        mean = sum(x) / len(x)
        return [sparsity - xi + mean for xi in x]


ALLOCATIONS: dict[str, Allocation] = {a.name: a for a in (Uniform(), GlobalRanking(), OWL())}


def allocation_of(config) -> Allocation:
    return ALLOCATIONS[config.allocation]
