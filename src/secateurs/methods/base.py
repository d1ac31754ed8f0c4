"""The minimal interface every pruning method implements, and the registry that names them.

A method is math only.  The calibration engine (``secateurs.engine``) gathers the statistics a method
asks for through ``needs`` and hands them over one weight matrix at a time:

* ``needs = "none"``    -- weights only (magnitude);
* ``needs = "norms"``   -- ``sq_norms[j] = sum_t x_tj^2``, the squared L2 norm of input channel ``j``
  over all calibration tokens (Wanda);
* ``needs = "hessian"`` -- ``H = X^T X`` over all calibration tokens, ``(in, in)`` (SparseGPT).

Weights are always given as ``W`` of shape ``(out, in)`` in float32, whatever the module stores
(GPT-2's ``Conv1D`` keeps the transpose; the engine hides that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..patterns import Pattern, build_mask, zero_where_

NEEDS = ("none", "norms", "hessian")


@dataclass
class InputStats:
    """Calibration statistics of one linear layer's input. Shapes: ``sq_norms (in,)``, ``hessian (in, in)``."""

    tokens: int = 0
    sq_norms: "torch.Tensor | None" = None
    hessian: "torch.Tensor | None" = None


@dataclass(frozen=True)
class LayerTarget:
    """What to do to one weight matrix: the pattern, the fraction to remove, how to compare scores."""

    pattern: Pattern
    sparsity: float
    group: str = "row"  # row | layer | global (global is resolved by the engine across layers)


class Method:
    """Base class. Score-based methods only implement :meth:`scores`; others override :meth:`prune`."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"
    default_group: ClassVar[str] = "row"
    groups: ClassVar[tuple[str, ...]] = ("row", "layer", "global")
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm", "block")
    true_sequential: ClassVar[bool] = False  # default for PruneConfig.true_sequential

    def __init__(self, **options):
        if options:
            raise TypeError(f"method {self.name!r} takes no options, got {sorted(options)}")

    @property
    def needs_calibration(self) -> bool:
        return self.needs != "none"

    def scores(self, W: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """Importance of every weight, ``(out, in)``; low scores are pruned first."""
        raise NotImplementedError

    @torch.no_grad()
    def prune(self, W: torch.Tensor, stats: InputStats, target: LayerTarget) -> torch.Tensor:
        """Prune ``W`` in place and return the boolean mask of pruned weights."""
        mask = build_mask(self.scores(W, stats), target.pattern, target.sparsity, target.group)
        zero_where_(W, mask)
        return mask

    def prune_many(self, Ws: list, stats: InputStats, targets: list) -> list:
        """Prune several matrices that read the same input (q/k/v, gate/up); methods may do this jointly."""
        return [self.prune(W, stats, t) for W, t in zip(Ws, targets)]


METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available under ``name`` to the API, CLI and recipes."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str, **options) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    return cls(**options)
