"""Weight pruning on the one block walk (:mod:`.walk`): observe, prune, propagate.

Each block's visit::

    observe  -- run the calibration batches through it; forward pre-hooks on its linears accumulate the
                statistics the method needs (nothing, input norms, or X^T X)
    prune    -- hand each weight matrix, its statistics and its target (from the allocation step,
                :mod:`.allocation`) to the method (pure math); verify every layer before writing it back
    outputs  -- recomputed with the pruned weights (``propagate="pruned"``, the reference behaviour) or the
                dense outputs seen while observing (``propagate="dense"``) feed the next block

With ``refine="admm"`` the statistics are always ``X^T X`` and, after the method has chosen a layer's mask,
the kept weights are re-fitted to the dense layer's outputs (:mod:`..methods.reconstruct`); with
``refine="dsnot"`` the channels' sums are gathered too and the mask itself is refined (:mod:`..methods.dsnot`).

Linears that are fed the *same tensor object* (q/k/v; gate/up) form one **input set**: they share a single
statistics accumulator (one ``X^T X``, not three); the sets are learnt from one call of the block
(:mod:`.layout`).  With ``true_sequential`` each set is pruned before the next one is observed
(attention inputs -> attention output -> MLP in -> MLP out), and finished parts of the block are replayed
from cached inputs rather than recomputed.  With a ranking allocation (``global``) the walk only scores, and
the masks are chosen after it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..allocator import give_back_freed_memory
from ..errors import CalibrationError, ConfigError, VerificationError
from ..linalg import mirror_lower_
from ..methods.base import InputStats, LayerTarget, Method, Pruned
from ..methods.dsnot import dsnot
from ..methods.reconstruct import admm_reconstruct
from ..models.arch import (check_finite, find_blocks, find_linears, is_transposed, non_finite, role_of, set_weight_of,
                           weight_of)
from ..models.experts import ExpertLinear, expose, routers, stage_of, viewed
from ..patterns import build_mask, check_nm, check_tiles, is_permutation, zero_where_
from ..quant import round_to_nearest
from ..progress import Stage, Tracker
from .allocation import OWL, allocation_of
from .capture import StopForward, capture_inputs, real_tokens
from .distributed import ONE, Ranks, current
from .layout import BlockLayout, Replay, learn_layout
from .walk import IN_MEMORY, BlockVisit, InMemory, walk_blocks

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What happened to one weight matrix."""

    name: str
    block: "int | None"
    role: str
    shape: tuple
    target: "float | None"  # None for threshold pruning
    pruned: int  # weights the method chose to remove
    zeros: int  # zeros measured in the final weight (may include weights that were already zero)
    numel: int
    routed_tokens: "int | None" = None  # an expert's matrix: the calibration tokens routed to the expert
    order: "tuple | None" = None  # the input order under which its N:M pattern holds, where the method chose one

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


# --------------------------------------------------------------------------- statistics


def gram_lower_(H: torch.Tensor, x: torch.Tensor, target_chunk: int = 300) -> None:
    """``H += x^T x`` for ``x`` (tokens, in), computing only the chunk pairs on or below the diagonal.

    ``x^T x`` is symmetric, so the strictly upper chunk pairs are skipped (up to ~40% of the work for
    wide inputs) and filled in once by :func:`~secateurs.linalg.mirror_lower_`.  The width is cut into equal
    chunks of about ``target_chunk`` columns: smaller ones make the matrix products less efficient on a CPU.
    """
    n = x.shape[1]
    chunk = -(-n // max(1, round(n / target_chunk)))  # ceil(n / number of chunks)
    for i in range(0, n, chunk):
        H[i : i + chunk, : i + chunk].addmm_(x[:, i : i + chunk].t(), x[:, : i + chunk])


class Observer:
    """Forward pre-hooks that accumulate :class:`InputStats` for a set of linear layers.

    ``groups`` maps every layer to its input group (from :func:`.layout.learn_layout`): layers of one
    group read the same tensor and share one accumulator, fed once per batch.  With ``stop_after`` set,
    the forward is cut short with :class:`StopForward` as soon as that layer's input has been seen -- the
    block's output is not needed while only observing.
    """

    def __init__(self, layers: dict[str, nn.Module], needs: str, groups: dict[str, int],
                 stop_after: "str | None" = None, keep_inputs: bool = False, ranks: Ranks = ONE,
                 sums: bool = False):
        self.needs = needs
        self.sums = sums  # also sum_t x_tj, for the channels' means
        self.sum_parts: dict[int, list] = {}  # several ranks: every batch's sums, added in order by rank 0
        self.inputs: "dict[int, list] | None" = {} if keep_inputs else None  # group id -> its input per batch (CPU)
        self.group_of = dict(groups)  # layer name -> input group id
        self.stats: dict[int, InputStats] = {}
        self.ranks = ranks
        # several ranks: every batch's squared norms (summed in order by rank 0), or on ranks after the first
        # every batch's input, whose X^T X is added onto the sum of the ranks before (see distributed.py)
        self.parts: dict[int, list] = {}
        self._whole: dict[int, InputStats] = {}  # group id -> its statistics over every rank's batches
        self.order: list[str] = []  # the hooked layers seen, in execution order
        self.stop_after = stop_after
        self._done: set[int] = set()
        self._tokens: "torch.Tensor | None" = None  # the current batch's real tokens, if it is padded
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def start_batch(self, tokens: "torch.Tensor | None" = None) -> None:
        """A new batch begins; ``tokens`` (batch, seq) marks its real tokens where it is padded (an encoder's
        examples): statistics count only those."""
        self._done.clear()
        self._tokens = tokens

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.order:
                self.order.append(name)
            gid = self.group_of[name]
            if gid not in self._done:
                self._done.add(gid)
                self._accumulate(gid, x)
            if name == self.stop_after:
                raise StopForward

        return hook

    @torch.no_grad()
    def _accumulate(self, gid: int, x: torch.Tensor) -> None:
        if self.inputs is not None:
            self.inputs.setdefault(gid, []).append(x.detach().to("cpu"))
        if self.needs == "none":
            return
        x = real_tokens(x, self._tokens)
        st = self.stats.setdefault(gid, InputStats())
        st.tokens += x.reshape(-1, x.shape[-1]).shape[0]
        if self.sums:
            total = x.reshape(-1, x.shape[-1]).float().sum(0)
            if self.ranks.world > 1:
                self.sum_parts.setdefault(gid, []).append(total.clone())
            st.sums = total if st.sums is None else st.sums.add_(total)
        if self.needs == "hessian" and self.ranks.rank > 0:  # added onto the earlier ranks' sum when it comes
            self.parts.setdefault(gid, []).append(x.detach().reshape(-1, x.shape[-1]))
            return
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.needs == "norms":
            sq = (x * x).sum(0)
            if self.ranks.world > 1:
                self.parts.setdefault(gid, []).append(sq.clone())
            st.sq_norms = sq if st.sq_norms is None else st.sq_norms.add_(sq)
        else:  # hessian: H += X^T X ; the squared norms are its diagonal
            if st.hessian is None:
                st.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            gram_lower_(st.hessian, x)

    def seen(self) -> list[str]:
        """The hooked layers whose input this run saw (on any rank), in execution order."""
        seen = self.ranks.seen(self.order)
        return [n for n in self.group_of if n in seen]

    def stats_for(self, name: str) -> InputStats:
        gid = self.group_of.get(name, -1)
        if gid not in self._whole:  # first use: add up the ranks' parts, complete the symmetric matrix
            st = self.ranks.reduce_stats(self.needs, self.stats.get(gid, InputStats()),
                                         self.parts.pop(gid, None), self.sum_parts.pop(gid, [])
                                         if self.sums else None)
            if st.hessian is not None:
                mirror_lower_(st.hessian)
                st.sq_norms = torch.diag(st.hessian)
            self._whole[gid] = st
        st = self._whole[gid]
        # an inf or NaN input makes its channel's squared norm (the Hessian's diagonal) inf or NaN: scores and
        # masks built from it would be arbitrary, so stop here rather than save a silently broken model
        if st.sq_norms is not None and not bool(torch.isfinite(st.sq_norms).all()):
            raise CalibrationError(f"{name}: its calibration inputs hold inf or NaN values (an overflow in half "
                                   "precision? load the model in float32)")
        return st

    def take(self, name: str) -> InputStats:
        """:meth:`stats_for`, handed over: the observer keeps nothing of them (bounded memory when statistics
        are gathered for many groups and used one at a time)."""
        st = self.stats_for(name)
        gid = self.group_of.get(name, -1)
        self._whole.pop(gid, None)
        self.stats.pop(gid, None)
        return st

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- pruning one layer


def verify_layer(name: str, W: torch.Tensor, mask: torch.Tensor, target: LayerTarget,
                 exact_fraction: bool, order: "torch.Tensor | None" = None) -> tuple[int, int]:
    """Fail loudly unless ``W`` obeys the target: every weight finite, masked ones zero, pattern respected
    (an N:M pattern in the input ``order`` where the method reordered them), fraction right.

    Returns what it counted on the way: ``(pruned, zeros)``, the weights the mask removes and the zeros
    in ``W`` (which may include weights that were zero already).
    """
    if bad := non_finite(W):  # an update that overflowed (SparseGPT, ADMM): the kept weights are garbage
        raise VerificationError(f"{name}: the method left {bad} of its {W.numel()} weights inf or NaN")
    nonzero = W != 0
    if nonzero.logical_and(mask).any():
        raise VerificationError(f"{name}: weights selected for pruning are not zero")
    pattern = target.pattern
    if order is not None and not is_permutation(order, W.shape[1]):
        raise VerificationError(f"{name}: the input order is not a permutation of its {W.shape[1]} inputs")
    if pattern.kind == "nm" and (bad := check_nm(nonzero if order is None else nonzero[:, order],
                                                 pattern.n, pattern.m)):
        raise VerificationError(f"{name}: {bad} groups break the {pattern} pattern")
    if pattern.kind == "block" and (bad := check_tiles(mask, pattern.block)):
        raise VerificationError(f"{name}: {bad} tiles are only partly pruned under {pattern}")
    pruned = int(torch.count_nonzero(mask))
    if exact_fraction:
        got = pruned / mask.numel()
        # every selection rounds down once per comparison group: at most one tile row per output row
        tolerance = (pattern.block or pattern.m or 1) / W.shape[1] + 1e-6
        if abs(got - target.sparsity) > tolerance:
            raise VerificationError(f"{name}: pruned {got:.4f} of the weights, target {target.sparsity:.4f}")
    return pruned, W.numel() - int(torch.count_nonzero(nonzero))


def record(name: str, block: "int | None", W: torch.Tensor, counts: tuple[int, int],
           target: "float | None", order: "torch.Tensor | None" = None) -> LayerRecord:
    """The :class:`LayerRecord` of a verified layer; ``counts`` is what :func:`verify_layer` returned."""
    pruned, zeros = counts
    return LayerRecord(name, block, role_of(name), tuple(W.shape), target, pruned, zeros, W.numel(),
                       order=None if order is None else tuple(order.tolist()))


def refiner(config, seqlen: int):
    """The refinement a config asks for, as ``f(W, W0, stats, pruned, pattern, names) -> (W, pruned)`` (``names``:
    the layers whose stacked rows ``W`` holds), or None.  ``seqlen``: the calibration sequences' length."""
    settings = config.resolved
    if config.refine == "admm":
        return lambda W, W0, stats, pruned, pattern, names: (admm_reconstruct(
            W, W0, stats.hessian, ~pruned, settings.refine_iters, settings.refine_damp), pruned)
    if config.refine == "dsnot":
        def refine(W, W0, stats, pruned, pattern, names):
            if settings.refine_scope != "all" and role_of(names[0]) != settings.refine_scope:
                return W, pruned  # layers sharing one input share their role
            # the paper's code measures a row's error on each channel's input summed over a sequence (averaged
            # over sequences): seqlen times the error per token that dsnot() works with
            return dsnot(W, W0, pruned, stats, pattern, settings.refine_iters, settings.refine_threshold / seqlen)
        return refine
    return None


ROWS_AT_ONCE = 2**22  # weights a row-local method scores at once: 16 MiB of float32


def by_rows(method: Method, target: LayerTarget, refine) -> bool:
    """Can one matrix be pruned a few rows at a time (:func:`prune_rows`)?  When the method says its rows are
    independent and prunes by the base rule (scores, then the pattern's mask), the target compares scores within
    rows (unstructured or N:M: a tile's summed score might round differently in a smaller tensor), and nothing
    needs the float32 matrix whole (a refinement, quantization)."""
    return (method.row_local and type(method).prune is Method.prune and refine is None and target.quant is None
            and target.group == "row" and target.pattern.kind in ("unstructured", "nm"))


@torch.no_grad()
def prune_rows(method: Method, W: torch.Tensor, stats: InputStats, target: LayerTarget, device) -> tuple:
    """``(pruned copy of W, mask)``, the copy in W's own dtype, each chunk of rows scored in float32 and its
    masked weights zeroed: bit for bit what pruning the whole matrix in float32 gives (a row's scores and
    selection do not depend on other rows, and a kept weight goes float32 and back unchanged), with a float32
    copy of one chunk alive instead of two of the matrix (the weights and their scores)."""
    out = W.to(device=device, copy=True, memory_format=torch.contiguous_format)
    mask = torch.empty(out.shape, dtype=torch.bool, device=out.device)
    step = max(1, ROWS_AT_ONCE // max(1, out.shape[1]))
    for a in range(0, out.shape[0], step):
        rows = out[a : a + step]
        scores = method.scores(rows.to(torch.float32), stats)
        mask[a : a + step] = build_mask(scores, target.pattern, target.sparsity, target.group)
        zero_where_(rows, mask[a : a + step])
    return out, mask


@torch.no_grad()
def prune_layers(names: list, modules: list, method: Method, stats: InputStats, targets: list,
                 block: "int | None", device, refine=None) -> list[LayerRecord]:
    """Prune layers that share one input; weights are written back only once every one verified.

    ``refine`` (see :func:`refiner`) refines all of them in one pass over their stacked rows: they share
    their statistics, and each row is its own problem.  Without it, a method
    that prunes each matrix on its own (the base :meth:`Method.prune_many`) gets them one at a time, so
    that only one float32 copy is alive at once; each verified result waits in the model's dtype.
    """
    originals = [weight_of(m) for m in modules]
    independent = refine is None and type(method).prune_many is Method.prune_many
    together = [[i] for i in range(len(modules))] if independent else [list(range(len(modules)))]
    finished = {}
    for part in together:
        if independent and by_rows(method, targets[part[0]], refine):  # one matrix, a few rows at a time
            i = part[0]
            W, mask = prune_rows(method, originals[i], stats, targets[i], device)
            counts = verify_layer(names[i], W, mask, targets[i], method.meets_target)
            finished[i] = W.to(originals[i].device), counts, None, None
            continue
        Ws = []
        for i in part:
            W = originals[i].to(device=device, dtype=torch.float32)
            # the method edits in place: never let a failure leave a half-pruned weight in the model
            Ws.append(W.clone() if W.data_ptr() == originals[i].data_ptr() else W)
        results = [Pruned.of(r) for r in method.prune_many(Ws, stats, [targets[i] for i in part])]
        # a method that quantized inside its own sweep returned the scales; one that reordered inputs, the order
        scales, orders, masks = [r.scales for r in results], [r.order for r in results], [r.mask for r in results]
        del results
        if refine is not None:
            W0 = torch.cat([originals[i].to(device=device, dtype=torch.float32) for i in part])
            W, mask = refine(torch.cat(Ws), W0, stats, torch.cat(masks), targets[part[0]].pattern,
                             [names[i] for i in part])
            sizes = [w.shape[0] for w in Ws]
            Ws, masks = list(W.split(sizes)), list(mask.split(sizes))
        for k, i in enumerate(part):
            W, mask = Ws[k], masks[k]
            Ws[k] = masks[k] = None  # each float32 copy goes once its result waits in the model's dtype
            if (quant := targets[i].quant) is not None and scales[k] is None:  # round to nearest on its own grid
                W, scales[k] = round_to_nearest(W, quant)
            counts = verify_layer(names[i], W, mask, targets[i], method.meets_target, orders[k])
            finished[i] = W.to(originals[i].device, originals[i].dtype), counts, scales[k], orders[k]
            del W, mask
    out = []
    for i, (name, module, target) in enumerate(zip(names, modules, targets)):
        W, counted, scale, order = finished.pop(i)
        set_weight_of(module, W)
        if scale is not None:  # saved beside the weight (as NAME.weight_scale) until the saver packs the codes
            module.register_buffer("weight_scale", scale.to(W.device, W.dtype))
        out.append(record(name, block, W, counted, target.sparsity if method.meets_target else None, order))
    return out


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Which linears of which block to prune, and to what (each layer's target from the allocation step)."""

    blocks_name: str
    blocks: nn.ModuleList
    layers: list  # per block: {qualified name: (module, LayerTarget)}
    untouched: dict = field(default_factory=dict)  # weights in scope the engine cannot prune: name -> count

    @property
    def all_layers(self):
        for i, per_block in enumerate(self.layers):
            for name, (module, target) in per_block.items():
                yield i, name, module, target


def make_plan(model: nn.Module, config) -> Plan:
    """What ``config`` prunes in ``model``, every layer checked.  A mixture of experts' fused experts are
    exposed as linears (:func:`~..models.experts.expose`; :func:`~..models.experts.conceal` undoes it);
    routers are never pruned."""
    blocks_name, blocks = find_blocks(model)
    expose(model)
    pattern = config.pattern_value
    group = config.resolved.group
    quant = config.quant_value
    allocation = allocation_of(config)
    linears, routing = [], []
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}."
        skip = {prefix + name for name in routers(block)}
        linears.append({n: m for n, m in find_linears(block, prefix).items() if n not in skip})
        routing += [(name, i) for name in sorted(skip)]
    config.check_names([(name, i) for i, found in enumerate(linears) for name in found] + routing, len(blocks))
    layers = []
    for i, found in enumerate(linears):
        chosen = {}
        for name, module in found.items():
            if not config.selects(name, role_of(name)):
                continue
            W = weight_of(module)
            pattern.validate_shape(*W.shape, name=name)
            if quant is not None:
                if isinstance(module, ExpertLinear):
                    raise ConfigError(f"{name}: quant int8/int4 does not store a mixture of experts' experts yet; "
                                      "--exclude experts leaves them dense")
                if is_transposed(module):
                    raise ConfigError(f"{name}: quant int8/int4 is written for weights stored (out, in); this "
                                      f"{type(module).__name__} stores (in, out)")
                quant.validate_shape(W.shape[1], name=name)
            check_finite(name, W)
            scaled = replace(quant, scale_dtype=W.dtype) if quant is not None else None  # scales as stored
            chosen[name] = (module, LayerTarget(pattern, allocation.target(config, name, i), group, scaled))
        layers.append(chosen)
    if not any(layers):
        if chosen := [name for name, _ in routing if config.selects(name, role_of(name))]:
            raise ConfigError(f"the include/exclude selection holds only routers ({', '.join(chosen[:2])}"
                              f"{' ...' if len(chosen) > 2 else ''}), which secateurs never prunes: nothing to prune")
        raise ConfigError("no linear layer matches the include/exclude selection: nothing to prune")
    untouched = untouched_in_scope(blocks_name, blocks, linears, config)
    check_partial(untouched, sum(weight_of(m).numel() for per_block in layers for m, _ in per_block.values()),
                  config, {name for name, _ in routing})
    return Plan(blocks_name, blocks, layers, untouched)


PARTIAL_SHARE = 0.01  # more of the scope than this left unpruned is refused without allow_partial


def untouched_in_scope(blocks_name: str, blocks, linears: list, config) -> dict[str, int]:
    """The weight tensors (2-D and more: not norms or biases) of the blocks in ``config``'s scope that are not
    the weight of a linear the engine prunes -- a mixture of experts' fused 3-D experts, its router -- with
    their sizes: the part of the scope a prune leaves as it is."""
    out = {}
    for i, block in enumerate(blocks):
        pruned = {f"{name}.weight" for name in linears[i]}
        pruned |= {f"{blocks_name}.{i}.{name}" for name in viewed(block)}  # fused experts, pruned through views
        for name, p in block.named_parameters():
            qualified = f"{blocks_name}.{i}.{name}"
            owner = qualified.rsplit(".", 1)[0]
            if p.dim() >= 2 and qualified not in pruned and config.selects(owner, role_of(owner)):
                out[qualified] = p.numel()
    return out


def check_partial(untouched: dict, pruned: int, config, routing: "set[str]" = frozenset()) -> None:
    """Refuse a prune that would leave more than :data:`PARTIAL_SHARE` of its scope's weights untouched (a
    "50% sparse" model that is 5% sparse), unless ``config.allow_partial``; name what is left either way
    (routers, modules named in ``routing``, are never pruned: they are only counted)."""
    if not untouched:
        return
    if all(name.rsplit(".", 1)[0] in routing for name in untouched):
        log.info("the routers are never pruned; the reported sparsity counts their %d weights",
                 sum(untouched.values()))
        return
    total = sum(untouched.values())
    share = total / (total + pruned)
    largest = sorted(untouched, key=untouched.get, reverse=True)
    named = ", ".join(largest[:3]) + (f" and {len(largest) - 3} more" if len(largest) > 3 else "")
    if share > PARTIAL_SHARE and not config.allow_partial:
        raise ConfigError(f"{share:.1%} of the weights in scope are not ones secateurs can prune yet ({named}): the "
                          "model would be far less sparse than asked. Narrow the scope (--include attention, "
                          "--exclude REGEX), or prune the rest with --allow-partial (the reported sparsity counts "
                          "what is left)")
    log.warning("%.1f%% of the weights in scope are left as they are (%s); the reported sparsity counts them",
                share * 100, named)


@torch.no_grad()
def apply_mask(name: str, block: "int | None", module: nn.Module, mask: torch.Tensor, target: LayerTarget) -> LayerRecord:
    W = weight_of(module)
    mask = mask.to(W.device)
    zero_where_(W, mask)
    return record(name, block, W, verify_layer(name, W, mask, target, exact_fraction=False), None)


def _apply_ranking(plan: Plan, config, scores: dict) -> list[LayerRecord]:
    """A ranking allocation's masks, chosen from every layer's scores at once, applied and verified."""
    masks = allocation_of(config).masks(scores, config.pattern_value, config.resolved.sparsity)
    scores.clear()
    return [apply_mask(name, i, module, masks.pop(name), target) for i, name, module, target in plan.all_layers]


@torch.no_grad()
def prune_without_data(plan: Plan, method: Method, config, tracker: Tracker,
                       source: InMemory = IN_MEMORY) -> list[LayerRecord]:
    """Methods that need no calibration (magnitude) touch the weights directly, block by block (``source``
    brings each into memory and takes it away, as in a walk)."""
    tracker.enter(Stage.COMPUTING_IMPORTANCE)
    if allocation_of(config).ranks:
        scores = {name: method.scores(weight_of(m).float(), InputStats()) for _, name, m, _ in plan.all_layers}
        tracker.enter(Stage.PRUNING)
        return _apply_ranking(plan, config, scores)
    tracker.enter(Stage.PRUNING)
    records = []
    for i, block in enumerate(tracker.bar(plan.blocks)):
        if not plan.layers[i]:
            continue  # nothing to prune: a streamed model copies it as it is
        source.enter(i, block)
        records += [prune_layers([name], [module], method, InputStats(), [target], i, config.device)[0]
                    for name, (module, target) in plan.layers[i].items()]
        source.leave(i, block)
    return records


# --------------------------------------------------------------------------- passes over one block

MIN_EXPERT_TOKENS = 16  # an expert routed fewer calibration tokens is pruned by magnitude
EXPERT_STATS_BYTES = 1 << 30  # experts' statistics held at once (at least one expert's): more passes beyond


def stats_bytes(needs: str, width: int) -> int:
    """The float32 statistics ``needs`` of one input ``width`` wide take."""
    return {"none": 0, "norms": 4 * width, "hessian": 4 * width * width}[needs]


def identity_stats(needs: str, width: int, tokens: int, device, sums: bool = False) -> InputStats:
    """Statistics of unit norms (``H = I``): Wanda's scores become ``|W|`` and SparseGPT's OBS removes the
    smallest ``w^2`` with no update -- magnitude pruning, for an expert too rarely routed to measure.  Zero
    means, where ``sums`` are asked for: DSnoT sees no error to mend."""
    ones = torch.ones(width, device=device)
    return InputStats(tokens, sq_norms=ones if needs != "none" else None,
                      hessian=torch.diag(ones) if needs == "hessian" else None,
                      sums=torch.zeros(width, device=device) if sums else None)


@dataclass
class Pass:
    """One observing run of a block: the input groups it gathers statistics for (in execution order), and
    those it prunes when it ends."""

    observe: list
    prune: list


def plan_passes(groups: list, expert, size, sequential: bool, budget: "int | None" = None) -> list[Pass]:
    """The runs of a block that observe its input ``groups`` (in execution order) and when each is pruned.

    ``expert(group)`` is ``(key, stage)`` for a group of expert ``key`` (stage 0: gate and up, 1: down) and
    None for any other; ``size(group)``: the bytes of its statistics.  Without experts: at once, one pass
    observes every group and prunes them all; true ``sequential``, one pass per group.  Experts have a set of
    statistics each (a mixture of 64 experts, 64 Hessians), so at most ``budget`` bytes of them
    (:data:`EXPERT_STATS_BYTES`; at least one expert's) are gathered per pass.  No expert reads what another
    writes, so a pass prunes its experts as soon as it ends: at once, whole experts per pass, the other groups
    observed in the first and pruned after the last; true sequential, every expert's gate and up, then every
    expert's down.
    """
    budget = EXPERT_STATS_BYTES if budget is None else budget

    def chunks(parts: list) -> list[list]:  # parts: lists of groups, kept whole, cut into runs within budget
        out, held = [], budget
        for part in parts:
            need = sum(size(g) for g in part)
            if not out or held + need > budget:
                out.append([])
                held = 0
            out[-1] += part
            held += need
        return out

    order = {g[0]: k for k, g in enumerate(groups)}
    if not sequential:
        others = [g for g in groups if expert(g) is None]
        experts: dict = {}
        for g in groups:
            if expert(g) is not None:
                experts.setdefault(expert(g)[0], []).append(g)
        runs = chunks(list(experts.values())) or [[]]
        passes = [Pass(sorted((others if k == 0 else []) + run, key=lambda g: order[g[0]]), list(run))
                  for k, run in enumerate(runs)]
        passes[-1].prune += others
        return passes
    passes, k = [], 0
    while k < len(groups):
        if expert(groups[k]) is None:
            passes.append(Pass([groups[k]], [groups[k]]))
            k += 1
            continue
        end = k
        while end < len(groups) and expert(groups[end]) is not None:
            end += 1
        for stage in (0, 1):
            for run in chunks([[g] for g in groups[k:end] if expert(g)[1] == stage]):
                passes.append(Pass(run, run))
        k = end
    return passes


# --------------------------------------------------------------------------- the weight walk


@dataclass
class WeightJob:
    """What every block's visit of a weight-pruning walk shares."""

    plan: Plan
    method: Method
    config: object  # PruneConfig
    refine: "object | None"  # see :func:`refiner`
    scores: "dict | None"  # a ranking allocation: every layer's scores, gathered here, masks chosen after the walk
    layouts: dict  # input groups learnt once per set of hooked layers: blocks are alike
    ranks: Ranks = ONE  # several processes: rank 0 prunes, every rank gets the weights
    routed: dict = field(default_factory=dict)  # expert views -> the calibration tokens routed to their expert

    def layers(self, step: BlockVisit) -> dict:
        return self.plan.layers[step.index]

    def groups(self, step: BlockVisit) -> list[list[str]]:
        """The block's input groups as qualified names; hooked layers the block never ran are left dense."""
        layers = self.layers(step)
        if not layers:
            return []
        key = frozenset(n[len(step.prefix):] for n in layers)
        if key not in self.layouts:
            watch = {n: m for n, (m, _) in layers.items()}
            self.layouts[key] = learn_layout(step.block, step.prefix, watch, step.calls[0], step.hidden[0],
                                             step.device)
        groups = [[step.prefix + r for r in g] for g in self.layouts[key].groups]
        seen = {n for g in groups for n in g}
        if unseen := [n for n in layers if n not in seen]:
            log.warning("%s never ran during calibration; left dense", ", ".join(unseen))
        return groups

    def passes(self, step: BlockVisit, groups: list, sequential: bool) -> list["Pass"]:
        layers = self.layers(step)

        def expert(group):  # (which expert, its stage) of an expert view's group, or None
            module = layers[group[0]][0]
            return None if stage_of(module) is None else ((id(module._experts), module.index), stage_of(module))

        width = {g[0]: weight_of(layers[g[0]][0]).shape[1] for g in groups}
        return plan_passes(groups, expert, lambda g: stats_bytes(self.config.needs, width[g[0]]), sequential)

    def stats(self, step: BlockVisit, names: list, observer: Observer) -> InputStats:
        """The statistics of input group ``names``, handed over by ``observer``; an expert routed fewer than
        :data:`MIN_EXPERT_TOKENS` calibration tokens gets the identity instead, which makes every method
        rank its weights by magnitude (:func:`identity_stats`)."""
        stats = observer.take(names[0])
        module = self.layers(step)[names[0]][0]
        if not isinstance(module, ExpertLinear):
            return stats
        self.routed.update({n: stats.tokens for n in names})
        if stats.tokens < MIN_EXPERT_TOKENS:
            return identity_stats(self.config.needs, weight_of(module).shape[1], stats.tokens, step.device,
                                  self.config.needs_sums)
        return stats

    def after_pass(self, step: BlockVisit, part: "Pass") -> None:
        """A pass that pruned experts freed their statistics (each below glibc's mmap threshold, so taken from
        the heap, which keeps what is freed): hand that memory back before the next pass gathers more."""
        if any(isinstance(self.layers(step)[g[0]][0], ExpertLinear) for g in part.prune):
            give_back_freed_memory()

    def layout(self, step: BlockVisit) -> "BlockLayout | None":
        return self.layouts.get(frozenset(n[len(step.prefix):] for n in self.layers(step)))

    def prune(self, step: BlockVisit, names: list, stats: InputStats) -> list[LayerRecord]:
        layers = self.layers(step)
        modules = [layers[n][0] for n in names]
        records = prune_layers(names, modules, self.method, stats, [layers[n][1] for n in names], step.index,
                               step.device, self.refine) if self.ranks.main else []
        self.ranks.send_weights([m.weight.data for m in modules])
        for r in records:
            r.routed_tokens = self.routed.get(r.name)
        return records


@torch.no_grad()
def prune_with_data(model: nn.Module, plan: Plan, method: Method, config, input_ids: torch.Tensor,
                    tracker: Tracker, checkpoint=None, source: InMemory = IN_MEMORY) -> list[LayerRecord]:
    """Layer-wise sequential calibration and pruning (see the module docstring).

    ``checkpoint`` (a :class:`.checkpoint.WalkCheckpoint`) resumes the walk from the state it holds and saves
    the state after finished blocks, as it is told to.  ``source`` brings each block into memory for its visit
    and takes it away after (a streamed model), and what runs before the blocks while inputs are captured.
    """
    device = torch.device(config.device)
    ranking = allocation_of(config).ranks
    ranks = current()
    if ranks.world > 1 and (ranking or checkpoint is not None):
        raise ConfigError(f"{'allocation=global' if ranking else 'a walk checkpoint (--save-every)'} runs in one "
                          "process, not several")
    input_ids = ranks.calibration_share(input_ids, config.batch_size)
    tracker.enter(Stage.CALIBRATING)
    started = time.perf_counter()
    with source.outside_blocks():
        hidden, calls = capture_inputs(model, plan.blocks, input_ids, config.batch_size)

    last = max(i for i, per_block in enumerate(plan.layers) if per_block)  # nothing after it needs inputs
    if allocation_of(config).first_walk:
        owl_targets(plan, config, hidden, calls, device, tracker, last, source)
    job = WeightJob(plan, method, config, refiner(config, input_ids.shape[1]), {} if ranking else None, {},
                    ranks)
    records: list[LayerRecord] = []
    first, spent = 0, 0.0
    dtype = next(plan.blocks.parameters()).dtype
    if checkpoint is not None and (state := checkpoint.start(config, input_ids, dtype)) is not None:
        checkpoint.restore(plan.blocks, state)
        source.resume(state.next_block)
        first, records, hidden, spent = state.next_block, state.records, state.hidden, state.seconds
        log.info("resuming the walk at block %d of %d from %s", first, last + 1, checkpoint.folder)
    stage = _visit_true_sequential if config.resolved.true_sequential else _visit_at_once

    def visit(step: BlockVisit):
        outs, recs = stage(step, job)
        records.extend(recs)
        return outs

    def after(i: int, outputs: list) -> None:
        if checkpoint is not None and checkpoint.due(i, last):
            checkpoint.save(i, plan.blocks, records, outputs, spent + time.perf_counter() - started)

    walk_blocks(plan.blocks, plan.blocks_name, hidden, calls, device, visit, tracker, first, last, after, source)
    if rare := sorted({n.rsplit(".", 1)[0] for n, t in job.routed.items() if t < MIN_EXPERT_TOKENS}):
        log.warning("%d experts were routed fewer than %d calibration tokens and were pruned by magnitude (%s%s); "
                    "more calibration samples reach more experts", len(rare), MIN_EXPERT_TOKENS,
                    ", ".join(rare[:3]), " ..." if len(rare) > 3 else "")
    if ranking:
        tracker.enter(Stage.PRUNING)
        records += _apply_ranking(plan, config, job.scores)
        for r in records:
            r.routed_tokens = job.routed.get(r.name)
    return records


@torch.no_grad()
def owl_targets(plan: Plan, config, hidden: list, calls: list, device, tracker: Tracker, last: int,
                source: InMemory = IN_MEMORY) -> None:
    """``allocation=owl``: walk the dense model once (blocks up to ``last``, the last with layers to prune),
    measuring each block's outlier ratio from Wanda's scores on its activations, then give every layer of the
    plan its block's target (:class:`.allocation.OWL`)."""
    m = OWL.M if config.owl_m is None else config.owl_m
    lam = OWL.LAMBDA if config.owl_lambda is None else config.owl_lambda
    ratios: dict[int, float] = {}

    def visit(step: BlockVisit):
        layers = plan.layers[step.index]
        if not layers:
            return None
        observer = Observer({n: module for n, (module, _) in layers.items()}, "norms",
                            {n: k for k, n in enumerate(layers)}, ranks=current())
        try:
            outs = step.run(keep=step.need_outputs, observer=observer)
        finally:
            observer.remove()
        seen = observer.seen()
        norms = {n: observer.stats_for(n).sq_norms.sqrt() for n in layers if n in seen}

        def scores():
            for n, norm in norms.items():
                yield weight_of(layers[n][0]).to(step.device, torch.float32).abs().mul_(norm.unsqueeze(0))

        ratios[step.index] = OWL.outlier_ratio(scores, m) if norms else 0.0
        return outs

    with source.read_only():
        walk_blocks(plan.blocks, plan.blocks_name, hidden, calls, device, visit, tracker, last=last, source=source)
    blocks = sorted(ratios)
    targets = OWL.sparsities([ratios[i] for i in blocks], config.resolved.sparsity, lam)
    for i, target in zip(blocks, targets):
        if not 0 <= target < 1:
            raise ConfigError(f"allocation=owl: owl_lambda {lam} spreads sparsity {config.resolved.sparsity} to "
                              f"{target:.3f} in block {i}, outside [0, 1): give a smaller owl_lambda")
        plan.layers[i] = {n: (module, replace(t, sparsity=target)) for n, (module, t) in plan.layers[i].items()}
    log.info("allocation=owl: outlier ratios %s -> block sparsities %s", [round(ratios[i], 4) for i in blocks],
             [round(t, 4) for t in targets])


def _ran(groups: list, observer: Observer, block: int) -> list:
    """The groups whose input the observer saw (on any rank); the others (never called in this block) stay
    dense."""
    seen = observer.seen()
    ran = [g for g in groups if g[0] in seen]
    for g in groups:
        if g not in ran:
            log.warning("block %d: %s never ran during calibration; left dense", block, ", ".join(g))
    return ran


def _observer(job: WeightJob, step: BlockVisit, groups: list, keep: bool, keep_inputs: bool = False) -> Observer:
    """An observer of ``groups`` (in execution order); unless the outputs are kept, the run stops at the last
    one's input."""
    layers = job.layers(step)
    return Observer({n: layers[n][0] for g in groups for n in g}, job.config.needs,
                    {n: k for k, g in enumerate(groups) for n in g}, stop_after=None if keep else groups[-1][0],
                    keep_inputs=keep_inputs, ranks=job.ranks, sums=job.config.needs_sums)


def _visit_at_once(step: BlockVisit, job: WeightJob) -> tuple:
    """Observe every layer on the unchanged block, then prune them all (the reference way).

    Experts' statistics may be split over several passes (:func:`plan_passes`); each pass's experts are pruned
    when it ends, the other layers after the last.  With a ranking allocation the layers are only scored here;
    their masks are chosen after the walk."""
    groups = job.groups(step)
    if not groups:
        return None, []
    records, got = [], None
    dense_outputs = job.config.resolved.propagate == "dense"
    observed: dict[str, Observer] = {}  # first name of a group that ran -> the observer holding its statistics
    for k, part in enumerate(job.passes(step, groups, sequential=False)):
        step.describe(Stage.CALIBRATING)
        keep = dense_outputs and k == 0
        observer = _observer(job, step, part.observe, keep)
        try:  # while only observing, the block's output is not needed: stop at the last group's input
            out = step.run(keep=keep, observer=observer)
        finally:
            observer.remove()
        got = out if keep else got
        observed.update({g[0]: observer for g in _ran(part.observe, observer, step.index)})
        step.describe(Stage.PRUNING if job.scores is None else Stage.COMPUTING_IMPORTANCE)
        for names in [g for g in part.prune if g[0] in observed]:
            stats = job.stats(step, names, observed.pop(names[0]))
            if job.scores is not None:
                for name in names:
                    W = weight_of(job.layers(step)[name][0]).to(step.device, torch.float32)
                    job.scores[name] = job.method.scores(W, stats).cpu()
            else:
                records += job.prune(step, names, stats)
        job.after_pass(step, part)
    return got, records


def _visit_true_sequential(step: BlockVisit, job: WeightJob) -> tuple:
    """Observe and prune one input group at a time, each seeing the outputs of the groups pruned before it
    (experts' groups of one stage together, :func:`plan_passes`: no expert reads another's outputs).

    Each observing pass stops at its last group's input, and children of the block that are finished are
    replayed from their last linear's cached input (see :mod:`.layout`), so the whole walk costs about
    one forward of the block more than observing does.
    """
    records = []
    groups = job.groups(step)
    layout = job.layout(step)
    layers = job.layers(step)
    outs = step.run() if job.config.resolved.propagate == "dense" else None
    replay_inputs = {step.prefix + c.linear for c in layout.children.values()} if layout else set()
    pruned: set[str] = set()
    replays: list[Replay] = []
    try:
        for part in job.passes(step, groups, sequential=True):
            step.describe(Stage.CALIBRATING)
            names = [n for g in part.observe for n in g]
            observer = _observer(job, step, part.observe, keep=False,
                                 keep_inputs=bool(replay_inputs.intersection(names)))
            try:
                step.run(keep=False, observer=observer, replays=tuple(replays))
            finally:
                observer.remove()
            step.describe(Stage.PRUNING)
            for group in _ran(part.observe, observer, step.index):
                records += job.prune(step, group, job.stats(step, group, observer))
                pruned.update(n[len(step.prefix):] for n in group)
            job.after_pass(step, part)
            for child, spec in layout.children.items():
                if step.prefix + spec.linear in names and spec.members <= pruned:
                    linear = layers[step.prefix + spec.linear][0]
                    inputs = observer.inputs[observer.group_of[step.prefix + spec.linear]]
                    replay = Replay(step.block.get_submodule(child), linear, inputs, spec.tuple_len, step.device)
                    replay.install()
                    replays.append(replay)
            del observer
        if outs is None and step.need_outputs:
            step.describe(Stage.CALIBRATING)
            outs = step.run(replays=tuple(replays))
    finally:
        for replay in replays:
            replay.remove()
    return outs, records
