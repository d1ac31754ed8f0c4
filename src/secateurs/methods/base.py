"""The minimal interface every pruning method implements, and the registry that names them.

A method is math only.  The calibration engine (``secateurs.engine``) gathers the statistics a method
asks for through ``needs`` and hands them over one weight matrix at a time:

* ``needs = "none"``    -- weights only (magnitude);
* ``needs = "norms"``   -- ``sq_norms[j] = sum_t x_tj^2``, the squared L2 norm of input channel ``j``
  over all calibration tokens (Wanda);
* ``needs = "hessian"`` -- ``H = X^T X`` over all calibration tokens, ``(in, in)`` (SparseGPT).

A refinement that needs the channels' means (DSnoT) also gets ``sums[j] = sum_t x_tj``.

Weights are always given as ``W`` of shape ``(out, in)`` in float32, whatever the module stores
(GPT-2's ``Conv1D`` keeps the transpose; the engine hides that).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..errors import ConfigError
from ..patterns import Pattern, build_mask, zero_where_
from ..quant import Quant

NEEDS = ("none", "norms", "hessian")


@dataclass
class InputStats:
    """Calibration statistics of one linear layer's input. Shapes: ``sq_norms (in,)``, ``hessian (in, in)``,
    ``sums (in,)``."""

    tokens: int = 0
    sq_norms: "torch.Tensor | None" = None
    hessian: "torch.Tensor | None" = None
    sums: "torch.Tensor | None" = None


@dataclass(frozen=True)
class LayerTarget:
    """What to do to one weight matrix: the pattern, the fraction to remove, the scores' comparison group."""

    pattern: Pattern
    sparsity: float
    group: str = "row"  # row | layer (SparseGPT: lazy-batch, its lazy-update columns)
    quant: "Quant | None" = None  # the kept weights' integer grid; a method that quantizes inside its own
    # sweep (SparseGPT's joint_quant) returns Pruned(mask, scales); any other is rounded to nearest by the engine


@dataclass
class Pruned:
    """What pruning one matrix gives when it is more than its mask (a plain mask stands for ``Pruned(mask)``)."""

    mask: torch.Tensor  # (out, in) bool, True = pruned
    scales: "torch.Tensor | None" = None  # a method that quantized inside its own sweep: the grid, (out, groups)
    order: "torch.Tensor | None" = None  # (in,) the input order under which an N:M mask holds (RIA's permutation)

    @classmethod
    def of(cls, result: "torch.Tensor | Pruned") -> "Pruned":
        return result if isinstance(result, Pruned) else cls(result)


@dataclass(frozen=True)
class Option:
    """One option of a method: a keyword parameter of its constructor."""

    name: str
    type: type  # int | float | str | bool
    default: Any
    help: str


class Method:
    """Base class. Score-based methods only implement :meth:`scores`; others override :meth:`prune`.

    A method's **options** are the keyword parameters of its ``__init__`` (typed, with defaults) and their
    one-line ``help``; the constructor validates them (raising :class:`~secateurs.errors.ConfigError`).  The
    CLI flags (``--percdamp``), recipe keys and ``compare`` cells are derived from them: a new method with
    options needs no edit outside its own file.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[str] = "none"
    default_group: ClassVar[str] = "row"
    groups: ClassVar[tuple[str, ...]] = ("row", "layer")
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm", "block")
    true_sequential: ClassVar[bool] = False  # default for PruneConfig.true_sequential
    help: ClassVar[dict[str, str]] = {}  # option name -> one line for --help and the docs
    meets_target: bool = True  # removes exactly the target fraction (checked); False: a threshold decides
    # True: a row's scores depend on that row only (and the statistics): where the method keeps the base prune
    # (scores, then the pattern's mask), the engine may prune a matrix a few rows at a time, in the model's dtype
    row_local: ClassVar[bool] = False

    @classmethod
    def options(cls) -> dict[str, Option]:
        """The options the constructor takes, in its order."""
        params = [p for n, p in inspect.signature(cls.__init__).parameters.items()
                  if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        hints = typing.get_type_hints(cls.__init__) if params else {}
        out = {}
        for p in params:  # "float | None" -> float: None is allowed where it is the default
            kind = next(k for k in typing.get_args(hints[p.name]) or (hints[p.name],) if k is not type(None))
            out[p.name] = Option(p.name, kind, p.default, cls.help.get(p.name, ""))
        return out

    @classmethod
    def build(cls, options: "dict | None" = None) -> "Method":
        """The method with ``options``, checked by name and type here and by value in the constructor."""
        options = dict(options or {})
        known = cls.options()
        if unknown := sorted(set(options) - set(known)):
            offer = f"its options: {', '.join(known)}" if known else "it has none"
            raise ConfigError(f"method {cls.name} has no option {', '.join(map(repr, unknown))} ({offer})")
        for name, value in options.items():
            if not _fits(value, known[name]):
                raise ConfigError(f"{cls.name} option {name} must be {known[name].type.__name__}, got "
                                  f"{type(value).__name__} {value!r}")
        return cls(**options)

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise :class:`~secateurs.errors.ConfigError` where an option of this method does not apply to
        ``pattern`` (checked with the config, before any weight changes)."""

    @property
    def needs_calibration(self) -> bool:
        return self.needs != "none"

    def scores(self, W: torch.Tensor, stats: InputStats) -> torch.Tensor:
        """Importance of every weight, ``(out, in)``; low scores are pruned first."""
        raise NotImplementedError

    @torch.no_grad()
    def prune(self, W: torch.Tensor, stats: InputStats, target: LayerTarget) -> torch.Tensor:
        """Prune ``W`` in place and return the boolean mask of pruned weights (or a :class:`Pruned`)."""
        mask = build_mask(self.scores(W, stats), target.pattern, target.sparsity, target.group)
        zero_where_(W, mask)
        return mask

    def prune_many(self, Ws: list, stats: InputStats, targets: list) -> list:
        """Prune several matrices that read the same input (q/k/v, gate/up); methods may do this jointly."""
        return [self.prune(W, stats, t) for W, t in zip(Ws, targets)]


def _fits(value, option: Option) -> bool:
    if value is None:
        return option.default is None
    if isinstance(value, bool):  # a bool is an int to Python, never to a user
        return option.type is bool
    return isinstance(value, option.type) or (option.type is float and isinstance(value, int))


METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available under ``name`` to the API, CLI and recipes."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ConfigError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str, **options) -> Method:
    """The registered method ``name`` built with ``options`` (checked: :meth:`Method.build`)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
    return cls.build(options)


def option_table() -> dict[str, Option]:
    """Every registered method's options by name (the first method to declare a name sets its type)."""
    table: dict[str, Option] = {}
    for cls in METHODS.values():
        for name, option in cls.options().items():
            table.setdefault(name, option)
    return table
