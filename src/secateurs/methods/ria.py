"""RIA: Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024).

A weight matters relative to the other weights of its row (the output it feeds) *and* of its column (the input
it reads), and in proportion to how large that input runs.  For ``W`` of shape ``(out, in)``::

    RIA_ij = ( |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik| ) * ||X_j||_2 ** a

where ``||X_j||_2`` is the L2 norm of input channel ``j`` over the calibration tokens and ``a`` (the option
``norm_power``, default 0.5, the paper's) tempers the activations.  Like Wanda, the scores compete within each
output row and no weight is updated.

**Channel permutation** (``permute``, N:M only).  An N:M pattern keeps N of every M *consecutive* inputs, so
two important channels that fall in one group compete needlessly.  Reordering the input channels first (a
permutation ``p`` of ``0 .. in-1``; group ``g`` is the channels ``p[gM : gM+M]``) lets each group hold a mix.
The order is chosen to maximise the score the N:M mask keeps, ``sum_rows sum_g topN(S[r, p[gM : gM+M]])``:

1. *heuristic channel reallocation*: channels sorted by their summed score are dealt into M equal chunks,
   chunk ``c`` filling slot ``c`` of the groups, every other chunk in reverse (the weakest of one chunk meets
   the strongest of the next);
2. *linear sum assignment*, once per slot ``c``: every group ``g`` keeps its other M-1 channels and may take
   any group's slot-``c`` channel ``k``.  With ``o`` the other channels' scores of row ``r`` and ``o_(N)`` the
   N-th largest of them, the kept score is ``topN(o) + max(0, S[r, k] - o_(N))``; summed over the rows it
   fills a ``(G, G)`` matrix whose maximum-weight assignment (``scipy.optimize.linear_sum_assignment``) is
   the best exchange of slot-``c`` channels.  Keeping the current order is one assignment, so no round
   loses score; the search starts from the better of the given order and step 1's.

The mask is N:M in the permuted order and stored in the weight's own order, so the pruned model computes what
it did before and loads anywhere; the order travels in the prune's records (``LayerRecord.order``) and the
compressed sparse checkpoint stores each such weight as ``n:m`` groups of ``W[:, p]`` beside ``p``, the layout
an N:M kernel reads after gathering its input ``x[p]``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..patterns import Pattern, nm_mask, zero_where_
from .base import InputStats, LayerTarget, Method, Pruned, register


@register("ria")
class RIA(Method):
    needs = "norms"
    default_group = "row"
    help = {"norm_power": "exponent a of the input norms (the paper's 0.5; 1 weighs them as Wanda does)",
            "permute": "N:M only: reorder each layer's input channels so that its N:M groups keep more score "
                       "(heuristic reallocation, then a linear sum assignment per slot)"}

    def __init__(self, norm_power: float = 0.5, permute: bool = False):
        if not 0 <= norm_power <= 2:
            raise ConfigError(f"ria norm_power must be in [0, 2], got {norm_power}")
        self.norm_power = norm_power
        self.permute = permute

    def check_pattern(self, pattern: Pattern) -> None:
        if self.permute and pattern.kind != "nm":
            raise ConfigError(f"ria permute reorders input channels for N:M groups; pattern {pattern} has none: "
                              "drop --permute or use an N:M pattern (2:4)")

    def scores(self, W: torch.Tensor, stats: InputStats) -> torch.Tensor:
        A = W.abs()
        relative = A / A.sum(dim=0, keepdim=True).clamp_min(1e-30) + A / A.sum(dim=1, keepdim=True).clamp_min(1e-30)
        # (out, in) * (1, in): the tempered norm broadcasts along the output rows
        return relative.mul_(stats.sq_norms.sqrt().pow(self.norm_power).unsqueeze(0))

    @torch.no_grad()
    def prune(self, W: torch.Tensor, stats: InputStats, target: LayerTarget):
        if not self.permute:
            return super().prune(W, stats, target)
        n, m = target.pattern.n, target.pattern.m
        S = self.scores(W, stats)
        order = channel_order(S, n, m)
        mask = torch.empty_like(S, dtype=torch.bool)
        mask[:, order] = nm_mask(S[:, order], n, m)
        zero_where_(W, mask)
        return Pruned(mask, order=order)


def kept_score(S: torch.Tensor, n: int, m: int) -> float:
    """The score an N:M mask of ``S`` (out, in) keeps: each row's N largest of every M consecutive."""
    return float(S.reshape(S.shape[0], -1, m).topk(n, dim=-1).values.sum(dtype=torch.float64))


def reallocated(S: torch.Tensor, m: int) -> torch.Tensor:
    """Step 1, heuristic channel reallocation: the order whose slot ``c`` holds the ``c``-th of M chunks of the
    channels sorted by summed score, odd chunks reversed."""
    ranked = S.sum(dim=0).argsort(stable=True)
    groups = len(ranked) // m
    order = torch.empty_like(ranked)
    for c in range(m):
        chunk = ranked[c * groups:(c + 1) * groups]
        order[c::m] = chunk.flip(0) if c % 2 else chunk
    return order


def exchange_slot(S: torch.Tensor, order: torch.Tensor, n: int, m: int, c: int) -> torch.Tensor:
    """Step 2 for slot ``c``: the order after the best exchange of the groups' slot-``c`` channels."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = S.shape
    G = cols // m
    P = S[:, order].reshape(rows, G, m)
    others = torch.cat([P[..., :c], P[..., c + 1:]], dim=-1)  # (rows, G, m-1)
    top = others.topk(n, dim=-1).values  # (rows, G, n), largest first
    base, nth = top.sum(dim=(0, 2), dtype=torch.float64), top[..., -1]  # (G,), (rows, G)
    candidates = P[..., c]  # (rows, G): group k's slot-c channel
    # value[g, k] = base[g] + sum_r max(0, x_rk - t_rg), with max(0, a) = (a + |a|) / 2: the sums of |x_rk - t_rg|
    # are the L1 distances between the columns, which cdist computes without a (rows, G, G) temporary
    distance = torch.cdist(nth.t().contiguous(), candidates.t().contiguous(), p=1).double()  # (G, G)
    gain = (candidates.sum(0, dtype=torch.float64)[None, :] - nth.sum(0, dtype=torch.float64)[:, None] + distance) / 2
    _, taken = linear_sum_assignment((base[:, None] + gain).numpy(), maximize=True)
    slots = order.view(G, m).clone()
    slots[:, c] = order.view(G, m)[torch.from_numpy(taken), c]
    return slots.reshape(-1)


def channel_order(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """RIA's channel permutation for scores ``S`` (out, in): the input order (int64, ``(in,)``) whose N:M groups
    keep at least as much score as the given order does."""
    starts = [torch.arange(S.shape[1]), reallocated(S, m)]  # the given order wins a tie
    order, kept = max(((o, kept_score(S[:, o], n, m)) for o in starts), key=lambda start: start[1])
    for c in range(m):
        tried = exchange_slot(S, order, n, m, c)
        if (score := kept_score(S[:, tried], n, m)) > kept:  # float32 distances: keep only a true gain
            order, kept = tried, score
    return order
