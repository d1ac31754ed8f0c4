"""Find what pruning needs inside any Hugging Face model, from the model itself.

No per-family scripts: the decoder blocks are the largest ``nn.ModuleList`` of identical modules that
hold linear layers; embeddings and head come from ``get_input_embeddings`` / ``get_output_embeddings``.
A "linear" is ``nn.Linear``, GPT-2's ``Conv1D``, whose weight is stored transposed ``(in, out)``, or one
expert's matrix of fused experts while a prune exposes them (:mod:`.experts`);
:func:`weight_of` / :func:`set_weight_of` always speak ``(out, in)``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ArchitectureError, ModelLoadError
from .experts import ExpertLinear
from .pages import overwrite_

try:  # GPT-2 family
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

# ExpertLinear: one expert's matrix of a mixture of experts' fused experts, while a prune exposes them
LINEAR_TYPES = (nn.Linear, ExpertLinear) + ((Conv1D,) if Conv1D else ())
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the model's repeated transformer blocks."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ArchitectureError(f"{type(model).__name__} has no repeated blocks (no ModuleList of identical layers "
                                "with linear weights): nothing to prune")
    return best[1], best[2]


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All linear layers under ``module``, by qualified name (prefixed), in registration order."""
    return {f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, LINEAR_TYPES)}


def role_of(name: str) -> str:
    """``"attention"`` if any path component names attention (``self_attn``, ``attention``, ``attn``), else ``"mlp"``."""
    return "attention" if _ATTENTION.search(name) else "mlp"


def check_causal_lm(config, where: str) -> None:
    """:class:`ModelLoadError` unless ``config`` describes a causal language model: a checkpoint saved as another
    class (``BertForSequenceClassification``) would be built as the family's causal LM, its task head dropped
    without a word, so it is refused before anything is read.  A config that names no class is let through."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    named = list(getattr(config, "architectures", None) or [])
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ([v] if isinstance(v, str) else v)}
    if named and not any(name in causal for name in named):
        raise ModelLoadError(f"{where}: a {named[0]} checkpoint; secateurs prunes causal language models, and "
                             f"loading this one as such would drop its {named[0]} head (encoders and task heads "
                             "are not supported yet)")


def is_transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``. A view of the parameter's data (writes go through)."""
    w = module.weight.data
    return w.t() if is_transposed(module) else w


def set_weight_of(module: nn.Module, W: torch.Tensor) -> None:
    """Write ``W`` ``(out, in)`` back into the module, in its own layout and dtype."""
    target = weight_of(module)
    if W.data_ptr() != target.data_ptr():
        overwrite_(target, W)  # a plain copy_, without the cost of copying the old pages on write


def block_index(name: str, blocks_name: str) -> "int | None":
    """Index of the block a qualified module name lives in, or None."""
    match = re.match(re.escape(blocks_name) + r"\.(\d+)\.", name)
    return int(match[1]) if match else None


def non_finite(W: torch.Tensor) -> int:
    """How many entries of ``W`` are inf or NaN: one ``sum`` (no copy) when there are none, which is almost
    always; an exact count only when that sum is not finite (inf or NaN somewhere, or finite values whose
    sum overflowed).  Weights on the ``meta`` device (offloaded, never loaded) count as finite."""
    if W.device.type == "meta" or bool(torch.isfinite(W.sum())):
        return 0
    return W.numel() - int(torch.count_nonzero(torch.isfinite(W)))


def check_finite(name: str, W: torch.Tensor) -> None:
    """Refuse a weight holding inf or NaN: no ranking of its entries means anything, and the masks the
    kernels would choose among NaN scores are arbitrary."""
    if bad := non_finite(W):
        raise ModelLoadError(f"{name}: {bad} of its {W.numel()} weights are inf or NaN (a broken checkpoint?); "
                             "refusing to prune it")
