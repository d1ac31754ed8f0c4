"""ALPS: mask and weights chosen together by ADMM, then refined on the final support by conjugate gradients
(Meng, Behdin, Wang & Mazumder, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large
Language Models", NeurIPS 2024, arXiv:2406.07831).

For one layer with dense weights ``W0`` (out, in) and calibration inputs ``X`` (tokens, in), ``H = X^T X``::

    minimise  tr((W - W0) H (W - W0)^T)   subject to  W having the pattern's support (k weights kept)

Coordinates are scaled first: ``H_d = H + damp I`` (``damp = percdamp * mean(diag H)``), ``s = sqrt(diag H_d)``,
``Ĥ = H_d / (s s^T)`` (unit diagonal) and ``B = W * s``; the objective is ``tr((B - B0) Ĥ (B - B0)^T)``.
ADMM splits ``B`` (least squares) from a copy ``D`` (on the support), with the scaled dual ``V`` (out, in)::

    B <- (B0 Ĥ - V + rho D) (Ĥ + rho I)^-1      one eigendecomposition Ĥ = Q diag(λ) Q^T serves every rho
    D <- P(B + V / rho)                         P keeps the largest |.| the pattern allows (per layer by
                                                default, as the paper; per row; N of every M inputs; tiles)
    V <- V + rho (B - D)

Every 3 iterations the support of ``D`` is compared with the last one and ``rho`` (start 0.1) is raised --
×1.3 while more than 10 % of the kept set still changes, ×1.2 above 0.5 %, ×1.1 below -- so that ``B`` and
``D`` are pulled together once the support settles; before the first raise a changing support with little
movement lowers ``rho`` five-fold and restarts from ``W0``.  It stops when the support no longer changes
(after a raise), when fewer than 0.03 % of it changes after 30 iterations, or after ``max_iters`` (300).
The final support is ``P(B)``; on it ``B`` is refined by batched conjugate gradients, every row's system
``B_S Ĥ_SS = (B0 Ĥ)_S`` solved from ``B`` for ``pcg_iters`` steps (10; ``Ĥ``'s unit diagonal is the Jacobi
preconditioner).  ``W = B / s``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..patterns import build_mask
from .base import InputStats, LayerTarget, Method, register


@register("alps")
class ALPS(Method):
    needs = "hessian"
    default_group = "layer"
    groups = ("layer", "row")
    help = {"rho": "the ADMM penalty at the start (default 0.1)",
            "max_iters": "most ADMM iterations per layer (default 300)",
            "pcg_iters": "conjugate-gradient steps on the final support (default 10)",
            "percdamp": "damping of H as a fraction of mean(diag H) (default 0.01)"}

    def __init__(self, rho: float = 0.1, max_iters: int = 300, pcg_iters: int = 10, percdamp: float = 0.01):
        if not rho > 0:
            raise ConfigError(f"alps rho must be > 0, got {rho}")
        if max_iters < 1 or pcg_iters < 0:
            raise ConfigError(f"alps max_iters must be >= 1 and pcg_iters >= 0, got {max_iters} and {pcg_iters}")
        if not 0 < percdamp < 1:
            raise ConfigError(f"alps percdamp must be in (0, 1), got {percdamp}")
        self.rho, self.max_iters, self.pcg_iters, self.percdamp = rho, max_iters, pcg_iters, percdamp

    @torch.no_grad()
    def prune(self, W: torch.Tensor, stats: InputStats, target: LayerTarget) -> torch.Tensor:
        return self.prune_many([W], stats, [target])[0]

    @torch.no_grad()
    def prune_many(self, Ws: list, stats: InputStats, targets: list) -> list:
        """Each matrix on its own (its own support); the scaling and eigendecomposition of their shared ``H``
        once."""
        H = stats.hessian
        Hd = H.clone()
        Hd.diagonal().add_(self.percdamp * torch.mean(torch.diag(H)).clamp_min(1e-12))
        scale = torch.diag(Hd).sqrt()
        Hd.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))
        eigenvalues, Q = torch.linalg.eigh(Hd.double())
        return [self._one(W, Hd, eigenvalues, Q, scale, t) for W, t in zip(Ws, targets)]

    def _one(self, W, Hn, eigenvalues, Q, scale, target: LayerTarget) -> torch.Tensor:
        def inverse(rho):  # (Ĥ + rho I)^-1
            return ((Q / (eigenvalues + rho)) @ Q.T).to(W.dtype)

        def project(Z):  # the pattern's support of Z: its largest |z|; returns the prune mask
            return build_mask(Z.abs(), target.pattern, target.sparsity, target.group)

        B0 = W * scale
        goal = B0 @ Hn  # (out, in)
        start = before = project(B0)
        kept = max(W.numel() - int(start.sum()), 1)
        rho, raised = self.rho, False
        B, D, V = B0.clone(), B0.masked_fill(start, 0), torch.zeros_like(B0)
        inv = inverse(rho)
        for step in range(1, self.max_iters + 1):
            B = (goal - V + rho * D) @ inv
            out = project(B + V / rho)
            D = (B + V / rho).masked_fill_(out, 0)
            V.add_(B - D, alpha=rho)
            if step % 3:
                continue
            change = int((out != before).sum()) / kept
            before = out
            if change > 0.1:
                rho, raised = rho * 1.3, True
            elif change > 0.005:
                rho, raised = rho * 1.2, True
            elif change > 0:
                if raised:
                    rho *= 1.1
                else:  # not yet raised: the support wanders at this rho; start again lower
                    rho /= 5
                    B, D, V = B0.clone(), B0.masked_fill(start, 0), torch.zeros_like(B0)
            elif raised:
                break
            else:
                rho /= 5
            rho = min(rho, 1e6)
            inv = inverse(rho)
            if step >= 30 and change < 0.0003:
                break
        mask = project(B)
        B = conjugate_gradients(Hn, goal, B.masked_fill_(mask, 0), ~mask, self.pcg_iters)
        W.copy_(B / scale)
        return mask


def conjugate_gradients(A: torch.Tensor, goal: torch.Tensor, B: torch.Tensor, keep: torch.Tensor,
                        steps: int) -> torch.Tensor:
    """``steps`` of conjugate gradients on every row's ``b_S A_SS = goal_S`` (``S``: that row's ``keep``), all
    rows at once, from ``B`` (zero off ``keep``); ``A`` (in, in) symmetric positive definite."""
    R = (goal - B @ A).masked_fill_(~keep, 0)
    P = R.clone()
    rr = (R * R).sum(1, keepdim=True)
    for _ in range(steps):
        AP = (P @ A).masked_fill_(~keep, 0)
        alpha = rr / (P * AP).sum(1, keepdim=True).clamp_min(1e-30)
        B.add_(alpha * P)
        R.sub_(alpha * AP)
        rr_next = (R * R).sum(1, keepdim=True)
        P = R + (rr_next / rr.clamp_min(1e-30)) * P
        rr = rr_next
    return B
