"""Factorisations done in the matrix's own storage, for the ``(in, in)`` statistics of wide inputs.

A float32 ``(in, in)`` matrix is large: 256 MiB for Llama-3.2-3B's 8,192-wide MLP input, 3.3 GB for
Llama-3-70B's 28,672.  ``torch.linalg`` returns its factors as new matrices (and factorises a copy even when
told to write over its input), so a damped inverse Cholesky factor built with it holds three at once.  The
routines here work a block of columns at a time with ``(in, block)`` temporaries, and read and write only the
**lower triangle** (with the diagonal) -- as LAPACK's ``potrf`` and ``trtri`` with ``uplo='L'`` do -- so that
the strictly upper triangle stays free for the caller: SparseGPT keeps its ``H`` there
(:func:`secateurs.methods.sparsegpt.inverse_factor`).  Each is left-looking: the columns to the left, already
final, update the block in one matrix product, then the small diagonal square is factorised by ``torch.linalg``.
"""

from __future__ import annotations

import torch

BLOCK = 256  # columns per step: large enough for efficient matrix products, small next to any wide input


def mirror_lower_(H: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Complete, in place, a symmetric matrix of which only the lower triangle is filled in: every entry above
    the diagonal becomes its mirror image below it, ``chunk`` rows at a time (no ``(in, in)`` temporary).
    ``mirror_lower_(H.t())`` fills the lower triangle from the upper one instead."""
    n = H.shape[0]
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        H[a:b, b:] = H[b:, a:b].t()  # right of the diagonal square: from the (unchanged) rows below
        square = H[a:b, a:b]
        square.copy_(torch.tril(square) + torch.tril(square, -1).t())
    return H


def cholesky_lower_(A: torch.Tensor, block: int = BLOCK) -> int:
    """Overwrite the lower triangle of the symmetric positive definite ``A`` (read from that triangle only)
    with its Cholesky factor ``L``, ``A = L L^T``; the strictly upper triangle is not touched.

    Returns 0, or -- where ``A`` is not (numerically) positive definite -- the 1-based index of the column at
    which the factorisation stopped; the lower triangle is then partly overwritten.
    """
    n = A.shape[0]
    for k in range(0, n, block):
        e = min(k + block, n)
        panel = A[k:, k:e]  # this block of columns, from its diagonal square down
        if k:  # minus what the final columns to the left contribute: L[k:, :k] L[k:e, :k]^T
            left = A[k:, :k] @ A[k:e, :k].t()
            A[e:, k:e] -= left[e - k :]
            square = torch.tril(panel[: e - k]) - torch.tril(left[: e - k])
        else:
            square = torch.tril(panel[: e - k])
        L11, info = torch.linalg.cholesky_ex(square + torch.tril(square, -1).t())
        if info:
            return k + int(info)
        _set_lower(A[k:e, k:e], L11)
        if e < n:  # L21 = A21 L11^-T
            A[e:, k:e] = torch.linalg.solve_triangular(L11.t(), A[e:, k:e], upper=True, left=False)
    return 0


def invert_lower_(L: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Overwrite the lower triangle of the lower triangular ``L`` (read from that triangle only) with ``L^-1``;
    the strictly upper triangle is not touched.

    Blocks of columns from the right: with ``L = [[L11, 0], [L21, L22]]``, ``L^-1 = [[X11, 0], [X21, X22]]``,
    ``X11 = L11^-1`` and ``X21 = -X22 L21 X11``, where ``X22`` -- the columns to the right -- is already in place.
    """
    n = L.shape[0]
    for k in reversed(range(0, n, block)):
        e = min(k + block, n)
        L11 = torch.tril(L[k:e, k:e])
        X11 = torch.linalg.solve_triangular(L11, torch.eye(e - k, dtype=L.dtype, device=L.device), upper=False)
        if e < n:
            L[e:, k:e] = -(_lower_times(L[e:, e:], L[e:, k:e], block) @ X11)
        _set_lower(L[k:e, k:e], X11)
    return L


def _lower_times(T: torch.Tensor, B: torch.Tensor, block: int) -> torch.Tensor:
    """``tril(T) @ B`` reading only the lower triangle of ``T``, a block of rows at a time: the part left of the
    diagonal square in one product, the square's lower triangle in another."""
    out = torch.empty(B.shape, dtype=B.dtype, device=B.device)
    for a in range(0, T.shape[0], block):
        b = min(a + block, T.shape[0])
        torch.matmul(torch.tril(T[a:b, a:b]), B[a:b], out=out[a:b])
        if a:
            out[a:b].addmm_(T[a:b, :a], B[:a])
    return out


def _set_lower(square: torch.Tensor, lower: torch.Tensor) -> None:
    """Write ``lower``'s lower triangle (with the diagonal) into ``square``, leaving its strictly upper one."""
    square.copy_(torch.tril(lower) + torch.triu(square, 1))


def reverse_(M: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """``M.flip(0, 1)`` in place, for a dense (row- or column-major) matrix: element ``(i, j)`` goes to
    ``(n-1-i, m-1-j)``, which in either order is the reversal of the flat buffer; swapped ``chunk`` values at a
    time from both ends."""
    flat = (M if M.is_contiguous() else M.t()).view(-1)
    n, k = flat.numel(), 0
    while k < n // 2:
        c = min(chunk, n // 2 - k)
        head, tail = flat[k : k + c], flat[n - k - c : n - k]
        kept = head.flip(0)  # a copy of c values
        head.copy_(tail.flip(0))
        tail.copy_(kept)
        k += c
    return M
