"""Weight reconstruction on a fixed mask: the best remaining weights for a layer, by ADMM
(Boza, 2024, "Fast and Effective Weight Update for Pruned Large Language Models", arXiv:2401.02938).

Once a method has chosen which weights of ``W0`` (out, in) to remove, the kept weights can still move.
With calibration inputs ``X`` and ``H = X^T X``, the layer's output error is minimised by

    minimise  tr((W - W0) H_d (W - W0)^T)   subject to  W = 0 off the kept set,

one least-squares problem per output row, ``H_d = H + damp * Diag(H)`` (each channel damped by a fraction
of its own energy; this regularisation keeps the weights near ``W0`` where the calibration set is thin).
SparseGPT only approximates this optimum: once it has passed a column it never revisits it.  Solving
each row exactly needs one factorisation per row; ADMM needs one inverse per layer instead:

    V <- (V0 H_d + rho (Z - U)) (H_d + rho I)^-1     least squares, pulled towards the masked copy
    Z <- keep * (V + U)                             projection onto the mask
    U <- U + V - Z                                  running disagreement (scaled dual variable)

in coordinates scaled by ``sqrt(diag H)`` (so ``diag H = 1`` and ``rho = 1`` suits every layer).  The
result is ``Z``: exactly zero off the mask.  Warm-started from the method's own weights.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def admm_reconstruct(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, iters: int = 20,
                     damp: float = 0.1, rho: float = 1.0, chunk_rows: int = 4096) -> torch.Tensor:
    """Kept weights re-fitted to ``W0``'s outputs; returns a new (out, in) tensor, zero where ``~keep``.

    ``W`` (the method's result) is the starting point, ``W0`` the dense weights, ``H = X^T X`` (in, in),
    ``keep`` the boolean mask of weights that may be non-zero.  One dtype (float32 or float64), one device.
    Rows are independent problems sharing one inverse, so they are solved ``chunk_rows`` at a time: the
    working copies (target, V, Z, U) then take ``chunk_rows x in`` each, not the whole stacked weight's size.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    scale = torch.diag(H).sqrt()
    scale[scale == 0] = 1  # channels never active: nothing to scale (their weights do not matter)
    Hd = H / scale.unsqueeze(0) / scale.unsqueeze(1)  # unit diagonal
    Hd.diagonal().add_(damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(Hd + rho * torch.eye(len(Hd), dtype=H.dtype,
                                                                                    device=H.device)))
    out = torch.empty_like(W)
    for first in range(0, W.shape[0], chunk_rows):
        rows = slice(first, first + chunk_rows)
        target = (W0[rows] * scale) @ Hd  # V0 H_d, fixed
        kept = keep[rows].to(W.dtype)
        Z = W[rows] * scale
        U = torch.zeros_like(Z)
        for _ in range(iters):
            V = (target + rho * (Z - U)) @ inverse
            Z = (V + U) * kept
            U += V - Z
        out[rows] = Z / scale
    return out
