"""SliceGPT: delete rows and columns after rotating the residual stream onto its principal components
(Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024).

A pre-norm decoder is invariant to an orthogonal rotation ``Q`` (d, d) of its residual stream once every
RMSNorm's scale ``gamma`` is folded into the linears that read it (RMSNorm without a scale commutes with ``Q``:
``||x Q|| = ||x||``).  With ``W`` of shape ``(out, in)`` as torch stores it::

    embeddings E (V, d)          -> E Q
    readers    W (out, d)        -> W diag(gamma) Q          q, k, v after input_layernorm; gate, up after
                                                              post_attention_layernorm
    writers    W (d, in), b (d)  -> Q^T W, Q^T b             o_proj, down_proj: they add to the stream
    head       W (V, d)          -> W diag(gamma_final) Q

If ``Q``'s columns are the principal directions of the stream, ordered by variance, deleting all but the first
``d'`` of them (``Q_d'`` (d, d')) loses the least of it: every matrix above shrinks by the rows or columns of
the deleted directions, and the stream lives in ``d'`` dimensions from the embeddings to the head.

**One rotation for the whole stream, or one per point.**  ``rotation="shared"`` (the default): one ``Q`` serves
every block -- the principal components of the stream pooled over every point where a norm reads it (each
block's two norms and the final one), each token scaled to unit length first because each norm sees it so.  No
other matrix is needed, so the sliced model is an ordinary one of width ``d'`` and loads in plain
``transformers``.  ``rotation="per-block"`` is the paper's: each point ``p`` has its own ``Q_p`` (the stream's own
principal components there, tokens as they are), and each residual connection carries the stream from one basis
to the next through ``Q_a^T Q_b`` (d', d'), two per block (``attn_shortcut``, ``mlp_shortcut``), which plain
``transformers`` blocks have no place for: such a model is saved with its unsliced ``hidden_size`` (plain
``from_pretrained`` refuses it on the sizes) and its width and shortcuts in ``secateurs_structure``, and loads
with :func:`secateurs.load`.  Both compute their rotations from the dense model's stream.

**Keeping the norms exact.**  A norm of the sliced model divides by the mean square over ``d'`` values where
the original divided by the mean over ``d``; since ``||x Q_d'||^2 / d' + eps d / d' = (d / d')
(||x Q_d'||^2 / d + eps)``, setting every norm's scale to ``sqrt(d / d')`` and its epsilon to ``eps d / d'``
(``config.rms_norm_eps``) gives exactly the original normalisation of the kept components.  Tied input and
output embeddings are untied (the head carries the final norm's scale).  Families whose blocks hold other
norms (Gemma 3's sandwich norms), LayerNorm families (OPT, GPT-2, Phi: the paper first folds the mean
subtraction into the writers) and models without RMSNorm are refused before any weight changes.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..engine.capture import capture_inputs
from ..engine.walk import IN_MEMORY, BlockVisit, walk_blocks
from ..errors import ArchitectureError
from ..models.arch import find_blocks
from ..progress import Stage, Tracker
from .units import find_attention, find_mlp

log = logging.getLogger(__name__)

NORMS = ("input_layernorm", "post_attention_layernorm")  # the two pre-norms of a block, as HF names them


def _norms_of(block: nn.Module) -> dict:
    return {n: m for n, m in block.named_children() if "norm" in type(m).__name__.lower()}


def final_norm(model: nn.Module) -> nn.Module:
    """The norm before the head (``model.model.norm`` in every RMSNorm family)."""
    norm = getattr(model.base_model, "norm", None)
    if norm is None:
        raise ArchitectureError(f"{type(model).__name__}: no final norm (model.norm) before the head")
    return norm


def check_sliceable(model: nn.Module) -> None:
    """:class:`ArchitectureError` unless every block is RMSNorm pre-norm: exactly ``input_layernorm`` before
    attention and ``post_attention_layernorm`` before the MLP, and a final RMSNorm before the head."""
    name = type(model).__name__
    blocks_name, blocks = find_blocks(model)
    if any(type(b) in _WITH_SHORTCUTS.values() for b in blocks):
        raise ArchitectureError(f"{name} is sliced already, with shortcut matrices: slice the unsliced model")
    norms = []
    for i, block in enumerate(blocks):
        found = _norms_of(block)
        if set(found) != set(NORMS):
            raise ArchitectureError(f"{name}: slicegpt needs pre-norm blocks with exactly {' and '.join(NORMS)}; "
                                    f"block {i} has {', '.join(sorted(found)) or 'no norms'}")
        norms += found.values()
        find_attention(block, f"{blocks_name}.{i}.")
        find_mlp(block, f"{blocks_name}.{i}.")
    norms.append(final_norm(model))
    if bad := next((type(n).__name__ for n in norms if "rmsnorm" not in type(n).__name__.lower()), None):
        raise ArchitectureError(f"{name}: slicegpt folds RMSNorm scales; this model uses {bad} (a LayerNorm's "
                                "mean subtraction would first have to be folded into the writers)")
    if not hasattr(model.config, "rms_norm_eps"):
        raise ArchitectureError(f"{name}: its config has no rms_norm_eps to rescale")


def _scale_of(norm: nn.Module) -> "tuple[torch.Tensor, float]":
    """``(gamma, offset)``: the norm multiplies by ``gamma = offset + weight`` (Gemma stores ``weight`` as
    ``gamma - 1``, found by probing with a zero weight)."""
    weight = norm.weight.data
    saved = weight.clone()
    weight.zero_()
    probe = norm(torch.ones(1, weight.shape[0], dtype=weight.dtype, device=weight.device))
    weight.copy_(saved)
    offset = 1.0 if bool(probe.abs().sum() > 0) else 0.0
    return saved.double() + offset, offset


# ------------------------------------------------------------------------------------------ the rotation


@torch.no_grad()
def stream_covariances(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device, tracker: Tracker,
                       unit: bool = True, source=IN_MEMORY) -> list:
    """``C_p = sum_t u_t^T u_t`` (d, d) in float64 over the calibration tokens at every point ``p`` a norm reads
    the stream, in order (block ``l``'s input ``2l``, its middle ``2l + 1``, the final norm's ``2L``); the blocks
    run dense.  ``unit``: ``u_t = x_t / ||x_t||`` (the norm sees the direction only), else ``u_t = x_t`` (the
    paper's)."""
    blocks_name, blocks = find_blocks(model)
    tracker.enter(Stage.CALIBRATING)
    with source.outside_blocks():
        hidden, calls = capture_inputs(model, blocks, input_ids, batch_size)
    d = hidden[0].shape[-1]
    covariances = []

    def gram(xs) -> torch.Tensor:
        C = torch.zeros(d, d, dtype=torch.float64)
        for x in xs:
            u = x.reshape(-1, d).double().cpu()
            if unit:
                u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-30)
            C.add_(u.t() @ u)
        return C

    def visit(step: BlockVisit):
        if step.index == 0:  # later blocks' inputs are their predecessors' outputs, counted there
            covariances.append(gram(step.hidden))
        middle = []
        hook = getattr(step.block, NORMS[1]).register_forward_pre_hook(lambda _m, args: middle.append(args[0]))
        try:
            outs = step.run(keep=True)
        finally:
            hook.remove()
        covariances.extend([gram(middle), gram(outs)])
        return outs

    walk_blocks(blocks, blocks_name, hidden, calls, device, visit, tracker, source=source)
    return covariances


def principal_rotation(C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``Q`` (d, d): the eigenvectors of ``C + damp mean(diag C) I``, by decreasing eigenvalue (the paper's
    damping), in float64."""
    C = C + damp * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    values, vectors = torch.linalg.eigh(C)
    return vectors[:, values.argsort(descending=True)]


def kept_width(d: int, fraction: float, round_to: int, heads: int = 1) -> int:
    """``d'``: the width left after slicing ``fraction`` of ``d``, rounded down to a multiple of both ``round_to``
    and ``heads`` (transformers refuses a config whose hidden size the attention heads do not divide)."""
    step = math.lcm(round_to, heads)
    kept = d - int(round(fraction * d))
    return max(step, kept - kept % step)


# ------------------------------------------------------------------------------------------ the surgery


def _assign(module: nn.Module, name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value.to(like.dtype).contiguous(), requires_grad=like.requires_grad))


@torch.no_grad()
def rotate_and_slice(model: nn.Module, rotations: list, width: int) -> None:
    """Fold every norm's scale into its readers, rotate the stream at each point a norm reads it by that point's
    ``Q`` (d, d) and keep the first ``width`` directions.  ``rotations``: one ``Q`` per point, in the order of
    :func:`stream_covariances` (``2L + 1``), or one for all.  Where a block's two ends differ, its residual
    connection goes through ``Q_a^T Q_b`` (width, width) (:func:`add_shortcuts`).  The config follows
    (``hidden_size``, ``head_dim``, ``rms_norm_eps``, untied embeddings)."""
    check_sliceable(model)
    config = model.config
    blocks_name, blocks = find_blocks(model)
    points = 2 * len(blocks) + 1
    rotations = rotations if isinstance(rotations, (list, tuple)) else [rotations] * points
    if len(rotations) != points:
        raise ValueError(f"{len(rotations)} rotations for the {points} points a norm reads the stream")
    d = rotations[0].shape[0]
    kept = {id(Q): Q[:, :width] for Q in rotations}  # (d, d') each; one rotation shared is one tensor
    Qs = [kept[id(Q)] for Q in rotations]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_weight = head.weight.data.clone() if head.weight is embed.weight else head.weight.data
    # the head reads the final norm: its scale folds into the head's columns
    norms = [final_norm(model)]
    gamma, offset = _scale_of(norms[0])
    _assign(head, "weight", (head_weight.double() * gamma) @ Qs[-1], head.weight)
    head.in_features = width
    _assign(embed, "weight", embed.weight.data.double() @ Qs[0], embed.weight)
    embed.embedding_dim = width
    for i, block in enumerate(blocks):
        prefix = f"{blocks_name}.{i}."
        att, mlp = find_attention(block, prefix), find_mlp(block, prefix)
        shortcuts = []
        for norm_name, readers, writer, read, write in (
                (NORMS[0], [att.q, att.k, att.v], att.o, Qs[2 * i], Qs[2 * i + 1]),
                (NORMS[1], mlp.inputs, mlp.output, Qs[2 * i + 1], Qs[2 * i + 2])):
            gamma, _ = _scale_of(getattr(block, norm_name))
            for _, linear in readers:  # (out, d) -> (out, d')
                _assign(linear, "weight", (linear.weight.data.double() * gamma) @ read, linear.weight)
                linear.in_features = width
            linear = writer[1]  # (d, in) -> (d', in)
            _assign(linear, "weight", write.t() @ linear.weight.data.double(), linear.weight)
            if linear.bias is not None:
                _assign(linear, "bias", write.t() @ linear.bias.data.double(), linear.bias)
            linear.out_features = width
            norms.append(getattr(block, norm_name))
            shortcuts.append(None if read is write else read.t() @ write)
        if any(s is not None for s in shortcuts):
            add_shortcuts(block, [torch.eye(width, dtype=torch.float64) if s is None else s for s in shortcuts],
                           att.q[1].weight.dtype)
        if getattr(config, "head_dim", None) is None:
            config.head_dim = att.head_dim
    eps = config.rms_norm_eps * d / width
    for norm in norms:
        _assign(norm, "weight", torch.full((width,), math.sqrt(d / width) - offset, dtype=torch.float64),
                norm.weight)
        for attr in ("variance_epsilon", "eps"):
            if hasattr(norm, attr):
                setattr(norm, attr, eps)
    config.head_dim = config.head_dim or d // config.num_attention_heads
    config.hidden_size, config.rms_norm_eps, config.tie_word_embeddings = width, eps, False
    if hasattr(config, "get_text_config"):
        config.get_text_config().tie_word_embeddings = False
    # Gemma's embeddings scale their output by sqrt(hidden_size), which a model built from the new config sets to
    # sqrt(d'): the weights make up the difference
    if math.isclose(getattr(embed, "scalar_embed_scale", 0.0), math.sqrt(d)):
        embed.weight.data.mul_(math.sqrt(d / width))
        embed.scalar_embed_scale = math.sqrt(width)
        embed.embed_scale.fill_(math.sqrt(width))


SHORTCUTS = ("attn_shortcut", "mlp_shortcut")
_WITH_SHORTCUTS: dict = {}


def add_shortcuts(block: nn.Module, matrices: list, dtype: torch.dtype) -> None:
    """Give ``block`` the paper's residual connections: ``x -> x S`` with ``S`` (d', d') around the attention and
    around the MLP (parameters ``attn_shortcut``, ``mlp_shortcut``), by making it an instance of a subclass of
    its own class whose forward reads them."""
    for name, S in zip(SHORTCUTS, matrices):
        setattr(block, name, nn.Parameter(S.to(dtype).clone(), requires_grad=False))
    cls = type(block)
    if cls not in _WITH_SHORTCUTS.values():
        if cls not in _WITH_SHORTCUTS:
            _WITH_SHORTCUTS[cls] = type(f"Sliced{cls.__name__}", (cls,), {"forward": _forward_with_shortcuts})
        block.__class__ = _WITH_SHORTCUTS[cls]


def _forward_with_shortcuts(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """A pre-norm decoder block whose two residual connections go through ``attn_shortcut`` and ``mlp_shortcut``."""
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = hidden_states @ self.attn_shortcut + attended
    return hidden_states @ self.mlp_shortcut + self.mlp(self.post_attention_layernorm(hidden_states))


# ------------------------------------------------------------------------------------------ the stage


@torch.no_grad()
def prune_slicegpt(model: nn.Module, config, input_ids: torch.Tensor, tracker: Tracker, source=IN_MEMORY) -> tuple:
    """Slice ``config.ratio`` of the hidden width (kept width a multiple of ``config.round_to`` and of the heads)
    with one rotation for the whole stream (``config.rotation`` ``shared``) or one per point (``per-block``, the
    paper's); returns ``(records, None)``, one record per block (``kind="hidden"``, width before and after)."""
    from .engine import StructuredRecord, check_structured
    from .surgery import STRUCTURE_KEY, check_loadable, structure_of

    check_structured(model, config)
    d = model.config.hidden_size
    width = kept_width(d, config.ratio, config.round_to, model.config.num_attention_heads)
    shared = config.rotation_name == "shared"
    covariances = stream_covariances(model, input_ids, config.batch_size, torch.device(config.device), tracker,
                                     unit=shared, source=source)
    tracker.enter(Stage.PRUNING)
    if shared:
        covariances = [sum(covariances)]
    rotations = [principal_rotation(C) for C in covariances]
    kept = [float((Q[:, :width].t() @ C @ Q[:, :width]).trace() / C.trace()) for Q, C in zip(rotations, covariances)]
    log.info("slicegpt: width %d -> %d keeps %.4f-%.4f of the stream's energy", d, width, min(kept),
             max(kept))
    rotate_and_slice(model, rotations if len(rotations) > 1 else rotations[0], width)
    structure = None
    if len(rotations) > 1:  # shortcut matrices: recorded, and the config keeps the unsliced width (see surgery)
        structure = {**structure_of(model), "hidden": width, "shortcuts": True}
        model.config.hidden_size = d
        setattr(model.config, STRUCTURE_KEY, structure)
    check_loadable(model, structure)
    _, blocks = find_blocks(model)
    return [StructuredRecord(i, "hidden", d, width) for i in range(len(blocks))], None
