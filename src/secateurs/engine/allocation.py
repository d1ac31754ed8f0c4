"""The allocation step: how a config's target sparsity is spread over the layers it prunes.

An allocation hands every layer its target.  It runs when the statistics it needs exist:

* ``uniform`` needs none: each layer gets the config's sparsity, or that of the last ``layer_sparsity``
  rule matching it, when the plan is made, before any block is walked.
* ``global`` needs every layer's scores: the walk only scores (on the dense model's activations), and after
  the last block one ranking of all the scores (or tiles) chooses every mask; layers then differ in sparsity
  and only the mean is the target.

A statistics-driven allocation (OWL: each block's target from the outlier ratio of its activations) is a
third kind: targets fixed per block once that block's statistics are in, before it is pruned.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..patterns import Pattern, expand_tiles, lowest_k_mask, tile_scores


class Allocation:
    """Spread ``config``'s sparsity over the layers.  ``ranks``: masks come from one ranking after the walk."""

    name: ClassVar[str] = ""
    ranks: ClassVar[bool] = False

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


ALLOCATIONS: dict[str, Allocation] = {a.name: a for a in (Uniform(), GlobalRanking())}


def allocation_of(config) -> Allocation:
    return ALLOCATIONS[config.allocation]
