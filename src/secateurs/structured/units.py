"""The prunable units of a decoder block, found from the block itself: MLP channels and attention heads.

An **MLP unit** is a set of *input* linears that each produce the ``width`` intermediate channels
(``up``/``gate`` in SwiGLU, ``fc1`` in a plain MLP) and one *output* linear that reads them (``down``,
``fc2``).  Removing channel ``j`` removes row ``j`` of every input linear (and its bias) and column ``j``
of the output linear.  It is found by shape, not by name: inputs read ``hidden`` features, the output
reads their ``width`` and writes ``hidden``.

An **attention unit** is ``q``, ``k``, ``v`` (in registration order) and the output projection ``o``.
Head ``h`` owns rows ``h*d .. (h+1)*d`` of ``q`` and columns of ``o``; KV head ``g`` owns rows of ``k``
and ``v``; with grouped-query attention query head ``h`` reads KV head ``h // (heads / kv_heads)``.  The
head size ``d`` is the attention module's ``head_dim`` (decoders) or ``attention_head_size`` (BERT family).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models.arch import ArchitectureError, find_linears, role_of, weight_of


@dataclass
class MlpUnit:
    inputs: list  # [(name, module)], each (width, hidden)
    output: tuple  # (name, module), (hidden, width)

    @property
    def width(self) -> int:
        return weight_of(self.output[1]).shape[1]


@dataclass
class AttentionUnit:
    module: nn.Module  # the attention module (owner of head_dim or attention_head_size, num_key_value_groups ...)
    q: tuple
    k: tuple
    v: tuple
    o: tuple
    head_dim: int

    @property
    def heads(self) -> int:
        return weight_of(self.q[1]).shape[0] // self.head_dim

    @property
    def kv_heads(self) -> int:
        return weight_of(self.k[1]).shape[0] // self.head_dim


def _hidden_size(block_linears: dict) -> int:
    """The residual width: the most common output size among the block's linears that write it back."""
    outs = [weight_of(m).shape[0] for m in block_linears.values()]
    ins = [weight_of(m).shape[1] for m in block_linears.values()]
    common = set(outs) & set(ins)
    return max(common, key=lambda h: ins.count(h) + outs.count(h))


def find_mlp(block: nn.Module, prefix: str = "") -> MlpUnit:
    """The output projection is the MLP linear registered last (``down_proj``, ``fc2``, ``c_proj`` in every
    HF family), checked by shape: it writes ``hidden``; the inputs are the MLP linears of shape (width, hidden)."""
    where = prefix or "block"
    linears = [(n, m) for n, m in find_linears(block, prefix).items() if role_of(n) == "mlp"]
    if len(linears) < 2:
        raise ArchitectureError(f"{where}: no MLP (input and output linears) found")
    hidden = _hidden_size(find_linears(block, prefix))
    output = linears[-1]
    width = weight_of(output[1]).shape[1]
    inputs = [(n, m) for n, m in linears[:-1] if weight_of(m).shape == (width, hidden)]
    if weight_of(output[1]).shape[0] != hidden or len(inputs) != len(linears) - 1:
        raise ArchitectureError(f"{where}: MLP linears do not have input (width, hidden) / output (hidden, width) "
                                "shapes (fused gate/up weights are not supported)")
    return MlpUnit(inputs, output)


def find_attention(block: nn.Module, prefix: str = "") -> AttentionUnit:
    """q, k, v, o: the four attention linears, the output projection registered last; q/k/v told apart
    by their names' first letters (``q_proj``, ``query``...) or else by registration order; checked by shape: q/k/v read ``hidden``, o reads what q writes and writes ``hidden``."""
    where = prefix or "block"
    linears = [(n, m) for n, m in find_linears(block, prefix).items() if role_of(n) == "attention"]
    hidden = _hidden_size(find_linears(block, prefix))
    if len(linears) == 2 and weight_of(linears[0][1]).shape[0] == 3 * hidden:
        raise ArchitectureError(f"{where}: fused q/k/v projection (GPT-2 style): head pruning is not supported")
    if len(linears) != 4:
        raise ArchitectureError(f"{where}: expected q, k, v and an output projection, found {len(linears)} "
                                "attention linears")
    *qkv, o = linears
    by_letter = {n.rsplit(".", 1)[-1][:1].lower(): (n, m) for n, m in qkv}
    # OPT registers k, v, q: take the names' first letters when they say q/k/v, else registration order
    q, k, v = (by_letter["q"], by_letter["k"], by_letter["v"]) if set(by_letter) == {"q", "k", "v"} else qkv
    shapes_ok = (all(weight_of(m).shape[1] == hidden for _, m in (q, k, v))
                 and weight_of(o[1]).shape == (hidden, weight_of(q[1]).shape[0])
                 and weight_of(k[1]).shape == weight_of(v[1]).shape)
    if not shapes_ok:
        raise ArchitectureError(f"{where}: attention linears do not have q/k/v/o shapes")
    owner_name = q[0].rsplit(".", 1)[0][len(prefix):]
    owner = block.get_submodule(owner_name) if owner_name else block
    head_dim = getattr(owner, "head_dim", None) or getattr(owner, "attention_head_size", None)
    if not isinstance(head_dim, int) or weight_of(q[1]).shape[0] % head_dim or weight_of(k[1]).shape[0] % head_dim:
        raise ArchitectureError(f"{where}: the attention module has no head_dim that divides q and k")
    return AttentionUnit(owner, q, k, v, o, head_dim)
