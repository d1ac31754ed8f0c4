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

import torch

from ..errors import CalibrationError, ConfigError
from ..patterns import Pattern, expand_tiles, lowest_in_groups, lowest_k_mask, tile_scores, zero_where_
from ..quant import Quant, codes_of
from .base import InputStats, LayerTarget, Method, Pruned, register

log = logging.getLogger(__name__)


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, dead: "torch.Tensor | None" = None,
                            max_tries: int = 6) -> torch.Tensor:
    """Upper triangular ``U`` with ``U^T U = (H + damp I)^-1``, ``damp = percdamp * mean(diag H)``.

    ``dead`` (boolean, ``(in,)``) marks input channels that were never active: their diagonal entries count
    as 1 (their rows and columns of ``H`` are zero).  ``H`` itself is not changed.

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky factorisation
    and one triangular inverse, instead of factorise -> invert -> factorise again (half the work, same
    ``U``).  If the factorisation fails (``H`` numerically singular), the damping is multiplied by 10 and
    retried, with a warning in the log.  Memory: two ``(in, in)`` matrices besides ``H`` -- ``J H J`` is
    factorised in place, the identity is solved in place, and ``J U' J`` is a reversal of the flat buffer done
    in place (for a 28,672-wide input each matrix is 3.3 GB).
    """
    diag = torch.diag(H)
    if dead is not None:
        diag[dead] = 1
    mean_diag = torch.mean(diag)
    damp_frac = percdamp
    for attempt in range(max_tries):
        A = H.flip(0, 1)  # J H J, a copy; J maps the diagonal onto itself, so J (H + damp I) J = J H J + damp I
        if dead is not None:
            A.diagonal()[dead.flip(0)] = 1
        A.diagonal().add_(damp_frac * mean_diag)
        info = torch.empty((), dtype=torch.int32, device=H.device)
        L, info = torch.linalg.cholesky_ex(A, out=(A, info))  # L overwrites A
        if info == 0:
            if attempt:
                log.warning("SparseGPT: Cholesky succeeded after raising damping to %.3g of mean(diag H)", damp_frac)
            # the identity in column-major order, as LAPACK solves in place (the result LAPACK would return)
            U = torch.eye(H.shape[0], dtype=H.dtype, device=H.device).t()
            torch.linalg.solve_triangular(L, U, upper=False, out=U)
            del L, A
            return _reverse_(U)  # J L^-1 J
        del L, A
        log.warning("SparseGPT: Cholesky failed with damping %.3g of mean(diag H); retrying with %.3g",
                    damp_frac, damp_frac * 10)
        damp_frac *= 10
    raise CalibrationError(f"SparseGPT: Hessian is not positive definite even with damping {damp_frac:.3g}")


def _reverse_(M: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """``M.flip(0, 1)`` in place, for a dense (row- or column-major) matrix: element ``(i, j)`` goes to
    ``(n-1-i, m-1-j)``, which in either order is the reversal of the flat buffer; swapped ``chunk`` values at a
    time from both ends."""
    flat = (M if M.is_contiguous() else M.t()).view(-1)
    n, k = flat.numel(), 0
    while k < n // 2:
        c = min(chunk, n // 2 - k)
        head, tail = flat[k:k + c], flat[n - k - c:n - k]
        kept = head.flip(0)  # a copy of c values
        head.copy_(tail.flip(0))
        tail.copy_(kept)
        k += c
    return M


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    sparsity: "float | list[tuple[int, float]]",
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: "Quant | None" = None,
) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """Prune ``W`` (out, in) in place given ``H = X^T X`` (in, in); return the boolean prune mask.

    ``sparsity`` may be a list of ``(rows, sparsity)`` segments: layers that read the same input (q/k/v)
    are then pruned in one pass over their stacked rows -- the OBS update is row-independent -- while
    each keeps its own unstructured / block selection, exactly as if pruned one by one.

    ``quant`` quantizes the kept weights in the same sweep, as the paper's joint sparsification and
    quantization does (GPTQ's column-by-column rounding): a kept ``w_q`` becomes its grid point ``q`` and the
    error ``(w_q - q) / [H^-1]_qq`` is spread over the later columns as a pruned weight's is.  Each group's
    scales are fixed when the sweep reaches its first column, from the current (already updated) weights it
    keeps.  Returns ``(mask, scales)`` then, the scales ``(out, groups)`` in float32 (:mod:`secateurs.quant`).
    """
    rows, cols = W.shape
    segments = sparsity if isinstance(sparsity, list) else [(rows, sparsity)]
    if sum(r for r, _ in segments) != rows:
        raise ValueError(f"segments cover {sum(r for r, _ in segments)} rows, the weight has {rows}")
    dead = torch.diag(H) == 0  # input channels never active: their weights cannot matter
    W[:, dead] = 0
    Hinv = damped_inverse_cholesky(H, percdamp, dead)  # upper factor, (in, in); H is left as it is

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
        U1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(U1)
        d2 = (d * d).unsqueeze(1)  # [H_F^-1]_qq as a column, (count, 1)

        if pattern.kind == "nm":
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            score = W1**2 / d2  # OBS saliency w_q^2 / [H_F^-1]_qq, with [H_F^-1]_qq = U_qq^2
            mask1 = torch.cat([_select(part, pattern, frac) for part, frac in
                               zip(score.split([r for r, _ in segments], dim=1), (f for _, f in segments))], dim=1)
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
        W[:, i2:] -= Err1.t() @ Hinv[i1:i2, i2:]  # lazy batched update of all later columns
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
        out = sparsegpt_prune(W, stats.hessian, target.pattern, target.sparsity, self.blocksize, self.percdamp,
                              target.quant if self.joint_quant else None)
        return Pruned(*out) if isinstance(out, tuple) else out

    @torch.no_grad()
    def prune_many(self, Ws: list, stats: InputStats, targets: list) -> list:
        """Layers sharing one input (and so one Hessian) are pruned in a single pass over stacked rows."""
        if len({(t.pattern, t.quant) for t in targets}) != 1:
            return super().prune_many(Ws, stats, targets)
        W = torch.cat(Ws, dim=0)
        segments = [(w.shape[0], t.sparsity) for w, t in zip(Ws, targets)]
        out = sparsegpt_prune(W, stats.hessian, targets[0].pattern, segments, self.blocksize, self.percdamp,
                              targets[0].quant if self.joint_quant else None)
        sizes = [w.shape[0] for w in Ws]
        for w, part in zip(Ws, W.split(sizes)):
            w.copy_(part)
        if isinstance(out, tuple):  # joint quantization: each weight's mask and scales
            return [Pruned(mask, scales) for mask, scales in zip(out[0].split(sizes), out[1].split(sizes))]
        return list(out.split(sizes))
