"""A mixture of experts' fused experts, seen as ordinary linear layers for as long as a prune runs.

transformers 5 stores the experts of a block as two fused parameters: ``gate_up_proj`` of shape
``(E, 2I, H)`` (each expert's gate rows, then its up rows) and ``down_proj`` of shape ``(E, H, I)``.  Expert
``e`` computes, for the tokens ``t`` its router sent it, with routing weight ``r_te``::

    y_t = r_te * down_e( act(gate_e x_t) * up_e x_t )

:func:`expose` gives every expert three linears -- ``experts.{e}.gate_proj``, ``up_proj`` and ``down_proj``,
the names most families write to disk -- whose weights are *views* of the fused tensors (a write goes
straight into them), and swaps the experts' forward for :class:`Routed`, which sends each token through the
views of the experts it was routed to.  So the engine prunes experts with every method and pattern like any
linear, and its hooks see exactly the tokens routed to each expert:

* ``gate_proj``, ``up_proj`` read ``x_t`` for the tokens routed to ``e`` (one input: ``X_e^T X_e``);
* ``down_proj`` reads ``r_te * h_t``: since ``r * down(h) = down(r * h)``, the routing weight is applied
  before ``down_proj`` rather than after, so its statistics weigh each token by how much its output counts.

Every expert runs on every call, with no tokens if none were routed to it, so each view is seen in every
batch.  The first call also runs the model's own forward and compares the two: a family whose experts
compute something else is refused (:class:`~..errors.ArchitectureError`) before any weight changes.
:func:`conceal` restores the module as it was; the views own no tensor, so the state dict never changes.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ArchitectureError

# the layout of use_experts_implementation's default, the only one the views read (others stay untouched)
LAYOUT = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
          "has_post_expert_norm": False}


class ExpertLinear(nn.Module):
    """Rows ``rows`` of expert ``index`` of a fused ``(E, out, in)`` parameter, as a linear layer."""

    def __init__(self, experts: nn.Module, param: str, index: int, rows: tuple[int, int]):
        super().__init__()
        object.__setattr__(self, "_experts", experts)  # not a child: the experts module holds the views
        self.param, self.index, self.rows = param, index, rows

    @property
    def weight(self) -> torch.Tensor:
        """``(out, in)``, a view of the fused parameter."""
        return getattr(self._experts, self.param)[self.index, self.rows[0]:self.rows[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}, {self.rows[0]}:{self.rows[1]}]"


class ExpertMLP(nn.Module):
    """One expert's three matrices as linears (views of the fused parameters)."""

    def __init__(self, experts: nn.Module, index: int):
        super().__init__()
        inter = experts.down_proj.shape[-1]
        self.gate_proj = ExpertLinear(experts, "gate_up_proj", index, (0, inter))
        self.up_proj = ExpertLinear(experts, "gate_up_proj", index, (inter, 2 * inter))
        self.down_proj = ExpertLinear(experts, "down_proj", index, (0, experts.down_proj.shape[1]))


def is_fused(module: nn.Module) -> bool:
    """Does ``module`` hold experts fused in the layout the views read?"""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not hasattr(module, "_apply_gate"):
        return False
    E, two_i, H = gate_up.shape
    return tuple(down.shape) == (E, H, two_i // 2) and all(getattr(module, k, v) == v for k, v in LAYOUT.items())


class Routed:
    """The experts' forward through the views: each expert gets its routed tokens, in order."""

    def __init__(self, experts: nn.Module, name: str):
        self.experts, self.name = experts, name
        self.checked = False
        self.signature = inspect.signature(type(experts).forward)

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(self.experts, *args, **kwargs)
        hidden, index, weights = list(bound.arguments.values())[1:4]
        out = torch.zeros_like(hidden)
        for e in range(self.experts.gate_up_proj.shape[0]):
            mlp = getattr(self.experts, str(e))
            token, slot = torch.where(index == e)  # every token at most once: top-k picks distinct experts
            x = hidden[token]
            gated = self.experts._apply_gate(torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1))
            y = mlp.down_proj((gated * weights[token, slot, None]).to(gated.dtype))
            out.index_add_(0, token, y.to(out.dtype))
        if not self.checked:
            self._check(out, args, kwargs)
        return out

    def _check(self, out: torch.Tensor, args, kwargs) -> None:
        want = type(self.experts).forward(self.experts, *args, **kwargs)
        # rounding differs (the routing weight is applied before down_proj, gate and up are two products)
        tolerance = 1e-4 if out.dtype == torch.float32 else 5e-2
        error = float((out.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
        if not error <= tolerance:
            raise ArchitectureError(f"{self.name}: its experts compute something other than the standard "
                                    f"routed gated MLP (relative difference {error:.2g}); secateurs cannot prune "
                                    "them: --exclude experts leaves them as they are")
        self.checked = True


def expose(model: nn.Module) -> list[str]:
    """Give every fused experts module of ``model`` its per-expert views (see the module docstring); return
    their qualified names.  Exposing twice changes nothing."""
    exposed = []
    for name, module in list(model.named_modules()):
        if not is_fused(module) or "forward" in vars(module):
            continue
        for e in range(module.gate_up_proj.shape[0]):
            module.add_module(str(e), ExpertMLP(module, e))
        module.forward = Routed(module, name)
        exposed.append(name)
    return exposed


def conceal(model: nn.Module) -> None:
    """Undo :func:`expose`: the experts modules are as transformers made them."""
    for module in model.modules():
        if isinstance(vars(module).get("forward"), Routed):
            del module.forward
            for e in range(module.gate_up_proj.shape[0]):
                delattr(module, str(e))


def viewed(block: nn.Module) -> set[str]:
    """The names (relative to ``block``) of the fused parameters its exposed experts' views cover."""
    return {f"{name}.{param}" for name, module in block.named_modules()
            if isinstance(vars(module).get("forward"), Routed) for param in ("gate_up_proj", "down_proj")}


def stage_of(module: nn.Module) -> "int | None":
    """An expert view's place in its expert: 0 for gate and up (they read the expert's input), 1 for down;
    None for any other module."""
    if isinstance(module, ExpertLinear):
        return 0 if module.param == "gate_up_proj" else 1
    return None


def routers(block: nn.Module) -> set[str]:
    """The modules of ``block`` (relative names) that route tokens rather than transform them: beside a child
    called ``experts``, one with a weight called ``gate`` or ``router`` or ending in ``_gate`` (Qwen2-MoE's
    ``shared_expert_gate``).  secateurs never prunes them: a router is tiny and every token's path runs
    through it."""
    out = set()
    for name, module in block.named_modules():
        if not hasattr(module, "experts"):
            continue
        for child, sub in module.named_children():
            if hasattr(sub, "weight") and (child in ("gate", "router") or child.endswith("_gate")):
                out.add(f"{name}.{child}" if name else child)
    return out
