"""Many processes on torch.distributed: the calibration batches are shared out, the statistics summed.

Launched with torchrun (``torchrun --nproc-per-node N -m secateurs prune ...``), every process (a *rank*) walks
the same blocks over its own contiguous share of the calibration batches::

    observe   -- each rank runs its batches through the block: its statistics are partial sums
    reduce    -- rank 0 gets the whole sums, added exactly as one process adds them: the squared input norms
                 as every batch's vector in batch order; X^T X passed along the ranks, rank 0 adding its
                 batches, then rank 1 adding its own onto that sum, and so on (the products of every rank
                 but the first wait for the sum to come, so this step runs one rank at a time)
    prune     -- rank 0 prunes and verifies the block's layers and sends their new weights to every rank
    propagate -- each rank runs its own batches through the pruned block: the next block's inputs

so magnitude, Wanda and SparseGPT give one process's weights to the last bit (with as many threads per
process: a matrix product may add in another order on more threads).  Evaluation shares its batches the same
way and adds their losses in batch order.  Rank 0 alone writes the output and the report.

Without torch.distributed (or with one process) :func:`current` is :data:`ONE`, whose operations do nothing.
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from ..methods.base import InputStats


class Ranks:
    """One process: every rank operation is the identity."""

    rank, world = 0, 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (calibration batches, evaluation batches)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def check_calibration(self, ids: torch.Tensor, batch_size: int) -> int:
        """The number of calibration batches of ``batch_size`` in ``ids``; :class:`ConfigError` unless every rank
        gets one."""
        batches = -(-len(ids) // batch_size)
        if batches < self.world:
            raise ConfigError(f"{self.world} processes need at least {self.world} calibration batches, "
                              f"there are {batches}: use more --calib-samples or a smaller --batch-size")
        return batches

    def calibration_share(self, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The rows of ``ids`` (samples, seqlen) in this rank's share of the batches of ``batch_size``."""
        mine = self.share(self.check_calibration(ids, batch_size))
        return ids[mine.start * batch_size : mine.stop * batch_size]

    def reduce_stats(self, needs: str, stats: InputStats, parts: "list | None" = None,
                     sum_parts: "list | None" = None) -> InputStats:
        """The whole statistics (``needs``: "norms" or "hessian") on rank 0 from every rank's partial ones;
        other ranks get theirs back unchanged.  ``parts``: this rank's squared-norm vector of every batch, in
        order, or for a Hessian on a rank after the first its batches' inputs, not yet added; ``sum_parts``
        (where the channels' sums are gathered): this rank's sums of every batch, in order."""
        return stats

    def seen(self, names: list) -> set:
        """The names any rank saw (a layer a rank's batches never reached is pruned from the others')."""
        return set(names)

    def send_weights(self, tensors: list) -> None:
        """Rank 0's ``tensors`` (in place) on every rank."""

    def gather(self, items: list) -> list:
        """Every rank's ``items`` on every rank, concatenated in rank order (for shares: in item order)."""
        return items

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (picklable)."""
        return value

    def wait_for_all(self) -> None:
        """Return once every rank has come here (before rank 0 moves what the others still read)."""


ONE = Ranks()


class Distributed(Ranks):
    """The ranks of the default torch.distributed process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def reduce_stats(self, needs: str, stats: InputStats, parts: "list | None" = None,
                     sum_parts: "list | None" = None) -> InputStats:
        dist = self.dist
        width = stats.hessian.shape[0] if stats.hessian is not None else \
            parts[0].shape[-1] if needs == "hessian" and parts else None
        infos = self.gather([(stats.tokens, width)])
        out = InputStats(tokens=sum(t for t, _ in infos))
        if not out.tokens:  # no rank's batches reached this layer
            return out if self.main else stats
        if needs == "hessian":  # passed along the ranks, each adding its batches as one process would go on
            from .sequential import gram_lower_

            width = next(w for _, w in infos if w is not None)
            mine = stats.hessian if stats.hessian is not None else parts[0] if parts else None
            device = mine.device if mine is not None else "cuda" if dist.get_backend() == "nccl" else "cpu"
            if self.main:
                H = stats.hessian if stats.hessian is not None else torch.zeros(width, width, device=device)
                dist.send(H, dst=1)
                dist.recv(H, src=self.world - 1)
                out.hessian = H
            else:
                H = torch.empty(width, width, device=device)
                dist.recv(H, src=self.rank - 1)
                for x in parts or []:
                    gram_lower_(H, x.float())
                dist.send(H, dst=(self.rank + 1) % self.world)
        elif needs == "norms":
            out.sq_norms = self._in_order(parts or [])
        if sum_parts is not None:
            out.sums = self._in_order(sum_parts)
        return out if self.main else stats

    def _in_order(self, parts: list) -> torch.Tensor:
        """Every rank's per-batch vectors added in batch order: one process's sum to the last bit."""
        every = self.gather([p.cpu() for p in parts])
        total = every[0].clone()
        for p in every[1:]:
            total.add_(p)
        return total.to(parts[0].device if parts else "cpu")

    def seen(self, names: list) -> set:
        return set(self.gather(list(names)))

    def send_weights(self, tensors: list) -> None:
        for t in tensors:
            self.dist.broadcast(t.view(torch.uint8) if t.dtype != torch.uint8 else t, src=0)

    def gather(self, items: list) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, items)
        return [x for per_rank in out for x in per_rank]

    def from_main(self, value):
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_all(self) -> None:
        self.dist.barrier()


def lost_a_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is what a collective raises when another process of the run died (gloo says only
    ``Connection reset by peer``; NCCL, a timeout)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text))


def current() -> Ranks:
    """The ranks of this run: :class:`Distributed` once torch.distributed has a process group of several, else
    :data:`ONE`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Distributed()
    return ONE


def launched() -> bool:
    """Whether this process is one of several that torchrun (or another launcher) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str = "cpu") -> Ranks:
    """Join the process group torchrun describes in the environment (``gloo`` on the CPU, ``nccl`` for
    ``cuda``; a CUDA rank takes the GPU of its local rank) and return its :class:`Ranks`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
