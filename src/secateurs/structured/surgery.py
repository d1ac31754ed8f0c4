"""Cut channels, heads and blocks out of a model so that it stays a valid, loadable model.

Every cut slices the weights *and* updates what reads their sizes: ``in_features``/``out_features``
(``nf`` for GPT-2's ``Conv1D``), the attention module's ``num_key_value_groups``, the ``layer_idx`` that
the KV cache is indexed by, and -- through :func:`sync_config` -- the HF config.  A model whose blocks all
have the same widths gets a plain config (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``num_hidden_layers``, ``layer_types``) and loads with
``AutoModelForCausalLM.from_pretrained``.  Different widths per block cannot be said in an HF config:
they are recorded in the config itself (``secateurs_structure`` in ``config.json``), plain
``from_pretrained`` refuses the checkpoint with a size-mismatch error, and :func:`load` restores them.
:func:`check_loadable` rebuilds the model from its config (on the meta device) and compares every
parameter's shape, so a model that would not load is never saved.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ArchitectureError, ConfigError
from ..models.arch import find_blocks, is_transposed
from .units import AttentionUnit, MlpUnit, find_attention, find_mlp

log = logging.getLogger(__name__)

STRUCTURE_KEY = "secateurs_structure"  # config.json entry holding per-block widths, when they differ
MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim")  # whichever the family uses
# (hidden_dim: DistilBERT's MLP width)


# ----------------------------------------------------------------------------- slicing


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def slice_linear(module: nn.Module, keep: list, side: str) -> None:
    """Keep only ``keep`` output rows (``side="out"``, with the bias) or input columns (``side="in"``).

    Indices speak of the ``(out, in)`` weight whatever the module stores (``Conv1D`` keeps ``(in, out)``).
    """
    idx = torch.as_tensor(keep, dtype=torch.long, device=module.weight.device)
    axis = {"out": 0, "in": 1}[side]
    if is_transposed(module):
        axis = 1 - axis
    _set(module, "weight", module.weight.index_select(axis, idx))
    if side == "out" and getattr(module, "bias", None) is not None:
        _set(module, "bias", module.bias.index_select(0, idx))
    if is_transposed(module):
        module.nf = module.weight.shape[1]
    elif side == "out":
        module.out_features = len(keep)
    else:
        module.in_features = len(keep)


def keep_channels(unit: MlpUnit, keep: list) -> None:
    """Keep MLP channels ``keep``: rows of every input projection, columns of the output projection."""
    for _, module in unit.inputs:
        slice_linear(module, keep, "out")
    slice_linear(unit.output[1], keep, "in")


def head_channels(heads: list, head_dim: int) -> list:
    return [h * head_dim + c for h in heads for c in range(head_dim)]


def keep_heads(unit: AttentionUnit, q_heads: list, kv_heads: list) -> None:
    """Keep query heads ``q_heads`` and KV heads ``kv_heads`` (both sorted).

    Grouped-query attention stays valid only if every kept KV head still serves the same number of query
    heads, in order: the caller (:func:`~secateurs.structured.engine.head_units`) guarantees it.
    """
    d = unit.head_dim
    slice_linear(unit.q[1], head_channels(q_heads, d), "out")
    slice_linear(unit.k[1], head_channels(kv_heads, d), "out")
    slice_linear(unit.v[1], head_channels(kv_heads, d), "out")
    slice_linear(unit.o[1], head_channels(q_heads, d), "in")
    module = unit.module
    if hasattr(module, "num_key_value_groups"):
        module.num_key_value_groups = len(q_heads) // len(kv_heads)
    counts = {"num_heads": len(q_heads), "num_key_value_heads": len(kv_heads), "num_attention_heads": len(q_heads),
              "n_heads": len(q_heads), "all_head_size": len(q_heads) * d}  # decoders', BERT's, DistilBERT's names
    for attr, value in counts.items():
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


def drop_blocks(model: nn.Module, remove: list) -> None:
    """Delete whole decoder blocks; renumber ``layer_idx`` (the KV cache slot) and the config to match."""
    blocks_name, blocks = find_blocks(model)
    remove = set(remove)
    kept = [i for i in range(len(blocks)) if i not in remove]
    if not kept:
        raise ConfigError("removing every block would leave no model")
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in kept]))
    for new, block in enumerate(getattr(parent, attr)):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new
    config = model.config
    config.num_hidden_layers = len(kept)
    for key in ("layer_types",):  # per-layer lists in the config follow the blocks
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == len(blocks):
            setattr(config, key, [value[i] for i in kept])


# ----------------------------------------------------------------------------- the config


def structure_of(model: nn.Module) -> dict:
    """Per-block widths as they are now: ``{"mlp": [...], "heads": [...], "kv_heads": [...]}``."""
    blocks_name, blocks = find_blocks(model)
    out = {"mlp": [], "heads": [], "kv_heads": []}
    for i, block in enumerate(blocks):
        out["mlp"].append(find_mlp(block, f"{blocks_name}.{i}.").width)
        try:
            att = find_attention(block, f"{blocks_name}.{i}.")
            out["heads"].append(att.heads)
            out["kv_heads"].append(att.kv_heads)
        except ArchitectureError:
            out["heads"].append(None)
            out["kv_heads"].append(None)
    return out


def _width_key(config) -> str:
    for key in MLP_WIDTH_KEYS:
        if hasattr(config, key):
            return key
    raise ArchitectureError(f"{type(config).__name__} has no MLP width field ({', '.join(MLP_WIDTH_KEYS)})")


def config_says_heads(model: nn.Module, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Can ``model``'s config family describe ``heads`` query and ``kv_heads`` KV heads of size ``head_dim``?
    Decoders with a ``head_dim`` field can; a config that derives the head size from ``hidden_size / heads``
    (BERT's, OPT's) cannot.  Tried by building a weightless model of such a config."""
    cfg = copy.deepcopy(model.config)
    cfg.num_attention_heads = heads
    if hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = kv_heads
    cfg.head_dim = head_dim
    try:
        name, blocks = find_blocks(_build_empty(cfg, model))
        got = find_attention(blocks[0], f"{name}.0.")
        return (got.heads, got.kv_heads, got.head_dim) == (heads, kv_heads, head_dim)
    except Exception:
        return False


def _config_heads(config) -> tuple:
    heads = getattr(config, "num_attention_heads", None)
    return heads, getattr(config, "num_key_value_heads", None) or heads


def sync_config(model: nn.Module, head_dim: "int | None" = None) -> "dict | None":
    """Write uniform widths into ``model.config``; if they differ per block, or if the config cannot describe
    them (fewer heads in a BERT-family encoder), record the per-block structure under
    ``config.secateurs_structure`` and return it (else None).  ``head_dim``: heads were cut, of that size."""
    config = model.config
    s = structure_of(model)
    # a SliceGPT model with shortcut matrices keeps its record of them (config.hidden_size says the unsliced width)
    s.update({k: v for k, v in (getattr(config, STRUCTURE_KEY, None) or {}).items() if k in SLICED})
    uniform = not any(k in s for k in SLICED)
    if len(set(s["mlp"])) == 1:
        setattr(config, _width_key(config), s["mlp"][0])
    else:
        uniform = False
    if head_dim is not None and len(set(s["heads"])) == 1 and len(set(s["kv_heads"])) == 1 and \
            config_says_heads(model, s["heads"][0], s["kv_heads"][0], head_dim):
        config.num_attention_heads = s["heads"][0]
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = s["kv_heads"][0]
        config.head_dim = head_dim  # no longer hidden_size / heads
    if any(h is not None and (h, kv) != _config_heads(config) for h, kv in zip(s["heads"], s["kv_heads"])):
        uniform = False  # per-block heads, or heads the config cannot say
    if uniform:
        if hasattr(config, STRUCTURE_KEY):
            delattr(config, STRUCTURE_KEY)
        return None
    setattr(config, STRUCTURE_KEY, s)
    return s


SLICED = ("hidden", "shortcuts")  # secateurs_structure entries of a SliceGPT model with shortcut matrices


def built_config(config, structure: "dict | None"):
    """The config a model with ``structure`` is built from: without the structure entry and, for a SliceGPT model
    with shortcut matrices, with its real width (the saved ``hidden_size`` is the unsliced one, so that plain
    transformers refuses the checkpoint instead of loading it without its shortcuts)."""
    config = copy.deepcopy(config)
    if hasattr(config, STRUCTURE_KEY):
        delattr(config, STRUCTURE_KEY)
    if structure and "hidden" in structure:
        config.hidden_size = structure["hidden"]
    return config


def _build_empty(config, like: "nn.Module | None" = None):
    """A weightless model of ``config``: its family's causal LM, or an encoder of ``like``'s class."""
    from transformers import AutoModelForCausalLM

    from ..models.arch import build_from_config, head_of

    cls = type(like) if like is not None and head_of(like) != "causal" else AutoModelForCausalLM
    with torch.device("meta"):
        return build_from_config(cls, config)


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Shrink a freshly built model's blocks to the recorded per-block widths and give them SliceGPT's shortcut
    matrices where recorded (values are then loaded)."""
    from .slicing import add_shortcuts

    blocks_name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        if structure.get("shortcuts"):
            add_shortcuts(block, [torch.eye(structure["hidden"])] * 2, next(block.parameters()).dtype)
        prefix = f"{blocks_name}.{i}."
        mlp = find_mlp(block, prefix)
        if structure["mlp"][i] != mlp.width:
            keep_channels(mlp, list(range(structure["mlp"][i])))
        if structure["heads"][i] is not None:
            att = find_attention(block, prefix)
            if (structure["heads"][i], structure["kv_heads"][i]) != (att.heads, att.kv_heads):
                keep_heads(att, list(range(structure["heads"][i])), list(range(structure["kv_heads"][i])))


def check_loadable(model: nn.Module, structure: "dict | None") -> None:
    """Rebuild the model from its config (+ structure) on the meta device; every shape must match."""
    try:
        if hasattr(model.config, "validate"):  # what save_pretrained checks before it writes
            model.config.validate()
        fresh = _build_empty(built_config(model.config, structure), model)
        if structure is not None:
            apply_structure(fresh, structure)
    except Exception as exc:
        raise ArchitectureError(f"the pruned {type(model).__name__} cannot be rebuilt from its config: {exc}") from None
    want = {n: tuple(p.shape) for n, p in model.named_parameters()}
    got = {n: tuple(p.shape) for n, p in fresh.named_parameters()}
    bad = [n for n in want if got.get(n) != want[n]] + [n for n in got if n not in want]
    if bad:
        raise ArchitectureError(f"the pruned {type(model).__name__} would not load: {len(bad)} parameters differ "
                                f"from what its config builds (first: {bad[0]}: {want.get(bad[0])} vs {got.get(bad[0])})")


def load(path: "str | Path", dtype: "torch.dtype | str" = "auto"):
    """Load a saved model -- uniform (plain ``from_pretrained``) or with per-block widths -- and its tokenizer.

    ``dtype`` ``auto``: the dtype the model was saved in."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.arch import build_from_config, model_class

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    cls = model_class(config, str(path))
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    structure = getattr(config, STRUCTURE_KEY, None)
    if getattr(config, "secateurs_sparsity", None) is not None:  # a compressed sparse checkpoint
        from ..models.load import load_compressed

        return load_compressed(path, dtype), tokenizer
    if structure is None:
        return cls.from_pretrained(path, dtype=dtype).eval(), tokenizer
    from safetensors.torch import load_file

    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = build_from_config(cls, built_config(config, structure), dtype)
    if "hidden" in structure:
        model.config.hidden_size = config.hidden_size  # the unsliced width, as saved
    apply_structure(model, structure)
    setattr(model.config, STRUCTURE_KEY, structure)  # saved again if the model is saved again
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # parameters stored once, under the name of the one they are tied to (an LM head, a masked LM's decoder bias)
    tied = set(missing) & set(getattr(model, "all_tied_weights_keys", None) or {})
    if set(missing) - tied or unexpected:
        raise ArchitectureError(f"{path}: weights do not match the recorded structure "
                                f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval(), tokenizer
