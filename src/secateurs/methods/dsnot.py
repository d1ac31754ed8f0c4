"""DSnoT: mask refinement without training (Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning
for Sparse LLMs", ICLR 2024, arXiv:2310.08915).

A method has chosen which weights of ``W0`` (out, in) to remove and left ``W`` (its pruned, possibly updated
weights).  DSnoT swaps weights in and out of each row's kept set, one pair per cycle, so that the row's
*expected* output stays closer to the dense one, keeping the number of weights per row (and an N:M pattern):

    x̄_j = E[x_j],  Var_j = E[x_j^2] - x̄_j^2               over the calibration tokens, per input channel
    e_i = sum_j (W0_ij - W_ij) x̄_j                          row i's expected output shortfall, (out,)

* **grow** a pruned weight ``j`` (it gets its dense value back): ``e_i`` falls by ``W0_ij x̄_j``.  Among
  those whose change has the sign of ``e_i``, the one with the largest ``|W0_ij x̄_j| / Var_j^p`` (a large
  expected gain whose input varies little across tokens; ``p`` is ``var_power``, the paper's 1);
* **prune** a kept weight ``j`` (it becomes 0): ``e_i`` rises by ``W_ij x̄_j``.  Among those whose change has
  the sign opposite to ``e_i``, the one with the smallest Wanda score ``|W_ij| ||X_j||_2``.  With an N:M
  pattern it is taken from the grown weight's group of M, so that the group keeps N.

A row stops when ``|e_i| <= threshold`` (per token here; the engine passes the paper's 0.1 divided by the
calibration sequences' length, as its code sums the inputs over each sequence), when a list runs out, or after
``max_cycles`` (the paper's 50); with N:M also when a swap would flip the sign of ``e_i``.  ``Var`` is over all
calibration tokens (the paper's code averages each sequence's own variance: the same up to the spread of the
sequences' means).  Weights grown are never pruned again and weights pruned by a swap are never grown again.
No weight is updated beyond being zeroed or restored, so on Wanda's masks (which leave ``W = W0`` on the kept
set) this is the paper's algorithm; on SparseGPT's, ``e`` counts the update too.  Every row is its own problem:
all rows run together, one cycle at a time.  Which layers are refined is the engine's choice (``refine_scope``:
attention only by default, as the paper's code).
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from .base import InputStats

CYCLES = 50
THRESHOLD = 0.1
VAR_POWER = 1.0


def _ends(order: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Per row, ``order[r, hi[r]]`` where ``upper[r]`` else ``order[r, lo[r]]`` (indices clamped into the row)."""
    last = order.shape[1] - 1
    at = torch.where(upper, hi, lo).clamp(0, last)
    return order.gather(1, at.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def dsnot(W: torch.Tensor, W0: torch.Tensor, pruned: torch.Tensor, stats: InputStats, pattern: Pattern,
          max_cycles: int = CYCLES, threshold: float = THRESHOLD, var_power: float = VAR_POWER):
    """The refined ``(W, pruned)``: new tensors, with as many pruned weights in each row as ``pruned`` had.

    ``W`` (out, in) is the method's result, zero where ``pruned``; ``W0`` the dense weights; ``stats`` gives
    ``tokens``, ``sums (in,)`` and ``sq_norms (in,)``; ``pattern`` is unstructured or N:M.
    """
    rows, width = W.shape
    n = max(stats.tokens, 1)
    mean = stats.sums.to(W) / n
    var = (stats.sq_norms.to(W) / n - mean * mean).clamp_min(0)
    W, pruned = W.clone(), pruned.clone()
    gain = W0 * mean  # growing j lowers e by gain_j
    cost = W * mean  # pruning kept j raises e by cost_j
    e = ((W0 - W) * mean).sum(1)
    sign0 = torch.sign(e)
    r = torch.arange(rows, device=W.device)

    # growing: the pruned weights by gain / Var^p, ascending; the ends hold the largest of either sign
    live = pruned & (var > 0)
    key = torch.where(live, gain / var.pow(var_power).clamp_min(torch.finfo(W.dtype).tiny), torch.zeros_like(W))
    grow_order = key.argsort(dim=1, stable=True)
    g_lo = torch.zeros(rows, dtype=torch.long, device=W.device)
    g_hi = torch.full_like(g_lo, width - 1)

    wanda = W.abs() * stats.sq_norms.to(W).sqrt()
    nm = pattern.kind == "nm"
    if nm:
        prunable = ~pruned  # kept at the start and not yet swapped out
    else:  # pruning: two lists of the kept weights by Wanda score, ascending -- those that lower e, those that raise it
        inf = torch.full_like(W, float("inf"))
        lowers = torch.where(~pruned & (cost < 0), wanda, inf)
        raises = torch.where(~pruned & (cost > 0), wanda, inf)
        lower_order, raise_order = lowers.argsort(dim=1, stable=True), raises.argsort(dim=1, stable=True)
        p_lo, p_hi = torch.zeros_like(g_lo), torch.zeros_like(g_lo)  # next of each list

    active = e.abs() > threshold
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        up = e > 0  # shortfall: grow a weight that adds output, prune one that takes it away
        g = _ends(grow_order, g_lo, g_hi, up)
        grow_ok = live[r, g] & (torch.sign(key[r, g]) == torch.sign(e)) & (g_lo <= g_hi)
        if nm:
            first = g - g % pattern.m
            group = first.unsqueeze(1) + torch.arange(pattern.m, device=W.device)
            candidates = torch.where(prunable.gather(1, group), wanda.gather(1, group), float("inf"))
            best, at = candidates.min(1)
            p = first + at
            prune_ok = torch.isfinite(best)
        else:
            p_low = lower_order[r, p_lo.clamp(max=width - 1)]
            p_high = raise_order[r, p_hi.clamp(max=width - 1)]
            p = torch.where(up, p_low, p_high)
            prune_ok = torch.where(up, (p_lo < width) & torch.isfinite(lowers[r, p_low]),
                                   (p_hi < width) & torch.isfinite(raises[r, p_high]))
        after = e + cost[r, p] - gain[r, g]
        swap = active & grow_ok & prune_ok
        if nm:
            swap &= torch.sign(after) == sign0
        rs, gs, ps = r[swap], g[swap], p[swap]
        W[rs, ps] = 0
        W[rs, gs] = W0[rs, gs]
        pruned[rs, ps] = True
        pruned[rs, gs] = False
        live[rs, gs] = False
        e = torch.where(swap, after, e)
        g_hi = torch.where(swap & up, g_hi - 1, g_hi)
        g_lo = torch.where(swap & ~up, g_lo + 1, g_lo)
        if nm:
            prunable[rs, ps] = False
        else:
            p_lo = torch.where(swap & up, p_lo + 1, p_lo)
            p_hi = torch.where(swap & ~up, p_hi + 1, p_hi)
        active = swap & (e.abs() > threshold)
    return W, pruned
