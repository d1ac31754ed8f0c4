"""Structured importance, pure math: channels, heads and whole blocks; and the two ways to repair a cut.

Width scores are computed per **channel** ``j`` of the tensor that the output projection reads
(the MLP intermediate activation, or the concatenated attention heads), with ``W`` the output projection
``(hidden, width)`` and ``x_j`` that channel's calibration activations over ``N`` tokens:

* ``magnitude``   -- ``sqrt(sum of squares of every weight the channel owns)``: its row in each input
  projection and its column ``W[:, j]`` (no data needed);
* ``wanda``       -- ``sum_i |W_ij| * ||x_j||_2``, Wanda's score summed over the channel;
* ``fluctuation`` -- ``Var_N(x_j) * ||W[:, j]||_2^2`` (FLAP, An et al. 2024): a channel whose input hardly
  varies can be replaced by its mean, which :func:`bias_compensation` folds into the output bias.

A head's score is the sum of its ``head_dim`` channel scores.

Depth scores compare a block's input and output hidden states on calibration tokens:

* Block Influence (ShortGPT, Men et al. 2024): ``BI_i = 1 - mean_t cos(h_i, h_{i+1})``;
* angular distance over ``n`` blocks (Gromov et al. 2024): ``mean_t arccos(cos(h_l, h_{l+n})) / pi``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

CHANNEL_SCORES = ("magnitude", "wanda", "fluctuation")
BLOCK_SCORES = ("bi", "angular")


@dataclass
class ChannelStats:
    """Running statistics of the ``width`` channels an output projection reads."""

    tokens: int = 0
    sum: "torch.Tensor | None" = None  # (width,)
    sq_sum: "torch.Tensor | None" = None  # (width,)
    gram: "torch.Tensor | None" = None  # (width, width), only for a least-squares refit

    def add(self, x: torch.Tensor, gram: bool = False) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # (tokens, width); float64: variance is a difference of sums
        self.tokens += x.shape[0]
        s, sq = x.sum(0), (x * x).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        if gram:
            g = x.t() @ x
            self.gram = g if self.gram is None else self.gram + g

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-channel variance over the calibration tokens."""
        n = self.tokens
        return ((self.sq_sum - self.sum * self.sum / n) / max(n - 1, 1)).clamp_min(0)


def channel_scores(kind: str, W_out: torch.Tensor, W_ins: list, stats: "ChannelStats | None") -> torch.Tensor:
    """Importance of each of the ``width`` channels; ``W_out`` (hidden, width), ``W_ins`` [(width, hidden)]."""
    W_out = W_out.double()
    if kind == "magnitude":
        sq = (W_out * W_out).sum(0)
        for W in W_ins:
            sq = sq + (W.double() ** 2).sum(1)
        return sq.sqrt()
    if stats is None or stats.tokens == 0:
        raise ConfigError(f"structured score {kind!r} needs calibration statistics")
    if kind == "wanda":
        return W_out.abs().sum(0) * stats.sq_sum.sqrt()
    if kind == "fluctuation":
        return stats.variance * (W_out * W_out).sum(0)
    raise ConfigError(f"unknown channel score {kind!r}; known: {', '.join(CHANNEL_SCORES)}")


def head_scores(channel: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum channel scores ``(heads * head_dim,)`` over each head: ``(heads,)``."""
    return channel.reshape(-1, head_dim).sum(1)


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, ties broken by the lower index (deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:k])


def bias_compensation(W_out: torch.Tensor, mean: torch.Tensor, removed: list) -> torch.Tensor:
    """FLAP's repair: a removed channel is replaced by its calibration mean, ``delta_b = W[:, R] @ mean[R]``."""
    if not removed:
        return torch.zeros(W_out.shape[0], dtype=torch.float64)
    return W_out.double()[:, removed] @ mean.double()[removed]


def least_squares_refit(W_out: torch.Tensor, gram: torch.Tensor, keep: list, percdamp: float = 0.01) -> torch.Tensor:
    """The output projection on the kept channels that best reproduces the full one on calibration data.

    Minimises ``sum_t ||W x_t - W' x_t[S]||^2`` over ``W'`` (hidden, |S|): with ``G = X^T X`` the Gram matrix
    of all channels, ``W' = W G[:, S] (G[S, S] + lambda I)^-1`` (``lambda = percdamp * mean diag G[S, S]``
    keeps the solve well posed when channels are collinear or dead).
    """
    G = gram.double()
    GSS = G[keep][:, keep]
    damp = percdamp * torch.diag(GSS).mean().clamp_min(1e-12)
    A = GSS + damp * torch.eye(len(keep), dtype=G.dtype)
    rhs = W_out.double() @ G[:, keep]  # (hidden, |S|)
    return torch.linalg.solve(A, rhs.t()).t()  # A symmetric: W' = rhs A^-1


# ----------------------------------------------------------------------------- depth


def cosine_per_token(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``a`` and ``b`` (..., hidden) per token, in float64, flattened."""
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def block_influence(cos_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """``BI = 1 - mean cos`` from per-block sums of token cosines."""
    return 1 - cos_sum / tokens


def angular_distance(cos: torch.Tensor) -> torch.Tensor:
    """``arccos(cos) / pi`` in [0, 1], per token (clamped against rounding just outside [-1, 1])."""
    return torch.arccos(cos.clamp(-1, 1)) / math.pi


def blocks_to_remove(kind: str, scores: torch.Tensor, k: int) -> list[int]:
    """Blocks to drop: the ``k`` lowest Block Influences, or the ``k`` consecutive blocks starting where
    the angular distance over ``k`` blocks (``scores[l]`` = distance from block ``l``'s input to block
    ``l + k``'s input) is smallest."""
    if kind == "bi":
        return lowest(scores, k)
    if kind == "angular":
        start = lowest(scores, 1)[0]
        return list(range(start, start + k))
    raise ConfigError(f"unknown block score {kind!r}; known: {', '.join(BLOCK_SCORES)}")
