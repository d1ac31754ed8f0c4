"""The one block walk that every method shares, weight pruning and structured pruning alike.

For each decoder block in turn, from the calibration inputs captured at the first one::

    move the block to the compute device
    visit     -- the method's stage: observe it, score, prune or cut it (or only measure it)
    outputs   -- the visit returns the block's outputs, or they are computed here from the block as it is
                 now (pruned, cut): either way they are the next block's inputs
    move the block back to the CPU

Only one block and one batch at a time visit the device; activations stay on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..progress import Stage, Tracker
from .capture import StopForward


@torch.no_grad()
def run_block(block: nn.Module, hidden: list, calls: list, device, keep: bool, observer=None, replays: tuple = ()):
    """Run every calibration batch through ``block``; return the outputs (on CPU) if ``keep``.

    ``observer`` (hooks that gather statistics, see :class:`.sequential.Observer`) is told where each batch
    starts and may stop the forward early with :class:`StopForward`; ``replays`` are told the batch index.
    """
    outs = []
    for b, (h, call) in enumerate(zip(hidden, calls)):
        for r in replays:
            r.batch = b
        if observer is not None:
            observer.start_batch(call.tokens)
        try:
            out = call.call(block, h.to(device), device)
        except StopForward:
            continue
        if keep:
            outs.append(out.to("cpu"))
    return outs


class InMemory:
    """Where a walk's blocks come from and go to when the whole model is in memory: nowhere."""

    def enter(self, i: int, block: nn.Module) -> None:
        """Block ``i`` is about to be visited (a streamed model reads it from disk here)."""

    def leave(self, i: int, block: nn.Module) -> None:
        """Block ``i`` is finished (a streamed model writes and frees it here)."""

    def resume(self, first: int) -> None:
        """A resumed walk starts at block ``first``: the blocks before it are finished (and written)."""

    @contextmanager
    def read_only(self):
        """While inside, a walk only reads the blocks (a streamed model writes none and counts none finished)."""
        yield

    @contextmanager
    def outside_blocks(self, output: bool = False):
        """While inside, what runs before the blocks (and with ``output``, after them) is in memory."""
        yield


IN_MEMORY = InMemory()


@dataclass
class BlockVisit:
    """One block's turn in the walk: what a stage needs to observe, change and run it."""

    index: int
    block: nn.Module
    prefix: str  # the block's qualified name with a trailing dot: "model.layers.3."
    hidden: list  # its inputs, one (batch, seq, width) tensor per calibration batch, on the CPU
    calls: list  # how the model called it, per batch (BlockCall: the other arguments, as passed)
    device: torch.device
    need_outputs: bool  # a later block reads this one's outputs
    describe: Callable[[Stage], None]  # shows the current stage on the progress bar

    def run(self, keep: bool = True, observer=None, replays: tuple = ()) -> list:
        return run_block(self.block, self.hidden, self.calls, self.device, keep, observer, replays)


@torch.no_grad()
def walk_blocks(blocks: nn.ModuleList, blocks_name: str, hidden: list, calls: list, device,
                visit: Callable[[BlockVisit], "list | None"], tracker: Tracker, first: int = 0,
                last: "int | None" = None, after: "Callable[[int, list], None] | None" = None,
                source: InMemory = IN_MEMORY) -> list:
    """Walk blocks ``first..last`` (default: all); return the last block's outputs.

    ``visit(step)`` returns the block's outputs, or None to have them computed here from the block as the
    visit left it (needed only while a later block reads them).  ``after(i, outputs)`` runs once block ``i``
    is finished and back on the CPU (a checkpoint saves the walk there).  ``source`` brings each block into
    memory before its visit and takes it away after (a streamed model: :class:`~..models.stream.BlockStream`).
    """
    last = len(blocks) - 1 if last is None else last
    bar = tracker.bar(total=last + 1, initial=first)
    for i in range(first, last + 1):
        block = blocks[i]
        source.enter(i, block)
        block.to(device)
        step = BlockVisit(i, block, f"{blocks_name}.{i}.", hidden, calls[i], device, need_outputs=i < last,
                          describe=lambda stage: tracker.describe(bar, stage))
        step.describe(Stage.CALIBRATING)
        outs = visit(step)
        if outs is None and step.need_outputs:
            step.describe(Stage.CALIBRATING)
            outs = step.run()
        block.to("cpu")
        source.leave(i, block)
        hidden = outs
        bar.update(1)
        if after is not None:
            after(i, hidden)
    bar.close()
    return hidden
