"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight reconstruction
(Frantar & Alistarh, 2023, arXiv:2301.00774).

For a layer ``y = W x`` with calibration inputs ``X`` and ``H = X^T X`` (damped), the weights are visited
column by column.  Removing weight ``w_q`` (or quantising it to 0) costs ``w_q^2 / [H^-1]_qq`` and is
compensated by updating the not-yet-visited columns of the same row with
``delta = -(w_q / [H^-1]_qq) * H^-1[q, :]`` -- computed from the upper Cholesky factor of ``H^-1``, so the
inverse Hessian of the remaining columns never has to be recomputed.  Updates are applied lazily in
blocks of ``blocksize`` columns (two matrix products per block instead of one outer product per column).

Mask selection is adaptive: at the start of every block the ``sparsity`` fraction of weights with the
lowest saliency ``w_q^2 / [H_F^-1]_qq = (w_q / U_qq)^2`` inside that block is chosen (``F`` the columns not
yet visited, ``U`` the Cholesky factor); for N:M the choice is made every M columns,
per row, from the weights already updated by earlier columns, as in the paper.  ``block:B`` tiles are
chosen the same way as unstructured weights, with the scores summed over each tile.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..errors import CalibrationError, ConfigError
from ..linalg import cholesky_lower_, invert_lower_, mirror_lower_, reverse_
from ..patterns import Pattern, expand_tiles, lowest_in_groups, lowest_k_mask, tile_scores, zero_where_
from ..quant import Quant, codes_of
from .base import InputStats, LayerTarget, Method, Pruned, register

log = logging.getLogger(__name__)


@contextmanager
def inverse_factor(H: torch.Tensor, percdamp: float, dead: "torch.Tensor | None" = None, max_tries: int = 6):
    """Upper triangular ``U`` with ``U^T U = (H + damp I)^-1``, ``damp = percdamp * mean(diag H)``, built in
    the symmetric ``H``'s own storage: inside the ``with``, the upper triangle (with the diagonal) of the matrix it gives --
    ``H`` itself -- is ``U``, and its strictly lower triangle still holds ``H``'s; on leaving, ``H`` is as it was,
    bit for bit.  No other ``(in, in)`` matrix is made (three were: 9.9 GB for a 28,672-wide input).

    ``dead`` (boolean, ``(in,)``) marks input channels that were never active: their diagonal entries count
    as 1 (their rows and columns of ``H`` are zero).

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J`` (``H = (JLJ)(JLJ)^T`` with
    ``JLJ`` upper triangular): one Cholesky factorisation and one triangular inverse.  ``H`` is reversed in
    place (``J H J`` is symmetric too), its diagonal damped, its lower triangle factorised and inverted in place
    (:mod:`secateurs.linalg`, which never touches the strictly upper triangle), and reversed again: ``L^-1``'s
    lower triangle becomes ``U``'s upper one, and the untouched mirror of ``H`` its strictly lower one.  If the
    factorisation fails (``H`` numerically singular), the lower triangle is copied back from the upper one and
    the damping multiplied by 10, with a warning in the log.
    """
    diag = torch.diag(H)  # a copy: the diagonal is the one part of H that is written over and put back
    damped = diag.clone()
    if dead is not None:
        damped[dead] = 1
    mean_diag = torch.mean(damped)
    damp_frac, flipped = percdamp, True
    reverse_(H)  # J H J
    try:
        for attempt in range(max_tries):
            H.diagonal().copy_((damped + damp_frac * mean_diag).flip(0))  # J maps the diagonal onto itself
            if not cholesky_lower_(H):
                break
            log.warning("SparseGPT: Cholesky failed with damping %.3g of mean(diag H); retrying with %.3g",
                        damp_frac, damp_frac * 10)
            mirror_lower_(H.t())  # J H J again, from the triangle the factorisation did not touch
            damp_frac *= 10
        else:
            raise CalibrationError(f"SparseGPT: Hessian is not positive definite even with damping {damp_frac:.3g}")
        if attempt:
            log.warning("SparseGPT: Cholesky succeeded after raising damping to %.3g of mean(diag H)", damp_frac)
        invert_lower_(H)
        reverse_(H)  # U above the diagonal, H's own strictly lower triangle below it
        flipped = False
        yield H
    finally:  # H again, from the triangle that holds it
        if flipped:
            mirror_lower_(H.t())
            H.diagonal().copy_(diag.flip(0))
            reverse_(H)
        else:
            H.diagonal().copy_(diag)
            mirror_lower_(H)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: "Quant | None" = None,
) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """Prune ``W`` (out, in) in place given ``H = X^T X`` (in, in); return the boolean prune mask.

    ``quant`` quantizes the kept weights in the same sweep, as the paper's joint sparsification and
    quantization does (GPTQ's column-by-column rounding): a kept ``w_q`` becomes its grid point ``q`` and the
    error ``(w_q - q) / [H^-1]_qq`` is spread over the later columns as a pruned weight's is.  Each group's
    scales are fixed when the sweep reaches its first column, from the current (already updated) weights it
    keeps.  Returns ``(mask, scales)`` then, the scales ``(out, groups)`` in float32 (:mod:`secateurs.quant`).
    """
    dead = torch.diag(H) == 0  # input channels never active: their weights cannot matter
    with inverse_factor(H, percdamp, dead) as U:
        return obs_sweep(W, U, dead, pattern, sparsity, blocksize, quant)


def obs_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    dead: torch.Tensor,
    pattern: Pattern,
    sparsity: float,
    blocksize: int = 128,
    quant: "Quant | None" = None,
) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """:func:`sparsegpt_prune`'s column sweep over ``W``, given the inverse factor ``U`` of :func:`inverse_factor`
    (only its upper triangle is read).  Each row is its own problem, so matrices that read the same input
    (q/k/v, gate/up) are swept one after the other with one ``U``: what one sweep over their stacked rows
    gives, without a stacked copy."""
    rows, cols = W.shape
    W[:, dead] = 0
    if pattern.kind == "nm":
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    elif pattern.kind == "block":
        blocksize = max(pattern.block, blocksize - blocksize % pattern.block)

    sub = max(pattern.m, 16 - 16 % pattern.m) if pattern.kind == "nm" else 16  # N:M groups never straddle
    mask = torch.zeros_like(W, dtype=torch.bool)
    scales = torch.zeros(rows, quant.groups(cols)) if quant is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        # Work on the block transposed, (count, rows), so that a column is one contiguous row.
        W1 = W[:, i1:i2].t().contiguous()
        Err1 = torch.zeros_like(W1)
        Q1 = torch.zeros_like(W1) if quant is not None else None  # the grid points of the kept weights
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        d2 = (d * d).unsqueeze(1)  # [H_F^-1]_qq as a column, (count, 1)

        if pattern.kind == "nm":
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1**2 / d2  # OBS saliency w_q^2 / [H_F^-1]_qq, with [H_F^-1]_qq = U_qq^2
            mask1 = _select(score, pattern, sparsity)
        # err_q = w_q / [H^-1]_qq for pruned weights, 0 for kept ones: scale = mask / d
        scale = mask1 / d.unsqueeze(1)

        # Inside the block the same laziness applies once more: rank-1 updates stay within a sub-block of
        # `sub` columns, and one matrix product carries the sub-block's errors to the rest of the block.
        for s1 in range(0, count, sub):
            s2 = min(s1 + sub, count)
            for i in range(s1, s2):
                if pattern.kind == "nm" and i % pattern.m == 0:
                    # choose this group's mask now, from weights already updated by the columns before it
                    j = slice(i, i + pattern.m)
                    saliency = W1[j] ** 2 / d2[j]  # (m, rows)
                    mask1[j] = lowest_in_groups(saliency, pattern.m - pattern.n)
                    scale[j] = mask1[j] / d[j].unsqueeze(1)
                if quant is None:
                    torch.mul(W1[i], scale[i], out=Err1[i])
                else:  # kept weights go to their grid point, pruned ones to 0: both errors are spread
                    if (i1 + i) % quant.group_size == 0:
                        scales[:, (i1 + i) // quant.group_size] = _group_scales(W, W1, mask1, i, i1, i2, quant,
                                                                              pattern.kind != "nm")
                    s_col = scales[:, (i1 + i) // quant.group_size]
                    Q1[i] = (codes_of(W1[i], s_col, quant).float() * s_col).masked_fill_(mask1[i], 0)
                    torch.sub(W1[i], Q1[i], out=Err1[i]).div_(d[i])
                # remove w_q and spread its error over the sub-block's later columns
                W1[i:s2].addr_(U1[i, i:s2], Err1[i], alpha=-1)
            if s2 < count:
                W1[s2:].addmm_(U1[s1:s2, s2:].t(), Err1[s1:s2], alpha=-1)

        if quant is None:
            zero_where_(W1, mask1)  # exact zeros (the update leaves rounding residue on pruned weights)
        else:
            W1 = Q1  # exact grid points and zeros
        W[:, i1:i2] = W1.t()
        mask[:, i1:i2] = mask1.t()
        W[:, i2:].addmm_(Err1.t(), U[i1:i2, i2:], alpha=-1)  # lazy batched update of all later columns
    return mask if quant is None else (mask, scales)


def _group_scales(W, W1, mask1, i, i1, i2, quant: "Quant", kept_only: bool) -> torch.Tensor:
    """The scales ``(out,)`` of the quantization group starting at column ``i1 + i``: its largest current
    magnitude per row (columns of this lazy batch from ``W1``, with every update so far; later ones from ``W``)
    over ``qmax``, rounded to the stored dtype.  ``kept_only``: weights the mask removes do not count."""
    end = i1 + i + quant.group_size
    inside = W1[i:min(end - i1, W1.shape[0])]  # (c, out)
    if kept_only:
        inside = inside.masked_fill(mask1[i:i + inside.shape[0]], 0)
    absmax = inside.abs().amax(0)
    if end > i2:  # the group reaches past this batch: those columns have every earlier batch's update
        absmax = torch.maximum(absmax, W[:, i2:end].abs().amax(1))
    return (absmax / quant.qmax).to(quant.scale_dtype).float()


def _select(score: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """The lowest ``sparsity`` fraction of one block's saliencies (or of its tiles' summed saliencies)."""
    if pattern.kind == "block":
        tiles = tile_scores(score, pattern.block)
        chosen = lowest_k_mask(tiles.reshape(1, -1), int(tiles.numel() * sparsity)).view_as(tiles)
        return expand_tiles(chosen, pattern.block)
    return lowest_k_mask(score.reshape(1, -1), int(score.numel() * sparsity)).view_as(score)


@register("sparsegpt")
class SparseGPT(Method):
    needs = "hessian"
    default_group = "lazy-batch"  # adaptive selection inside each lazy-update batch of columns, as in the paper
    groups = ("lazy-batch",)
    true_sequential = True  # the option of the official LLaMA script; better and, with replay, faster here
    help = {"blocksize": "columns per lazy-update batch (default 128)",
            "percdamp": "damping of H as a fraction of mean(diag H) (default 0.01)",
            "joint_quant": "with quant int8/int4: quantize the kept weights inside the sweep (default) rather than "
                           "round them to nearest afterwards"}

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, joint_quant: bool = True):
        if blocksize < 1:
            raise ConfigError(f"sparsegpt blocksize must be >= 1, got {blocksize}")
        if not 0 < percdamp < 1:
            raise ConfigError(f"sparsegpt percdamp must be in (0, 1), got {percdamp}")
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.joint_quant = joint_quant

    @torch.no_grad()
    def prune(self, W: torch.Tensor, stats: InputStats, target: LayerTarget):
        return self.prune_many([W], stats, [target])[0]

    @torch.no_grad()
    def prune_many(self, Ws: list, stats: InputStats, targets: list) -> list:
        """Layers that read one input (and so share its Hessian) share its inverse factor: built once, each
        matrix swept with it in turn, each under its own target."""
        dead = torch.diag(stats.hessian) == 0
        out = []
        with inverse_factor(stats.hessian, self.percdamp, dead) as U:
            for W, t in zip(Ws, targets):
                quant = t.quant if self.joint_quant else None
                got = obs_sweep(W, U, dead, t.pattern, t.sparsity, self.blocksize, quant)
                out.append(Pruned(*got) if isinstance(got, tuple) else got)
        return out
