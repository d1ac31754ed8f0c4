"""Sparsity patterns as data, and the one mask builder that consumes them.

A pattern is parsed once from its string form and validated:

* ``"unstructured"`` -- any weight may be removed.
* ``"N:M"`` -- in every group of M consecutive weights along the *input* dimension of a weight
  matrix ``W`` of shape ``(out, in)``, **N weights are kept** (non-zero) and ``M - N`` are pruned.
  ``"2:4"`` keeps 2 of every 4, i.e. 50% sparsity, the layout NVIDIA's sparse tensor cores run.
* ``"block:B"`` -- ``B x B`` tiles of ``W`` are kept or removed whole.

Every mask here is boolean with ``True`` marking a weight to **prune**.  All selections break ties
deterministically: among equal scores the weight with the lower flat index is pruned first
(de-quantised checkpoints have many tied magnitudes, so this matters for reproducibility).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

__all__ = ["Pattern", "kth_smallest", "lowest_k_mask", "lowest_in_groups", "unstructured_mask", "nm_mask", "block_mask",
           "build_mask", "is_permutation", "check_nm", "check_tiles", "zero_where_"]

GROUPS = ("row", "layer", "global")


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern. ``kind`` is ``"unstructured"``, ``"nm"`` or ``"block"``."""

    kind: str
    n: int = 0  # N:M -- weights kept per group
    m: int = 0  # N:M -- group length along the input dimension
    block: int = 0  # block:B -- tile side

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        if isinstance(text, Pattern):
            return text
        s = str(text).strip().lower()
        if s == "unstructured":
            return cls("unstructured")
        if match := re.fullmatch(r"(\d+):(\d+)", s):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ConfigError(f"N:M pattern {text!r} needs 0 < N < M (N weights kept in every M)")
            return cls("nm", n=n, m=m)
        if match := re.fullmatch(r"block:(\d+)", s):
            b = int(match[1])
            if b < 1:
                raise ConfigError(f"block pattern {text!r} needs a tile side >= 1")
            return cls("block", block=b)
        raise ConfigError(f"unknown pattern {text!r}: use 'unstructured', 'N:M' (e.g. 2:4) or 'block:B'")

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block}"
        return "unstructured"

    @property
    def implied_sparsity(self) -> "float | None":
        """N:M fixes the sparsity at 1 - N/M; other patterns take it from the config."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    def validate_shape(self, out_features: int, in_features: int, name: str = "weight") -> None:
        """Raise a clear error when the pattern cannot tile a weight of this shape."""
        if self.kind == "nm" and in_features % self.m:
            raise ConfigError(f"{name}: input width {in_features} is not divisible by M={self.m} of pattern {self}")
        if self.kind == "block" and (out_features % self.block or in_features % self.block):
            raise ConfigError(
                f"{name}: block size {self.block} does not tile the weight of shape ({out_features}, {in_features})"
            )


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) of every row of ``scores`` (rows, cols), as ``(rows, 1)``.

    On the CPU this is NumPy's introselect (``np.partition``), which moves values only and is several
    times faster than ``torch.kthvalue``, which also tracks their indices; elsewhere, and for dtypes NumPy
    lacks (bfloat16), ``torch.kthvalue``.  Both return the same value.
    """
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) and len(scores):
        rows = max(1, _CHUNK // max(1, scores.shape[1]))  # a few rows at a time: one small copy, not the matrix's
        values = scores.detach().numpy()
        return torch.from_numpy(np.concatenate([np.partition(values[i : i + rows], k - 1, axis=1)[:, k - 1 : k]
                                                for i in range(0, values.shape[0], rows)]))
    return torch.kthvalue(scores, k, dim=1, keepdim=True).values


_CHUNK = 2**22  # values that kth_smallest partitions at once (16 MiB of float32)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` lowest entries of every row of ``scores`` (rows, cols); ties: lower index first.

    A selection of the k-th value instead of a full sort: exact count, deterministic, linear time per
    row.  Everything at or below the k-th value is marked; only rows where ties at that value make more
    than ``k`` are then trimmed, keeping the lowest-index tied entries.
    """
    cols = scores.shape[1]
    k = max(0, min(int(k), cols))
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    thresh = kth_smallest(scores, k)  # (rows, 1)
    mask = scores <= thresh  # at least k in every row (NaN aside): one total count tells if any row has more
    if int(torch.count_nonzero(mask)) != k * scores.shape[0]:  # ties at the threshold: redo just those rows
        rows = (torch.count_nonzero(mask, dim=1) > k).nonzero().squeeze(1)
        s, t = scores[rows], thresh[rows]
        below, ties = s < t, s == t
        need = k - torch.count_nonzero(below, dim=1)  # tied entries each row still takes
        mask[rows] = below | (ties & (ties.cumsum(1) <= need.unsqueeze(1)))
    return mask


_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type of each float width


def zero_where_(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W.masked_fill_(mask, 0)``, bit for bit, several times faster on a CPU.

    The weight's bits are multiplied, as integers of the same width, by 0 where ``mask`` is set and by 1
    elsewhere: pruned entries become +0.0 (even if they held inf or NaN) and kept ones are untouched.
    """
    if W.is_floating_point() and W.element_size() in _INT_OF_WIDTH:
        W.view(_INT_OF_WIDTH[W.element_size()]).mul_(mask.logical_not())
        return W
    return W.masked_fill_(mask, 0)


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune the lowest ``sparsity`` fraction per output row (``group="row"``) or per matrix (``"layer"``)."""
    if group == "row":
        return lowest_k_mask(scores, int(scores.shape[1] * sparsity))
    if group == "layer":
        flat = scores.reshape(1, -1)
        return lowest_k_mask(flat, int(flat.numel() * sparsity)).view_as(scores)
    raise ConfigError(f"group {group!r} is not a per-matrix group (row, layer)")


def lowest_in_groups(groups: torch.Tensor, k: int) -> torch.Tensor:
    """Mark the ``k`` lowest entries of every column of ``groups`` (m, G); ties: lower index first.

    Each entry counts how many of its group go before it -- a lower score, or an equal score at a lower
    index -- and is marked when fewer than ``k`` do.  That is ``m (m - 1) / 2`` comparisons of whole rows,
    several times faster than sorting every group when there are many groups; each comparison has a fixed
    cost, so few groups (fewer than ``250 (m - 1)``, the crossover measured on a CPU) or wide ones (m > 8) are
    sorted instead.  A contiguous ``groups`` on the CPU -- SparseGPT's choice of the next M columns, made
    thousands of times per layer -- is counted in NumPy, whose cost per operation is a fraction of torch's
    (15-19 against 56-78 us for 4 rows of 576-3072 groups).  (nm_mask's view of a whole weight is strided;
    NumPy would first have to copy it, and torch counts it faster.)  Every path gives the same mask for scores
    without NaN (the engine refuses inf or NaN weights, so in practice its scores have none).

    >>> lowest_in_groups(torch.tensor([[4., 1.], [1., 1.], [3., 5.], [2., 0.]]), 2)
    tensor([[False,  True],
            [ True, False],
            [False, False],
            [ True,  True]])
    """
    m, count = groups.shape
    if (m <= 8 and groups.device.type == "cpu" and groups.is_contiguous()
            and groups.dtype in (torch.float32, torch.float64)):
        g = groups.numpy()
        return torch.from_numpy(_count_before(g, np.zeros(g.shape, dtype=np.uint8)) < k)
    if m > 8 or count < 250 * (m - 1):
        order = torch.argsort(groups, dim=0, stable=True)[:k]
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(0, order, True)
    return _count_before(groups, torch.zeros_like(groups, dtype=torch.uint8)) < k  # same strides as groups


def _count_before(g, before):
    """``before[i]`` += how many entries of its column go before ``g[i]``; NumPy arrays and tensors alike."""
    m = g.shape[0]
    for i in range(m):
        for j in range(i + 1, m):
            i_first = g[i] <= g[j]
            before[j] += i_first
            before[i] += ~i_first
    return before


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every ``m`` consecutive input weights of each row, prune the ``m - n`` lowest scores.

    >>> nm_mask(torch.tensor([[4., 1., 3., 2.]]), 2, 4)
    tensor([[False,  True, False,  True]])
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows * cols // m, m).t()  # (m, groups): a view, one group per column
    return lowest_in_groups(groups, m - n).t().reshape(rows, cols)


def tile_scores(scores: torch.Tensor, b: int) -> torch.Tensor:
    """Sum scores over ``b x b`` tiles: ``(rows, cols) -> (rows/b, cols/b)``."""
    rows, cols = scores.shape
    return scores.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))


def expand_tiles(tile_mask: torch.Tensor, b: int) -> torch.Tensor:
    return tile_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)


def block_mask(scores: torch.Tensor, b: int, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune whole ``b x b`` tiles with the lowest summed score, per row of tiles or per matrix."""
    return expand_tiles(unstructured_mask(tile_scores(scores, b), sparsity, group), b)


def build_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float, group: str = "row") -> torch.Tensor:
    """The single entry point: scores + pattern (+ sparsity, comparison group) -> prune mask."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.kind == "block":
        return block_mask(scores, pattern.block, sparsity, group)
    return unstructured_mask(scores, sparsity, group)


def is_permutation(order: torch.Tensor, n: int) -> bool:
    """Does ``order`` hold each of ``0 .. n-1`` exactly once (an input order, as RIA's permutation records it)?"""
    return order.numel() == n and torch.equal(order.sort().values, torch.arange(n, device=order.device))


def check_nm(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of N:M groups of ``weight`` (out, in) -- or of its boolean non-zero map -- holding more than ``n``
    non-zeros (0 means valid)."""
    rows, cols = weight.shape
    nonzero = torch.count_nonzero(weight.reshape(rows, cols // m, m), dim=-1)
    return int(torch.count_nonzero(nonzero > n))


def check_tiles(mask: torch.Tensor, b: int) -> int:
    """Number of ``b x b`` tiles of a prune mask that are only partly pruned (0 means valid)."""
    rows, cols = mask.shape
    pruned = mask.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))
    return int(((pruned > 0) & (pruned < b * b)).sum())
