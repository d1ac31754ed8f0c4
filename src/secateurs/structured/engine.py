"""Structured pruning on the foundation's calibration engine: the same capture, the same block walk.

Width (``channels``, ``heads``), uniform allocation, for each block in turn::

    observe  -- hooks on the output projection's input (MLP intermediate / concatenated heads) gather
                per-channel sums, squares (and X^T X for a refit) over the calibration batches
    score    -- pure math (scores.py); choose the units to remove
    cut      -- slice the weights (surgery.py); repair: bias compensation or least-squares refit
    recompute the block's outputs with the cut block; they feed the next block

With ``allocation="global"`` every block is scored first (on dense activations), the budget is spread
over blocks by standardised score, then every block is cut.  Depth (``blocks``) runs every block once,
dense, measuring how much each changes the hidden states, then removes whole blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.capture import capture_inputs, real_tokens
from ..engine.walk import IN_MEMORY, BlockVisit, InMemory, walk_blocks
from ..errors import ArchitectureError, ConfigError
from ..models.arch import find_blocks, set_weight_of, weight_of
from ..progress import Stage, Tracker
from . import scores as S
from .surgery import check_loadable, config_says_heads, drop_blocks, keep_channels, keep_heads, sync_config
from .units import find_attention, find_mlp

log = logging.getLogger(__name__)


@dataclass
class StructuredRecord:
    """What happened to one block."""

    block: int
    kind: str  # channels | heads | block
    before: int  # channels / query heads / 1
    after: int
    removed: list = field(default_factory=list)  # indices (channels, query heads) removed in this block

    def to_dict(self) -> dict:
        return {"block": self.block, "kind": self.kind, "before": self.before, "after": self.after,
                "removed": self.removed}


# ----------------------------------------------------------------------------- removable units


def head_units(att, head_scores: torch.Tensor, gqa: str) -> tuple[list, torch.Tensor]:
    """Removable units of one attention layer as ``([(q_heads, kv_heads)], scores)``.

    ``gqa="kv-groups"``: a unit is one KV head with every query head that reads it (score: their sum).
    ``gqa="per-group"``: unit ``r`` is the ``r``-th least important query head of *every* group (score:
    their sum), so every group loses the same number of query heads and GQA stays valid.  Without GQA
    (as many KV as query heads) both modes remove query and KV heads together.
    """
    heads, kv = att.heads, att.kv_heads
    rep = heads // kv
    groups = [list(range(g * rep, (g + 1) * rep)) for g in range(kv)]
    if gqa == "kv-groups" or rep == 1:
        units = [(groups[g], [g]) for g in range(kv)]
        return units, torch.stack([head_scores[groups[g]].sum() for g in range(kv)])
    ranked = [sorted(g, key=lambda h: (float(head_scores[h]), h)) for g in groups]
    units = [([ranked[g][r] for g in range(kv)], []) for r in range(rep)]
    return units, torch.stack([head_scores[q].sum() for q, _ in units])


def allocate_global(layer_scores: list, fraction: float, round_to: int, min_keep: int) -> list[int]:
    """Spread one budget (``fraction`` of all units) over layers by **standardised** score.

    Scores are z-scored within each layer (layers' raw scales differ), ranked together, and each layer's
    removal count is then rounded so that what it keeps is a multiple of ``round_to`` (at least ``min_keep``).
    """
    z = []
    for s in layer_scores:
        s = s.double()
        std = s.std() if len(s) > 1 else torch.tensor(1.0, dtype=s.dtype)
        z.append((s - s.mean()) / (std if std > 0 else 1))
    flat = torch.cat(z)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(layer_scores)])
    k = round(fraction * len(flat))
    order = sorted(range(len(flat)), key=lambda j: (float(flat[j]), j))[:k]
    counts = [0] * len(layer_scores)
    for j in order:
        counts[int(owner[j])] += 1
    out = []
    for c, s in zip(counts, layer_scores):
        n = len(s)
        keep = max(min_keep, round_to * round((n - c) / round_to)) if round_to > 1 else max(min_keep, n - c)
        out.append(n - min(n, keep))
    return out


def uniform_count(n: int, fraction: "float | None", count: "int | None", round_to: int) -> int:
    """Units to remove from a layer of ``n``: ``count``, or ``fraction * n`` with the kept number rounded to
    a multiple of ``round_to``."""
    remove = count if count is not None else round(fraction * n)
    if round_to > 1:
        remove = n - round_to * round((n - remove) / round_to)
    return remove


# ----------------------------------------------------------------------------- observing


class ChannelObserver:
    """Forward pre-hooks on output projections: :class:`~.scores.ChannelStats` of what they read."""

    def __init__(self, modules: dict, gram: bool):
        self.stats = {name: S.ChannelStats() for name in modules}
        self.gram = gram
        self._tokens = None  # the current batch's real tokens, if it is padded
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def start_batch(self, tokens: "torch.Tensor | None" = None) -> None:
        self._tokens = tokens

    def _hook(self, name):
        def hook(module, args):
            self.stats[name].add(real_tokens(args[0].detach(), self._tokens), self.gram)

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()


def _unit_count(kind: str, unit, gqa: str) -> int:
    """Removable units per block: channels, KV groups, or query heads per group (see :func:`head_units`)."""
    if kind == "channels":
        return unit.width
    rep = unit.heads // unit.kv_heads
    return unit.kv_heads if gqa == "kv-groups" or rep == 1 else rep


def _unit(kind: str, block, prefix: str):
    return find_mlp(block, prefix) if kind == "channels" else find_attention(block, prefix)


def _output_of(kind: str, unit):
    return unit.output if kind == "channels" else unit.o


def _probe_heads(model: nn.Module, att) -> None:
    """Fail before any weight changes if a decoder's config cannot describe fewer heads.  (An encoder's cannot
    either -- BERT derives the head size from ``hidden_size / heads`` -- and its heads are recorded in the
    config's ``secateurs_structure`` instead, for :func:`~.surgery.load`: encoders are not streamed, exported
    to GGUF or sped up, where a plain config matters.)"""
    from ..models.arch import head_of

    if head_of(model) != "causal":
        return
    heads, kv = (att.kv_heads, att.kv_heads) if att.heads > att.kv_heads else (att.heads - 1, att.kv_heads - 1)
    if not config_says_heads(model, heads, kv, att.head_dim):
        raise ArchitectureError(f"{type(model).__name__}'s config ties the head size to the hidden size: a model with "
                                "fewer heads could not be saved as a loadable checkpoint, so head pruning is refused")


# ----------------------------------------------------------------------------- width


def check_structured(model: nn.Module, config) -> None:
    """Every check that needs only the model's shapes, before any calibration or change (and, from the CLI,
    before the dense evaluation): the count against the layer or the depth, head pruning against the config
    family, and an explicit bias compensation against the output projection."""
    from ..models.arch import head_of

    if head_of(model) != "causal" and config.method not in ("blocks", "channels", "heads"):
        raise ConfigError(f"{type(model).__name__} is an encoder: of the structured methods, encoders take channels "
                          f"(MLP), heads and blocks (whole layers), not {config.method}; weight pruning takes every "
                          "method and pattern")
    if config.method == "experts":
        from .experts import check_experts

        check_experts(model, config)
        return
    if config.method == "slicegpt":
        from .slicing import check_sliceable, kept_width

        check_sliceable(model)
        d = model.config.hidden_size
        if kept_width(d, config.ratio, config.round_to, model.config.num_attention_heads) >= d:
            raise ConfigError(f"slicing {config.ratio} of the width {d} (kept widths a multiple of --round-to "
                              f"{config.round_to} and of the {model.config.num_attention_heads} heads) removes nothing")
        return
    blocks_name, blocks = find_blocks(model)
    if config.method == "blocks":
        if (getattr(model.config, "secateurs_structure", None) or {}).get("shortcuts"):
            raise ConfigError("this model was sliced with per-block rotations: removing a block would break the "
                              "chain of its shortcut matrices")
        L = len(blocks)
        k = config.count if config.count is not None else round(config.ratio * L)
        if not 0 < k < L:
            raise ConfigError(f"cannot remove {k} of the model's {L} blocks (at least one must go, one must stay)")
        return
    kind = config.method
    unit = _unit(kind, blocks[0], f"{blocks_name}.0.")
    if kind == "heads":
        _probe_heads(model, unit)
    if config.allocation == "uniform":
        n = _unit_count(kind, unit, config.gqa)
        count = uniform_count(n, config.ratio, config.count, config.round_to)
        if count >= n:
            what = "channels" if kind == "channels" else f"head units ({config.gqa})"
            raise ConfigError(f"removing {count} of {n} {what} per block would remove every one")
    if config.bias_compensation and getattr(_output_of(kind, unit)[1], "bias", None) is None:
        flag = "mlp_bias" if kind == "channels" else "attention_bias"
        if not hasattr(model.config, flag):
            raise ConfigError(f"bias compensation needs a bias on the output projection; {type(model).__name__} has "
                              f"none and its config has no {flag!r} switch (use --no-bias-compensation)")


@torch.no_grad()
def prune_width(model: nn.Module, config, input_ids: "torch.Tensor | None", tracker: Tracker,
                source: InMemory = IN_MEMORY) -> tuple:
    """Remove MLP channels (``config.method == "channels"``) or attention heads (``"heads"``).

    ``source`` brings each block into memory for its turn and takes it away after (a streamed model, which
    writes the cut block as it goes; uniform allocation only).  Returns ``(records, None)``: one
    :class:`StructuredRecord` per block."""
    check_structured(model, config)
    kind = config.method
    blocks_name, blocks = find_blocks(model)
    if source is not IN_MEMORY and config.allocation == "global":
        raise ConfigError("allocation=global scores every block before cutting any: it is not streamed")
    units = [_unit(kind, b, f"{blocks_name}.{i}.") for i, b in enumerate(blocks)]
    compensate = _prepare_bias(model, config, units, kind)
    device = torch.device(config.device)
    score = config.score_name
    needs_data = score != "magnitude" or config.refit or compensate
    head_dim = units[0].head_dim if kind == "heads" else None

    hidden = calls = None
    if needs_data:
        tracker.enter(Stage.CALIBRATING)
        with source.outside_blocks():
            hidden, calls = capture_inputs(model, blocks, input_ids, config.batch_size)

    def observe(step: BlockVisit, keep: bool):
        out_name, out_module = _output_of(kind, units[step.index])
        obs = ChannelObserver({out_name: out_module}, gram=config.refit)
        try:
            outs = step.run(keep=keep, observer=obs)
        finally:
            obs.remove()
        return obs.stats[out_name], outs

    def layer_scores(i: int, st):
        unit = units[i]
        if kind == "channels":
            return S.channel_scores(score, weight_of(unit.output[1]), [weight_of(m) for _, m in unit.inputs], st), None
        ins = [] if score != "magnitude" else [weight_of(unit.q[1])]
        ch = S.channel_scores(score, weight_of(unit.o[1]), ins, st)
        hunits, scores = head_units(unit, S.head_scores(ch, unit.head_dim), config.gqa)
        return scores, hunits

    def cut(i: int, st, count: "int | None" = None, found=None) -> StructuredRecord:
        scores, hunits = found or layer_scores(i, st)
        if count is None:
            count = uniform_count(len(scores), config.ratio, config.count, config.round_to)
        return _cut(kind, units[i], scores, hunits, count, st, config, compensate, i)

    records = []
    if config.allocation == "global":  # score every block on the dense model first, then spread one budget
        tracker.enter(Stage.COMPUTING_IMPORTANCE)
        stats, found = [None] * len(blocks), []
        if needs_data:
            def visit(step: BlockVisit):
                stats[step.index], outs = observe(step, keep=True)
                found.append(layer_scores(step.index, stats[step.index]))
                return outs

            walk_blocks(blocks, blocks_name, hidden, calls, device, visit, tracker)
        else:
            found = [layer_scores(i, None) for i in range(len(blocks))]
        counts = allocate_global([s for s, _ in found], config.ratio, config.round_to, config.round_to)
        tracker.enter(Stage.PRUNING)
        records = [cut(i, stats[i], counts[i], found[i]) for i in range(len(blocks))]
    elif needs_data:  # each block is cut before the next one is observed, on the cut model's activations
        def visit(step: BlockVisit):
            st, _ = observe(step, keep=False)
            step.describe(Stage.PRUNING)
            records.append(cut(step.index, st))
            return None  # the walk runs the cut block for the next one's inputs

        walk_blocks(blocks, blocks_name, hidden, calls, device, visit, tracker, source=source)
    else:
        tracker.enter(Stage.PRUNING)
        for i in tracker.bar(range(len(blocks))):
            source.enter(i, blocks[i])
            records.append(cut(i, None))
            source.leave(i, blocks[i])
    structure = sync_config(model, head_dim)
    check_loadable(model, structure)
    return records, None


def _prepare_bias(model, config, units, kind) -> bool:
    """Bias compensation needs a bias on the output projection: use it, or switch the config's bias flag on
    (zero biases on every projection that flag governs), or -- asked for explicitly -- say why not.
    With ``bias_compensation=None`` (the default) it is used with the fluctuation score wherever possible."""
    wanted = config.bias_compensation
    if wanted is None:
        wanted = config.score_name == "fluctuation" and not config.refit
    if not wanted:
        return False
    outs = [_output_of(kind, u)[1] for u in units]
    if all(getattr(m, "bias", None) is not None for m in outs):
        return True
    flag = "mlp_bias" if kind == "channels" else "attention_bias"
    if not hasattr(model.config, flag):  # asked for explicitly, check_structured has refused it already
        log.info("no bias compensation: %s has no bias on the output projection and no %r switch",
                 type(model).__name__, flag)
        return False
    for u in units:
        members = [m for _, m in u.inputs] + [u.output[1]] if kind == "channels" else [u.q[1], u.k[1], u.v[1], u.o[1]]
        for m in members:
            if getattr(m, "bias", None) is None:
                W = m.weight  # on a streamed model's skeleton W is on "meta": the new zeros are real all the same
                m.bias = nn.Parameter(torch.zeros(W.shape[0], dtype=W.dtype, device="cpu" if W.is_meta else W.device))
    setattr(model.config, flag, True)
    log.info("bias compensation: turned %s on (zero biases added) so the repair has somewhere to go", flag)
    return True


def _cut(kind, unit, scores, hunits, count, st, config, compensate, i) -> StructuredRecord:
    """Remove ``count`` lowest-scored units of one layer and repair the output projection."""
    removed_units = S.lowest(scores, count)
    out_module = _output_of(kind, unit)[1]
    if kind == "channels":
        width = unit.width
        removed = removed_units
        keep = [j for j in range(width) if j not in set(removed)]
        before, after = width, len(keep)
    else:
        q_removed = sorted(h for u in removed_units for h in hunits[u][0])
        kv_removed = sorted(g for u in removed_units for g in hunits[u][1])
        q_keep = [h for h in range(unit.heads) if h not in set(q_removed)]
        kv_keep = [g for g in range(unit.kv_heads) if g not in set(kv_removed)]
        from .surgery import head_channels

        removed = q_removed
        keep = head_channels(q_keep, unit.head_dim)
        before, after = unit.heads, len(q_keep)
    W = weight_of(out_module)
    removed_ch = [j for j in range(W.shape[1]) if j not in set(keep)]
    new_W = None
    if config.refit and removed_ch:
        new_W = S.least_squares_refit(W, st.gram, keep)
    if compensate and removed_ch:
        out_module.bias.add_(S.bias_compensation(W, st.mean, removed_ch).to(out_module.bias.dtype))
    if kind == "channels":
        keep_channels(unit, keep)
    else:
        keep_heads(unit, q_keep, kv_keep)
    if new_W is not None:
        set_weight_of(out_module, new_W)  # in the module's layout and dtype
    return StructuredRecord(i, kind, before, after, removed)


# ----------------------------------------------------------------------------- depth


@torch.no_grad()
def block_scores(model: nn.Module, input_ids: torch.Tensor, score: str, n: int, batch_size: int, device,
                 tracker: Tracker, source: InMemory = IN_MEMORY) -> torch.Tensor:
    """Run the dense blocks once over the calibration tokens.

    ``score="bi"``: Block Influence of every block, ``(blocks,)``.  ``score="angular"``: for every start
    ``l``, the mean angular distance between the inputs of block ``l`` and block ``l + n``, ``(blocks - n + 1,)``.
    """
    blocks_name, blocks = find_blocks(model)
    L = len(blocks)
    tracker.enter(Stage.CALIBRATING)
    with source.outside_blocks():
        hidden, calls = capture_inputs(model, blocks, input_ids, batch_size)
    real = [c.tokens if c.tokens is None else c.tokens.reshape(-1) for c in calls[0]]  # a padded batch's tokens
    tokens = sum(h.shape[0] * h.shape[1] if t is None else int(t.sum()) for h, t in zip(hidden, real))
    sums = torch.zeros(L if score == "bi" else L - n + 1, dtype=torch.float64)
    history = [hidden]  # angular: the inputs of the last n+1 blocks

    def visit(step: BlockVisit):
        i, outs = step.index, step.run()
        if score == "bi":
            sums[i] = sum(real_tokens(S.cosine_per_token(a, b), t).sum() for a, b, t in zip(step.hidden, outs, real))
            return outs
        history.append(outs)
        if len(history) > n + 1:
            history.pop(0)
        if i + 1 >= n:  # history[0] is block (i+1-n)'s input, history[-1] block (i+1)'s input
            sums[i + 1 - n] = sum(real_tokens(S.angular_distance(S.cosine_per_token(a, b)), t).sum()
                                  for a, b, t in zip(history[0], history[-1], real))
        return outs

    walk_blocks(blocks, blocks_name, hidden, calls, device, visit, tracker, source=source)
    return S.block_influence(sums, tokens) if score == "bi" else sums / tokens


@torch.no_grad()
def prune_depth(model: nn.Module, config, input_ids: torch.Tensor, tracker: Tracker,
                source: InMemory = IN_MEMORY) -> tuple:
    """Remove ``config.count`` (or ``ratio`` of the) blocks; returns ``(records, block scores)``.

    ``source`` brings each block into memory while it is scored (a streamed model: the kept blocks are
    written afterwards, renumbered, by whoever streams it)."""
    check_structured(model, config)
    _, blocks = find_blocks(model)
    k = config.count if config.count is not None else round(config.ratio * len(blocks))
    scores = block_scores(model, input_ids, config.score_name, k, config.batch_size, torch.device(config.device),
                          tracker, source)
    tracker.enter(Stage.PRUNING)
    remove = S.blocks_to_remove(config.score_name, scores, k)
    log.info("removing blocks %s (%s scores %s)", remove, config.score_name, [round(float(s), 4) for s in scores])
    drop_blocks(model, remove)
    check_loadable(model, None)
    return [StructuredRecord(i, "block", 1, 0, [i]) for i in remove], scores
