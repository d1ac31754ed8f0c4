"""How a decoder block runs its linears, learnt from one call, and replaying finished parts of it.

True-sequential calibration observes a block's input groups one at a time (attention inputs -> attention
output -> MLP in -> MLP out), pruning each before the next is observed.  Run naively that costs one
forward of the block per group.  Two facts make it cheap:

* A pass that only observes a group can stop as soon as the group's (shared) input has been seen.
* Once every pruned linear inside one of the block's children (say ``self_attn``) is final, and that
  child returns the output of its last linear (``o_proj``) unchanged, the child's output is just that
  linear applied to its cached input.  Later passes *replay* the child -- ``o_proj(x_cached)`` -- instead
  of recomputing attention.

Both facts are read off one real call of the block (:func:`learn_layout`): the execution order and the
input sharing of the hooked linears, and for each child whether its output *is* (the same tensor object
as) its last linear's output.  Nothing is assumed about the architecture; a child that does anything after
its last linear is simply never replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.arch import find_linears


@dataclass
class ChildReplay:
    """A child of the block whose output is the output of its last linear ``linear``."""

    members: frozenset  # relative names of the hooked (pruned) linears inside the child
    linear: str  # relative name of the linear whose output the child returns
    tuple_len: "int | None"  # the child returns ``(output, None, ...)`` of this length, or the bare tensor


@dataclass
class BlockLayout:
    """What one full call of a block showed; blocks with the same linears share it."""

    groups: list  # input groups of the hooked linears, relative names, in execution order
    children: dict = field(default_factory=dict)  # child name -> ChildReplay


@torch.no_grad()
def learn_layout(block: nn.Module, prefix: str, watch: dict, call, hidden: torch.Tensor, device) -> BlockLayout:
    """Run ``block`` once on one batch with hooks and return its :class:`BlockLayout`.

    ``watch`` maps qualified names (``prefix`` + relative name) of the linears to be pruned to modules.
    Linears that receive the identical tensor object form one input group.
    """
    order: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    child_out: dict[str, object] = {}
    linears = find_linears(block)

    def pre(name):
        def hook(module, args):
            order.append(name)
            inputs[name] = args[0]
        return hook

    def post(store, name):
        def hook(module, args, out):
            store[name] = out
        return hook

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in linears.items()]
    handles += [m.register_forward_hook(post(outputs, n)) for n, m in linears.items()]
    handles += [c.register_forward_hook(post(child_out, n)) for n, c in block.named_children()]
    try:
        call.call(block, hidden.to(device), device)
    finally:
        for h in handles:
            h.remove()

    watched = {name[len(prefix):] for name in watch}
    groups: list[list[str]] = []
    for name in order:
        if name not in watched or any(name in g for g in groups):
            continue
        for g in groups:
            if inputs[g[0]] is inputs[name]:
                g.append(name)
                break
        else:
            groups.append([name])

    children = {}
    for child, out in child_out.items():
        inside = [n for n in order if n.startswith(child + ".")]
        if not inside:
            continue
        last = inside[-1]
        hidden_out, tuple_len = out, None
        if isinstance(out, tuple):
            if not out or any(x is not None for x in out[1:]):
                continue  # it returns more than its hidden states (a cache, position bias...): not replayable
            hidden_out, tuple_len = out[0], len(out)
        if last in watched and hidden_out is outputs.get(last):
            children[child] = ChildReplay(frozenset(n for n in inside if n in watched), last, tuple_len)
    return BlockLayout(groups, children)


class Replay:
    """Stand-in ``forward`` for a finished child: its last linear applied to that linear's cached inputs."""

    def __init__(self, child: nn.Module, linear: nn.Module, inputs: list, tuple_len: "int | None", device):
        self.child, self.linear, self.inputs, self.tuple_len, self.device = child, linear, inputs, tuple_len, device
        self.batch = 0

    def __call__(self, *args, **kwargs):
        out = self.linear(self.inputs[self.batch].to(self.device))
        return out if self.tuple_len is None else (out,) + (None,) * (self.tuple_len - 1)

    def install(self) -> None:
        self.child.forward = self  # on the instance: the class's forward is untouched

    def remove(self) -> None:
        if "forward" in vars(self.child):
            del self.child.forward
